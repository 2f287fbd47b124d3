#include "twins/config.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <stdexcept>

#include "twins/registry.h"

namespace twins::config {

ConfigReader::ConfigReader(const nlohmann::json& object, std::string path) : object_(object), path_(std::move(path)) {
  if (!object_.is_object())
    throw std::invalid_argument((path_.empty() ? std::string("config") : path_) + ": expected a JSON object, got " +
                                object_.dump());
}

std::string ConfigReader::path_of(const std::string& key) const { return path_.empty() ? key : path_ + "." + key; }

void ConfigReader::throw_type_error(const std::string& key, const char* expected) const {
  throw std::invalid_argument(path_of(key) + ": expected " + expected + ", got " + object_.at(key).dump());
}

void ConfigReader::finish() const {
  std::vector<std::string> valid(known_.begin(), known_.end());
  for (const auto& item : object_.items()) {
    if (known_.count(item.key())) continue;
    std::string message = path_of(item.key()) + ": unknown key";
    const std::string guess = nearest(item.key(), valid);
    if (!guess.empty())
      message += "; did you mean " + guess + "?";
    else {
      message += "; valid keys:";
      for (const auto& k : valid) message += " " + k;
    }
    throw std::invalid_argument(message);
  }
}

std::string type_of(const nlohmann::json& spec, const std::string& path) {
  if (spec.is_string()) return spec.get<std::string>();
  if (!spec.is_object() || !spec.contains("type") || !spec.at("type").is_string())
    throw std::invalid_argument(path + ": expected an object with a string \"type\", got " + spec.dump());
  return spec.at("type").get<std::string>();
}

void require(bool ok, const std::string& path, const std::string& message) {
  if (!ok) throw std::invalid_argument(path + ": " + message);
}

static size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diagonal = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] != b[j - 1])});
      diagonal = up;
    }
  }
  return row[b.size()];
}

std::string nearest(const std::string& word, const std::vector<std::string>& candidates) {
  std::string best;
  size_t best_distance = std::max<size_t>(2, word.size() / 3) + 1;
  for (const auto& c : candidates) {
    const size_t d = edit_distance(word, c);
    if (d < best_distance) best_distance = d, best = c;
  }
  return best;
}

void apply_override(nlohmann::json& root, const std::string& assignment) {
  const auto eq = assignment.find('=');
  if (eq == std::string::npos || eq == 0)
    throw std::invalid_argument("override \"" + assignment + "\": expected key.path=value");
  const std::string path = assignment.substr(0, eq);
  const std::string text = assignment.substr(eq + 1);
  nlohmann::json value = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (value.is_discarded()) value = text;  // bare words are strings: data.root=/data/x

  nlohmann::json* node = &root;
  size_t start = 0;
  while (true) {
    const size_t dot = path.find('.', start);
    const std::string key = path.substr(start, dot == std::string::npos ? dot : dot - start);
    const std::string parent = start == 0 ? "the config" : path.substr(0, start - 1);
    if (key.empty()) throw std::invalid_argument("override \"" + assignment + "\": empty key in path");
    nlohmann::json* child = nullptr;
    if (node->is_array()) {  // views.1.0.p: list elements by index
      size_t used = 0;
      unsigned long index = 0;
      try {
        index = std::stoul(key, &used);
      } catch (const std::exception&) {
        used = 0;
      }
      if (used != key.size() || index >= node->size())
        throw std::invalid_argument("override \"" + assignment + "\": " + parent + " is a list of " +
                                    std::to_string(node->size()) + "; \"" + key + "\" is not an index in it");
      child = &(*node)[index];
    } else if (node->is_object()) {
      child = &(*node)[key];
    } else {
      throw std::invalid_argument("override \"" + assignment + "\": " + parent + " is not an object");
    }
    if (dot == std::string::npos) {
      *child = value;
      return;
    }
    if (child->is_null()) *child = nlohmann::json::object();
    node = child;
    start = dot + 1;
  }
}

nlohmann::json read_json_file(const std::string& file) {
  std::ifstream in(file);
  if (!in) throw std::invalid_argument(file + ": cannot open");
  try {
    return nlohmann::json::parse(in, nullptr, true, /*ignore_comments=*/true);
  } catch (const nlohmann::json::parse_error& e) {
    throw std::invalid_argument(file + ": invalid JSON: " + e.what());
  }
}

nlohmann::json load_config(const std::string& file, const std::vector<std::string>& overrides) {
  nlohmann::json root = read_json_file(file);
  if (!root.is_object()) throw std::invalid_argument(file + ": expected a JSON object at the top");
  for (const auto& o : overrides) apply_override(root, o);
  if (root.contains("views") && root["views"].is_string()) {
    namespace fs = std::filesystem;
    const std::string name = root["views"];
    fs::path p = fs::path(file).parent_path() / name;
    if (!fs::exists(p)) p = name;
    if (!fs::exists(p))
      throw std::invalid_argument(file + ": views: file \"" + name + "\" not found next to the config or here");
    root["views"] = read_json_file(p.string());
  }
  return root;
}

}  // namespace twins::config

namespace twins::detail {

std::string registry_type_of(const nlohmann::json& spec, const std::string& path) {
  return config::type_of(spec, path);
}

nlohmann::json registry_object(const nlohmann::json& spec) {
  return spec.is_string() ? nlohmann::json{{"type", spec}} : spec;
}

void registry_unknown(const std::string& path, const std::string& name, const std::vector<std::string>& valid) {
  std::string message = path + ": unknown type \"" + name + "\"";
  const std::string guess = config::nearest(name, valid);
  if (!guess.empty()) message += " (did you mean " + guess + "?)";
  message += "; valid types:";
  for (const auto& v : valid) message += " " + v;
  throw std::invalid_argument(message);
}

}  // namespace twins::detail

namespace twins {

std::string one_of(const std::vector<std::string>& choices) {
  std::string out;
  for (size_t i = 0; i < choices.size(); ++i)
    out += (i == 0 ? "" : i + 1 == choices.size() ? " or " : ", ") + choices[i];
  return out;
}

}  // namespace twins

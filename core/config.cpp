#include "twins/config.h"

#include <algorithm>
#include <cmath>
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

long double ConfigReader::integer(const std::string& key, const nlohmann::json& v, long double lo,
                                  long double hi) const {
  long double x = 0;
  if (v.is_number_unsigned())
    x = static_cast<long double>(v.get<uint64_t>());
  else if (v.is_number_integer())
    x = static_cast<long double>(v.get<int64_t>());
  else if (v.is_number_float() && std::floor(v.get<double>()) == v.get<double>())
    x = v.get<double>();
  else
    throw_type_error(key, "an integer");
  if (x < lo || x > hi) {
    const std::string high = hi > 9.2e18L ? std::string("2^64 - 1") : std::to_string(static_cast<long long>(hi));
    throw std::invalid_argument(path_of(key) + ": " + v.dump() + " is out of range [" +
                                std::to_string(static_cast<long long>(lo)) + ", " + high + "]");
  }
  return x;
}

void ConfigReader::get_or_auto(const std::string& key, int& value, int auto_value, int lo, int hi) {
  known_.insert(key);
  if (!object_.contains(key)) return;
  const nlohmann::json& v = object_.at(key);
  if (v.is_string()) {
    if (v.get<std::string>() != "auto") throw_type_error(key, "an integer or \"auto\"");
    value = auto_value;
    return;
  }
  if (!v.is_number() || (v.is_number_float() && std::floor(v.get<double>()) != v.get<double>()))
    throw_type_error(key, "an integer or \"auto\"");
  value = static_cast<int>(integer(key, v, lo, hi));
}

void ConfigReader::throw_type_error(const std::string& key, const char* expected) const {
  std::string got = object_.at(key).dump();
  if (got.size() > 200) got = got.substr(0, 200) + "...";
  throw std::invalid_argument(path_of(key) + ": expected " + expected + ", got " + got);
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

std::optional<long long> parse_integer(const std::string& text) {
  size_t used = 0;
  long long value = 0;
  try {
    value = std::stoll(text, &used);
  } catch (const std::exception&) {  // no digits, or out of range
    return std::nullopt;
  }
  if (used != text.size()) return std::nullopt;
  return value;
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
  nlohmann::json value;
  try {
    value = parse_json(text, "override \"" + assignment + "\"");
  } catch (const std::invalid_argument&) {
    value = text;  // bare words are strings: data.root=/data/x
  }

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

nlohmann::json parse_json(std::string_view text, const std::string& name, bool comments) {
  // The nesting depth, outside strings (and comments): a cheap scan that bounds the parser.
  int depth = 0;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (c == '"') {
      for (++i; i < text.size() && text[i] != '"'; ++i)
        if (text[i] == '\\') ++i;
    } else if (comments && c == '/' && i + 1 < text.size() && text[i + 1] == '/') {
      while (i < text.size() && text[i] != '\n') ++i;
    } else if (comments && c == '/' && i + 1 < text.size() && text[i + 1] == '*') {
      const size_t end = text.find("*/", i + 2);
      i = end == std::string_view::npos ? text.size() : end + 1;
    } else if (c == '[' || c == '{') {
      if (++depth > kMaxJsonDepth)
        throw std::invalid_argument(name + ": JSON nested deeper than " + std::to_string(kMaxJsonDepth) +
                                    " levels (at byte " + std::to_string(i) + ")");
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  try {
    return nlohmann::json::parse(text.begin(), text.end(), nullptr, true, comments);
  } catch (const nlohmann::json::exception& e) {
    throw std::invalid_argument(name + ": invalid JSON: " + e.what());
  }
}

nlohmann::json read_json_file(const std::string& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) throw std::invalid_argument(file + ": cannot open");
  std::string text;
  char buffer[1 << 16];
  while (in.read(buffer, sizeof buffer) || in.gcount() > 0) {
    text.append(buffer, static_cast<size_t>(in.gcount()));
    if (text.size() > kMaxConfigBytes)
      throw std::invalid_argument(file + ": larger than " + std::to_string(kMaxConfigBytes >> 20) +
                                  " MiB: not a config file");
  }
  return parse_json(text, file, /*comments=*/true);
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

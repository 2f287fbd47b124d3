#include "twins/config.h"

#include <algorithm>
#include <stdexcept>

#include "twins/registry.h"

namespace twins::config {

ConfigReader::ConfigReader(const nlohmann::json& object, std::string path)
    : object_(object), path_(std::move(path)) {
  if (!object_.is_object())
    throw std::invalid_argument((path_.empty() ? std::string("config") : path_) +
                                ": expected a JSON object, got " + object_.dump());
}

std::string ConfigReader::path_of(const std::string& key) const {
  return path_.empty() ? key : path_ + "." + key;
}

void ConfigReader::throw_type_error(const std::string& key, const char* expected) const {
  throw std::invalid_argument(path_of(key) + ": expected " + expected + ", got " +
                              object_.at(key).dump());
}

void ConfigReader::finish() const {
  std::vector<std::string> valid(known_.begin(), known_.end());
  for (const auto& item : object_.items()) {
    if (known_.count(item.key())) continue;
    std::string message = path_of(item.key()) + ": unknown key";
    const std::string guess = nearest(item.key(), valid);
    if (!guess.empty()) message += "; did you mean " + guess + "?";
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
    throw std::invalid_argument(path + ": expected an object with a string \"type\", got " +
                                spec.dump());
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
    throw std::invalid_argument("--set " + assignment + ": expected key.path=value");
  const std::string path = assignment.substr(0, eq);
  const std::string text = assignment.substr(eq + 1);
  nlohmann::json value = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (value.is_discarded()) value = text;  // bare words are strings: data.root=/data/x

  nlohmann::json* node = &root;
  size_t start = 0;
  while (true) {
    const size_t dot = path.find('.', start);
    const std::string key = path.substr(start, dot == std::string::npos ? dot : dot - start);
    if (key.empty()) throw std::invalid_argument("--set " + assignment + ": empty key in path");
    if (!node->is_object()) {
      throw std::invalid_argument("--set " + assignment + ": " + path.substr(0, start - 1) +
                                  " is not an object");
    }
    if (dot == std::string::npos) {
      (*node)[key] = value;
      return;
    }
    node = &(*node)[key];
    if (node->is_null()) *node = nlohmann::json::object();
    start = dot + 1;
  }
}

}  // namespace twins::config

namespace twins::detail {

std::string registry_type_of(const nlohmann::json& spec, const std::string& kind) {
  return config::type_of(spec, kind);
}

void registry_unknown(const std::string& kind, const std::string& name,
                      const std::vector<std::string>& valid) {
  std::string message = kind + ": unknown type \"" + name + "\"";
  const std::string guess = config::nearest(name, valid);
  if (!guess.empty()) message += " (did you mean " + guess + "?)";
  message += "; valid types:";
  for (const auto& v : valid) message += " " + v;
  throw std::invalid_argument(message);
}

}  // namespace twins::detail

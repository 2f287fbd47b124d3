#pragma once
// Strict reading of JSON configuration, shared by every component created by name.
//
// A component's `from_json` walks its object with a ConfigReader: each key it reads is marked,
// and `finish()` rejects whatever is left, naming the full path and the nearest valid key
// ("loss.sim_coef: unknown key; did you mean sim_coeff?"). Users mistype keys far more often
// than they mistype values, and a silently ignored key is a silently wrong experiment.
#include <nlohmann/json.hpp>

#include <limits>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

namespace twins::config {

/// Reads the keys of one JSON object, tracking which were consumed.
class ConfigReader {
 public:
  /// `path` names the object in messages, e.g. "loss" or "model.projector".
  ConfigReader(const nlohmann::json& object, std::string path);
  /// The reader keeps a reference: reading a temporary would dangle.
  ConfigReader(nlohmann::json&& object, std::string path) = delete;

  /// Reads `key` into `value` if present (keeps the default otherwise). Integers must be
  /// integers in T's range (2.5 for a batch size is an error, not 2); lists of integers too.
  template <class T>
  void get(const std::string& key, T& value) {
    known_.insert(key);
    if (!object_.contains(key)) return;
    const nlohmann::json& v = object_.at(key);
    if constexpr (std::is_integral_v<T> && !std::is_same_v<T, bool>) {
      value = static_cast<T>(integer(key, v, static_cast<long double>(std::numeric_limits<T>::min()),
                                     static_cast<long double>(std::numeric_limits<T>::max())));
    } else if constexpr (is_integer_vector<T>::value) {
      using E = typename T::value_type;
      if (!v.is_array()) throw_type_error(key, "a list of integers");
      T out;
      for (const auto& item : v)
        out.push_back(static_cast<E>(integer(key, item, static_cast<long double>(std::numeric_limits<E>::min()),
                                             static_cast<long double>(std::numeric_limits<E>::max()))));
      value = std::move(out);
    } else {
      try {
        value = v.get<T>();
      } catch (const nlohmann::json::exception&) {
        throw_type_error(key, describe<T>());
      }
    }
  }

  /// Reads `key` as an integer in [lo, hi] or the string "auto", which gives `auto_value` (e.g.
  /// "workers": "auto"). Keeps the default when absent.
  void get_or_auto(const std::string& key, int& value, int auto_value, int lo, int hi);

  /// Marks `key` as valid without reading it (read by someone else, e.g. "type").
  void allow(const std::string& key) { known_.insert(key); }

  /// The full dotted path of a key, for messages.
  std::string path_of(const std::string& key) const;

  /// Throws std::invalid_argument on the first key that was neither read nor allowed.
  void finish() const;

 private:
  template <class T>
  static const char* describe() {
    if constexpr (std::is_same_v<T, bool>)
      return "a boolean";
    else if constexpr (std::is_integral_v<T>)
      return "an integer";
    else if constexpr (std::is_floating_point_v<T>)
      return "a number";
    else if constexpr (std::is_same_v<T, std::string>)
      return "a string";
    else
      return "a value of another type";
  }
  template <class T>
  struct is_integer_vector : std::false_type {};
  template <class E>
  struct is_integer_vector<std::vector<E>> : std::bool_constant<std::is_integral_v<E> && !std::is_same_v<E, bool>> {};
  // An integral JSON number (or a float with an integral value) in [lo, hi].
  long double integer(const std::string& key, const nlohmann::json& v, long double lo, long double hi) const;
  [[noreturn]] void throw_type_error(const std::string& key, const char* expected) const;

  const nlohmann::json& object_;
  std::string path_;
  std::set<std::string> known_;
};

/// The "type" of a component object; a plain string is accepted as {"type": string}.
std::string type_of(const nlohmann::json& spec, const std::string& path);

/// Throws std::invalid_argument("<path>: <message>") unless `ok`.
void require(bool ok, const std::string& path, const std::string& message);

/// The candidate closest to `word` by edit distance, or "" if none is close.
std::string nearest(const std::string& word, const std::vector<std::string>& candidates);

/// The whole of `text` read as a decimal integer (std::stoll's form: leading blanks and a sign
/// allowed), or nullopt when it is empty, has anything after the number or overflows. Callers
/// check the range and name the field in their own words.
std::optional<long long> parse_integer(const std::string& text);

/// Applies "a.b.c=value" to `root` (value parsed as JSON, else taken as a string);
/// intermediate objects are created. Throws std::invalid_argument on a malformed override.
void apply_override(nlohmann::json& root, const std::string& assignment);

/// Reads a JSON config file, applies "a.b=value" overrides in order, and inlines "views" given
/// as a file name (resolved against the config file's folder, then the working directory).
/// Throws std::invalid_argument naming the file and the position of a JSON syntax error.
nlohmann::json load_config(const std::string& file, const std::vector<std::string>& overrides = {});

/// The deepest nesting of lists and objects accepted in any JSON twins reads (configs,
/// safetensors headers, metadata): deeper text is refused before parsing, so no input can
/// exhaust the stack.
inline constexpr int kMaxJsonDepth = 64;
/// The largest config file read (configs are a few kB; anything larger is a wrong file).
inline constexpr size_t kMaxConfigBytes = 64u << 20;

/// Parses JSON text, `comments` allowing // and /* */; `name` (a file, a metadata key) names it
/// in messages. Throws std::invalid_argument for a syntax error (with its position) or nesting
/// deeper than kMaxJsonDepth.
nlohmann::json parse_json(std::string_view text, const std::string& name, bool comments = false);

/// Parses a JSON file (comments allowed); errors name the file.
nlohmann::json read_json_file(const std::string& file);

}  // namespace twins::config

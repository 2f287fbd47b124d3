#pragma once
// One registry per kind of component (losses, backbones, heads, augmentation ops, datasets,
// optimizers), filled explicitly in one function per kind: no self-registering statics, which
// the linker drops from static libraries.
//
// A factory gets the component's JSON object ({"type": name, ...}), the config path that names
// it in messages ("views[1][3]", "model.projector") and typed arguments of its kind (a head's
// input size, an optimizer's parameter groups), so nothing travels inside the JSON that a user
// could also write there.
#include <nlohmann/json_fwd.hpp>

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace twins {
namespace detail {
std::string registry_type_of(const nlohmann::json& spec, const std::string& path);
[[noreturn]] void registry_unknown(const std::string& path, const std::string& name,
                                   const std::vector<std::string>& valid);
/// {"type": spec} for a bare string, else spec itself.
nlohmann::json registry_object(const nlohmann::json& spec);
}  // namespace detail

/// Maps a name to a factory building a `T` from its JSON object and typed `Args`.
template <class T, class... Args>
class Registry {
 public:
  using Factory = std::function<std::shared_ptr<T>(const nlohmann::json& spec, const std::string& path, Args... args)>;

  /// `kind` names the registry in messages ("loss", "backbone", ...) when no path is given.
  explicit Registry(std::string kind) : kind_(std::move(kind)) {}

  void add(const std::string& name, Factory factory) {
    if (!factories_.count(name)) order_.push_back(name);
    factories_[name] = std::move(factory);
  }

  /// Builds the component named by spec["type"] (a bare string is {"type": string}); unknown
  /// names throw std::invalid_argument listing the valid ones. `path` names the spec in
  /// messages; empty: the registry's kind.
  std::shared_ptr<T> create(const nlohmann::json& spec, const std::string& path, Args... args) const {
    const std::string where = path.empty() ? kind_ : path;
    const std::string name = detail::registry_type_of(spec, where);
    auto it = factories_.find(name);
    if (it == factories_.end()) detail::registry_unknown(where, name, names());
    return it->second(detail::registry_object(spec), where, args...);
  }

  bool contains(const std::string& name) const { return factories_.count(name) != 0; }

  /// Registered names, sorted.
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (const auto& kv : factories_) out.push_back(kv.first);
    return out;
  }
  /// Registered names in registration order (for messages that list choices as written).
  const std::vector<std::string>& names_in_order() const { return order_; }

  const std::string& kind() const { return kind_; }

 private:
  std::string kind_;
  std::map<std::string, Factory> factories_;
  std::vector<std::string> order_;
};

/// "a, b or c": a list of choices for messages.
std::string one_of(const std::vector<std::string>& choices);

}  // namespace twins

#pragma once
// One registry per kind of component (losses, backbones, heads, ...), filled explicitly in one
// function per kind: no self-registering statics, which the linker drops from static libraries.
#include <nlohmann/json_fwd.hpp>

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace twins {
namespace detail {
std::string registry_type_of(const nlohmann::json& spec, const std::string& kind);
[[noreturn]] void registry_unknown(const std::string& kind, const std::string& name,
                                   const std::vector<std::string>& valid);
}  // namespace detail

/// Maps a name to a factory building a `T` from its JSON object ({"type": name, ...}).
template <class T>
class Registry {
 public:
  using Factory = std::function<std::shared_ptr<T>(const nlohmann::json&)>;

  /// `kind` names the registry in messages ("loss", "backbone", ...).
  explicit Registry(std::string kind) : kind_(std::move(kind)) {}

  void add(const std::string& name, Factory factory) { factories_[name] = std::move(factory); }

  /// Builds the component named by spec["type"]; unknown names list the valid ones.
  std::shared_ptr<T> create(const nlohmann::json& spec) const {
    const std::string name = detail::registry_type_of(spec, kind_);
    auto it = factories_.find(name);
    if (it == factories_.end()) detail::registry_unknown(kind_, name, names());
    return it->second(spec);
  }

  bool contains(const std::string& name) const { return factories_.count(name) != 0; }

  /// Registered names, sorted.
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (const auto& kv : factories_) out.push_back(kv.first);
    return out;
  }

  const std::string& kind() const { return kind_; }

 private:
  std::string kind_;
  std::map<std::string, Factory> factories_;
};

}  // namespace twins

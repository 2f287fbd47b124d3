// The loss registry: every method twins trains, one line each. A loss file (losses/<name>.cpp)
// defines make_<name>_loss(spec, path); TWINS_LOSS(<name>) declares and registers it.
#include <nlohmann/json.hpp>

#include "twins/losses.h"
#include "twins/registry.h"

// A block-scope declaration names the function of the enclosing namespace (twins::losses).
#define TWINS_LOSS(name)                                                                         \
  std::shared_ptr<Loss> make_##name##_loss(const nlohmann::json& spec, const std::string& path); \
  r.add(#name, make_##name##_loss)

namespace twins::losses {

static const Registry<Loss>& registry() {
  static const Registry<Loss> r = [] {
    Registry<Loss> r("loss");
    TWINS_LOSS(vicreg);
    TWINS_LOSS(barlow_twins);
    TWINS_LOSS(byol);
    TWINS_LOSS(simsiam);
    return r;
  }();
  return r;
}

std::shared_ptr<Loss> create_loss(const nlohmann::json& spec, const std::string& path) {
  return registry().create(spec, path);
}

std::vector<std::string> loss_names() { return registry().names(); }

}  // namespace twins::losses

// Config text and --set overrides: JSON parsing with comments, the recipe and evaluation
// readers, the view and loss factories, and backbone costing (nothing is allocated by size).
// Input: an override ("a.b=value") up to the first NUL byte, then the config text.
#include <cstring>

#include "tests/fuzz/fuzz_util.h"
#include "twins/augment/pipeline.h"
#include "twins/config.h"
#include "twins/eval/evaluate.h"
#include "twins/losses.h"
#include "twins/models/network.h"
#include "twins/train/recipe.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view text = twins::fuzz::as_text(data, size);
  std::string override_text;
  if (const size_t nul = text.find('\0'); nul != std::string_view::npos) {
    override_text = std::string(text.substr(0, nul));
    text.remove_prefix(nul + 1);
  }
  try {
    nlohmann::json config = twins::config::parse_json(text, "fuzz.json", /*comments=*/true);
    if (!override_text.empty()) twins::config::apply_override(config, override_text);
    try {
      const auto recipe = twins::train::Recipe::parse(config);
      twins::augment::parse_views(recipe.views, "views");
      twins::models::backbone_state_elements(recipe.backbone, "model.backbone");
    } catch (const std::exception&) {
    }
    try {
      twins::eval::EvalConfig::parse(config);
    } catch (const std::exception&) {
    }
    if (config.is_object() && config.contains("loss")) twins::losses::create_loss(config["loss"]);
  } catch (const std::exception&) {
  }
  return 0;
}

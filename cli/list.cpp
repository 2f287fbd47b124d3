// twins list [kind]: the registered components of a kind, one name per line; without a kind,
// every kind under its heading.
#include <iostream>
#include <map>
#include <string>

#include "cli/commands.h"
#include "twins/augment/pipeline.h"
#include "twins/data/dataset.h"
#include "twins/losses.h"
#include "twins/models/network.h"
#include "twins/train/recipe.h"

namespace twins::cli {

Command add_list(CLI::App& app) {
  using Names = std::vector<std::string> (*)();
  static const std::map<std::string, Names> kinds = {
      {"losses", losses::loss_names},    {"backbones", models::backbone_names},
      {"heads", models::head_names},     {"augmentations", augment::op_names},
      {"datasets", data::dataset_names}, {"optimizers", train::optimizer_names}};
  auto* sub = app.add_subcommand("list", "List registered components, one name per line (losses are the methods)");
  auto what = std::make_shared<std::string>();
  std::vector<std::string> choices;
  for (const auto& kv : kinds) choices.push_back(kv.first);
  sub->add_option("what", *what, "losses, backbones, heads, augmentations, datasets or optimizers (default: all)")
      ->check(CLI::IsMember(choices));
  return [what]() {
    if (!what->empty()) {
      for (const auto& n : kinds.at (*what)()) std::cout << n << "\n";
      return 0;
    }
    for (const auto& [kind, names] : kinds) {
      std::cout << kind << ":\n";
      for (const auto& n : names()) std::cout << "  " << n << "\n";
    }
    return 0;
  };
}

}  // namespace twins::cli

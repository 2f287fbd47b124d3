// twins list losses|backbones|heads: the registered names, one per line.
#include <iostream>
#include <string>

#include "cli/commands.h"
#include "twins/augment/pipeline.h"
#include "twins/data/dataset.h"
#include "twins/losses.h"
#include "twins/models/network.h"

namespace twins::cli {

Command add_list(CLI::App& app) {
  auto* sub = app.add_subcommand("list", "List registered components, one name per line");
  auto what = std::make_shared<std::string>();
  sub->add_option("what", *what, "losses, backbones, heads, augmentations or datasets")
      ->required()
      ->check(CLI::IsMember({"losses", "backbones", "heads", "augmentations", "datasets"}));
  return [what]() {
    std::vector<std::string> names = *what == "losses"          ? losses::loss_names()
                                     : *what == "backbones"     ? models::backbone_names()
                                     : *what == "heads"         ? models::head_names()
                                     : *what == "augmentations" ? augment::op_names()
                                                                : data::dataset_names();
    for (const auto& n : names) std::cout << n << "\n";
    return 0;
  };
}

}  // namespace twins::cli

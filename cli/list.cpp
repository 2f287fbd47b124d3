// twins list losses|backbones|heads: the registered names, one per line.
#include <iostream>
#include <string>

#include "cli/commands.h"
#include "twins/losses.h"
#include "twins/models/network.h"

namespace twins::cli {

Command add_list(CLI::App& app) {
  auto* sub = app.add_subcommand("list", "List registered components, one name per line");
  auto what = std::make_shared<std::string>();
  sub->add_option("what", *what, "losses, backbones or heads")
      ->required()
      ->check(CLI::IsMember({"losses", "backbones", "heads"}));
  return [what]() {
    std::vector<std::string> names = *what == "losses"      ? losses::loss_names()
                                     : *what == "backbones" ? models::backbone_names()
                                                            : models::head_names();
    for (const auto& n : names) std::cout << n << "\n";
    return 0;
  };
}

}  // namespace twins::cli

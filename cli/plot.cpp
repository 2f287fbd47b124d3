// twins plot: the pictures of a run folder (training curves; embeddings if features exist).
#include <filesystem>
#include <iostream>

#include "cli/commands.h"
#include "twins/eval/plots.h"

namespace twins::cli {

Command add_plot(CLI::App& app) {
  auto run = std::make_shared<std::string>();
  auto* sub = app.add_subcommand("plot", "Draw a run folder's training curves (curves.svg)");
  sub->add_option("run", *run, "Run folder")->required();
  return [run] {
    const auto metrics = std::filesystem::path(*run) / "metrics.jsonl";
    const auto svg = std::filesystem::path(*run) / "curves.svg";
    eval::write_training_curves(metrics.string(), svg.string());
    std::cout << "wrote " << svg.string() << "\n";
    return 0;
  };
}

}  // namespace twins::cli

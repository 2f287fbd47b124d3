// twins linear-probe and twins knn: the standard measures of a frozen backbone.
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>

#include "cli/commands.h"
#include "twins/config.h"
#include "twins/eval/evaluate.h"
#include "twins/eval/plots.h"
#include "twins/io.h"

namespace twins::cli {
namespace {
namespace fs = std::filesystem;

struct EvalArgs {
  std::string backbone, config, out;
  std::vector<std::string> set;
};

// probe.json / knn.json go to --out, else the run folder, else the backbone file's folder.
std::string output_dir(const EvalArgs& a) {
  if (!a.out.empty()) return a.out;
  if (a.backbone.rfind("random:", 0) == 0) return "runs/random-init";
  if (fs::is_directory(a.backbone)) return a.backbone;
  const auto parent = fs::path(a.backbone).parent_path();
  return parent.empty() ? "." : parent.string();
}

int run_linear_probe(const EvalArgs& a) {
  const auto cfg = eval::EvalConfig::parse(config::load_config(a.config, a.set));
  const std::string out = output_dir(a);
  std::cerr << "linear probe of " << a.backbone << " (" << (cfg.probe.augment ? "augmented" : "cached features")
            << ")\n";
  const auto run = eval::run_linear_probe(a.backbone, cfg, out);
  const auto& r = run.result;
  const nlohmann::json result = {{"backbone", a.backbone},
                                 {"config", a.config},
                                 {"protocol", run.protocol},
                                 {"num_classes", run.num_classes},
                                 {"feature_dim", run.train.features.size(1)},
                                 {"train_samples", run.train.features.size(0)},
                                 {"test_samples", run.test.features.size(0)},
                                 {"epochs", cfg.probe.epochs},
                                 {"top1", r.test.top1},
                                 {"top5", r.test.top5},
                                 {"train_top1", r.train.top1},
                                 {"probe_seconds", r.seconds}};
  fs::create_directories(out);
  io::write_file_atomic((fs::path(out) / "probe.json").string(), result.dump(2) + "\n");
  eval::write_projection(run.test.features, run.test.labels, (fs::path(out) / "embeddings-test.svg").string(),
                         "test features of " + a.backbone);
  std::cout << std::fixed << std::setprecision(2) << "linear probe: top-1 " << r.test.top1 << "%, top-5 " << r.test.top5
            << "% (train top-1 " << r.train.top1 << "%; " << run.protocol << ", " << std::setprecision(0) << r.seconds
            << " s); written to " << (fs::path(out) / "probe.json").string() << "\n";
  return 0;
}

int run_knn(const EvalArgs& a) {
  const auto cfg = eval::EvalConfig::parse(config::load_config(a.config, a.set));
  const std::string out = output_dir(a);
  int64_t classes = 0;
  std::cerr << "kNN of " << a.backbone << "\n";
  const auto [train, test] = eval::eval_features(a.backbone, cfg, out, &classes);
  const auto r = eval::knn(train, test, classes, cfg.knn, eval::resolve_eval_device(cfg.device));
  nlohmann::json result = {{"backbone", a.backbone},
                           {"config", a.config},
                           {"temperature", cfg.knn.temperature},
                           {"k", nlohmann::json::object()}};
  std::cout << std::fixed << std::setprecision(2);
  for (const auto& [k, acc] : r) {
    result["k"][std::to_string(k)] = {{"top1", acc.top1}, {"top5", acc.top5}};
    std::cout << "kNN k=" << k << " T=" << cfg.knn.temperature << ": top-1 " << acc.top1 << "%, top-5 " << acc.top5
              << "%\n";
  }
  fs::create_directories(out);
  io::write_file_atomic((fs::path(out) / "knn.json").string(), result.dump(2) + "\n");
  return 0;
}

void add_common(CLI::App* sub, EvalArgs& a) {
  sub->add_option("--backbone", a.backbone,
                  "backbone.safetensors, a run folder, a torchvision ResNet in safetensors, or random:<backbone json>")
      ->required();
  sub->add_option("--config", a.config, "Eval JSON (configs/eval/*.json)")->required();
  sub->add_option("--set", a.set, "Override a config key: a.b=value (repeatable)");
  sub->add_option("--out", a.out, "Output folder (default: the run folder or the backbone's folder)");
}

}  // namespace

Command add_linear_probe(CLI::App& app) {
  auto a = std::make_shared<EvalArgs>();
  add_common(app.add_subcommand("linear-probe", "Linear classifier on frozen features: top-1/top-5, probe.json"), *a);
  return [a] { return run_linear_probe(*a); };
}

Command add_knn(CLI::App& app) {
  auto a = std::make_shared<EvalArgs>();
  add_common(app.add_subcommand("knn", "Weighted kNN on frozen features (DINO protocol): knn.json"), *a);
  return [a] { return run_knn(*a); };
}

}  // namespace twins::cli

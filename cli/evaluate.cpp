// twins linear-probe and twins knn: the standard measures of a frozen backbone; twins finetune:
// the backbone trained with a classifier on (a part of) the labels. In finetune and the augmented
// linear probe, SIGINT/SIGTERM finish the batch, write a checkpoint and exit 0; the same command
// continues.
#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <optional>
#include <sstream>

#include "cli/commands.h"
#include "twins/config.h"
#include "twins/distributed/communicator.h"
#include "twins/eval/evaluate.h"
#include "twins/eval/plots.h"
#include "twins/io.h"
#include "twins/models/safetensors.h"
#include "twins/models/weights.h"
#include "twins/runtime.h"
#include "twins/version.h"

namespace twins::cli {
namespace {
namespace fs = std::filesystem;

struct EvalArgs {
  std::string backbone, config, out;
  std::vector<std::string> set;
  std::optional<double> train_percent;  // twins finetune's --train-percent
  std::string subset;                   // and --subset
  int64_t stop_after_epochs = 0;        // and --stop-after-epochs
  LaunchPlan launch;                    // the ranks of a data-parallel evaluation
};

// probe.json / knn.json / finetune.json (and the fine-tuned network) go to --out, else the run
// folder, else the backbone file's folder.
std::string output_dir(const EvalArgs& a) {
  if (!a.out.empty()) return a.out;
  if (a.backbone.rfind("random:", 0) == 0) return "runs/random-init";
  if (fs::is_directory(a.backbone)) return a.backbone;
  const auto parent = fs::path(a.backbone).parent_path();
  return parent.empty() ? "." : parent.string();
}

// This process's rank of a data-parallel evaluation when a launcher started it, else null;
// `cfg.device` becomes the rank's own GPU (the local rank's) where it names CUDA without an index.
std::shared_ptr<distributed::Communicator> join_job(eval::EvalConfig& cfg) {
  const distributed::Environment env = distributed::detect_environment();
  if (env.launcher == "none") return nullptr;
  const at::Device device = resolve_rank_device(cfg.device, env.local_rank, "device");
  cfg.device = device.str();
  distributed::CommunicatorOptions co;
  co.backend = cfg.dist_backend, co.timeout_s = cfg.dist_timeout_s,
  co.heartbeat_timeout_s = cfg.dist_heartbeat_timeout_s;
  return distributed::Communicator::create(env, device, co);
}

// A scheduler's preemption (SIGTERM) or Ctrl-C during an evaluation that keeps its state: every
// rank finishes its batch and the state is checkpointed there (catch_stop_signals).
const std::atomic<bool>* stop_on_signals(bool speaks) { return stop_flag_on_signals(speaks); }

// "<what>: stopped at batch b of epoch e of E (state in <checkpoint>); ..." or "... after epoch e".
void say_stopped(const std::string& what, int64_t stopped_at_batch, int64_t epochs_done, int64_t epochs,
                 const std::string& checkpoint) {
  std::cout << what << ": stopped ";
  if (stopped_at_batch > 0)
    std::cout << "at batch " << stopped_at_batch << " of epoch " << epochs_done + 1;
  else
    std::cout << "after epoch " << epochs_done;
  std::cout << " of " << epochs << " (state in " << checkpoint << "); the same command continues it\n";
}

// Whether this process speaks for the evaluation: a single process, or rank 0 of the job.
bool main_rank(const std::shared_ptr<distributed::Communicator>& comm) { return !comm || comm->rank() == 0; }

// The launcher's part of an evaluation command: starts the ranks (--nproc-per-node) and returns
// the job's exit code, or nullopt when this process is to run the command itself.
std::optional<int> launch(const EvalArgs& a) {
  a.launch.check();
  if (a.launch.nproc_per_node > 0) return launch_local(a.launch, 5.0);
  return std::nullopt;
}

int run_linear_probe(const EvalArgs& a) {
  if (const auto launched = launch(a)) return *launched;
  auto cfg = eval::EvalConfig::parse(config::load_config(a.config, a.set));
  const auto comm = join_job(cfg);
  const std::string out = output_dir(a);
  if (main_rank(comm))
    std::cerr << "linear probe of " << a.backbone << " (" << (cfg.probe.augment ? "augmented" : "cached features")
              << ")\n";
  if (a.stop_after_epochs > 0 && !cfg.probe.augment)
    throw std::invalid_argument(
        "--stop-after-epochs: only probe.augment (the probe through the backbone) keeps its state between calls; the "
        "probe on cached features starts over");
  eval::LinearProbeControl control;
  if (cfg.probe.augment) control.checkpoint = (fs::path(out) / "probe-checkpoint.safetensors").string();
  control.stop_after_epochs = a.stop_after_epochs;
  if (cfg.probe.augment) control.stop = stop_on_signals(main_rank(comm));
  const auto run = eval::run_linear_probe(a.backbone, cfg, out, comm, control);
  if (!run.main_rank) return 0;  // rank 0 trains the probe and writes
  if (!run.finished) {
    say_stopped("linear probe", run.stopped_at_batch, run.epochs_done, cfg.probe.epochs, control.checkpoint);
    return 0;
  }
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
                                 {"probe_seconds", r.seconds},
                                 {"feature_seconds", run.feature_seconds},
                                 {"resumed_from_epoch", run.start_epoch},
                                 {"resumed_from_batch", run.start_batch}};
  fs::create_directories(out);
  io::write_file_atomic((fs::path(out) / "probe.json").string(), result.dump(2) + "\n");
  if (!control.checkpoint.empty()) fs::remove(control.checkpoint);  // its results are kept
  eval::write_projection(run.test.features, run.test.labels, (fs::path(out) / "embeddings-test.svg").string(),
                         "test features of " + a.backbone);
  std::cout << std::fixed << std::setprecision(2) << "linear probe: top-1 " << r.test.top1 << "%, top-5 " << r.test.top5
            << "% (train top-1 " << r.train.top1 << "%; " << run.protocol << ", " << std::setprecision(0) << r.seconds
            << " s); written to " << (fs::path(out) / "probe.json").string() << "\n";
  return 0;
}

int run_knn(const EvalArgs& a) {
  if (const auto launched = launch(a)) return *launched;
  auto cfg = eval::EvalConfig::parse(config::load_config(a.config, a.set));
  const auto comm = join_job(cfg);
  const std::string out = output_dir(a);
  int64_t classes = 0;
  if (main_rank(comm)) std::cerr << "kNN of " << a.backbone << "\n";
  const auto net = eval::open_backbone(a.backbone);
  const auto start = std::chrono::steady_clock::now();  // (as the probe's feature_seconds)
  const auto [train, test] = eval::eval_features(*net, cfg, out, &classes, comm);
  if (!main_rank(comm)) return 0;  // rank 0 scores the gathered features and writes
  using Seconds = std::chrono::duration<double>;
  const double feature_seconds = Seconds(std::chrono::steady_clock::now() - start).count();
  const auto scoring = std::chrono::steady_clock::now();
  const auto r = eval::knn(train, test, classes, cfg.knn, eval::resolve_eval_device(cfg.device));
  nlohmann::json result = {{"backbone", a.backbone},
                           {"config", a.config},
                           {"num_classes", classes},
                           {"feature_dim", train.features.size(1)},
                           {"train_samples", train.features.size(0)},
                           {"test_samples", test.features.size(0)},
                           {"temperature", cfg.knn.temperature},
                           {"feature_seconds", feature_seconds},
                           {"knn_seconds", Seconds(std::chrono::steady_clock::now() - scoring).count()},
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

int run_finetune(const EvalArgs& a) {
  if (const auto launched = launch(a)) return *launched;
  std::vector<std::string> set = a.set;
  if (a.train_percent) {
    std::ostringstream v;
    v << std::setprecision(17) << *a.train_percent;
    set.push_back("finetune.train_percent=" + v.str());
  }
  if (!a.subset.empty()) set.push_back("finetune.subset=" + nlohmann::json(a.subset).dump());
  auto cfg = eval::EvalConfig::parse(config::load_config(a.config, set));
  const std::string out = output_dir(a);
  eval::FinetuneControl control;
  control.communicator = join_job(cfg);
  if (main_rank(control.communicator)) std::cerr << "finetune of " << a.backbone << "\n";
  fs::create_directories(out);
  control.checkpoint = (fs::path(out) / "finetune-checkpoint.safetensors").string();
  control.stop_after_epochs = a.stop_after_epochs;
  control.metrics = (fs::path(out) / "finetune-metrics.jsonl").string();
  control.tensorboard_dir = (fs::path(out) / "finetune").string();  // TensorBoard's run "<out>/finetune"
  control.stop = stop_on_signals(main_rank(control.communicator));
  const auto run = eval::run_finetune(a.backbone, cfg, control);
  if (!run.main_rank) return 0;  // rank 0 writes and speaks for the run
  const auto& o = cfg.finetune;
  if (!run.finished) {
    say_stopped("finetune", run.stopped_at_batch, run.epochs_done, o.epochs, control.checkpoint);
    return 0;
  }
  const fs::path backbone_file = fs::path(out) / "finetuned-backbone.safetensors";
  const fs::path head_file = fs::path(out) / "finetune-head.safetensors";
  models::BackboneInfo info;
  if (a.backbone.rfind("random:", 0) != 0) info.method = models::read_backbone(a.backbone).info.method;
  info.image_size = cfg.image_size;
  info.mean = cfg.normalization.mean, info.std = cfg.normalization.std;
  info.version = TWINS_VERSION_STRING;
  info.provenance = "twins " + std::string(TWINS_VERSION_STRING) + " finetune of " + a.backbone + ": " + run.protocol;
  models::save_backbone(backbone_file.string(), *run.backbone, info);
  models::save_safetensors(head_file.string(), {{"weight", run.head_weight}, {"bias", run.head_bias}});
  nlohmann::json result = {{"backbone", a.backbone},
                           {"config", a.config},
                           {"protocol", run.protocol},
                           {"num_classes", run.num_classes},
                           {"feature_dim", run.feature_dim},
                           {"train_samples", run.train_samples},
                           {"train_percent", o.subset.empty() ? nlohmann::json(o.train_percent) : nullptr},
                           {"subset", o.subset.empty() ? nlohmann::json(nullptr) : nlohmann::json(o.subset)},
                           {"test_samples", run.test_samples},
                           {"epochs", o.epochs},
                           {"batch_size", o.batch_size},
                           {"world_size", run.world_size},
                           {"resumed_from_epoch", run.start_epoch},
                           {"resumed_from_batch", run.start_batch},
                           {"lr_backbone", o.lr_backbone},
                           {"lr_head", o.lr_head},
                           {"weight_decay", o.weight_decay},
                           {"epoch_loss", run.epoch_loss},
                           {"top1", run.test.top1},
                           {"top5", run.test.top5},
                           {"seconds", run.seconds},
                           {"finetuned_backbone", backbone_file.string()},
                           {"head", head_file.string()}};
  // With finetune.eval_every_epochs: every score, and the best one, as the official evaluate.py
  // reports it (chosen on the test set).
  std::string best_said;
  if (!run.test_per_epoch.empty()) {
    result["test_per_epoch"] = nlohmann::json::array();
    const eval::FinetuneRun::EpochScore* best = &run.test_per_epoch.front();
    for (const auto& s : run.test_per_epoch) {
      result["test_per_epoch"].push_back({{"epoch", s.epoch}, {"top1", s.test.top1}, {"top5", s.test.top5}});
      if (s.test.top1 > best->test.top1) best = &s;
    }
    result["best_top1"] = best->test.top1;
    result["best_epoch"] = best->epoch;
    std::ostringstream said;
    said << std::fixed << std::setprecision(2) << "; best " << best->test.top1 << "% after epoch " << best->epoch
         << " (chosen on the test set, as the official evaluate.py)";
    best_said = said.str();
  }
  io::write_file_atomic((fs::path(out) / "finetune.json").string(), result.dump(2) + "\n");
  fs::remove(control.checkpoint);  // its work is kept
  std::cout << std::fixed << std::setprecision(2) << "finetune: top-1 " << run.test.top1 << "%, top-5 " << run.test.top5
            << "% (" << run.protocol << ", " << std::setprecision(0) << run.seconds << " s)" << best_said
            << "; written to " << (fs::path(out) / "finetune.json").string() << "\n";
  return 0;
}

void add_common(CLI::App* sub, EvalArgs& a) {
  sub->add_option("--backbone", a.backbone,
                  "backbone.safetensors, a run folder, a torchvision ResNet in safetensors, or random:<backbone json>")
      ->required();
  sub->add_option("--config", a.config, "Eval JSON (configs/eval/*.json)")->required();
  sub->add_option("--set", a.set, "Override a config key: a.b=value (repeatable)");
  sub->add_option("--out", a.out, "Output folder (default: the run folder or the backbone's folder)");
  a.launch.add_options(*sub);
}

}  // namespace

Command add_linear_probe(CLI::App& app) {
  auto a = std::make_shared<EvalArgs>();
  auto* sub = app.add_subcommand("linear-probe", "Linear classifier on frozen features: top-1/top-5, probe.json");
  add_common(sub, *a);
  sub->add_option("--stop-after-epochs", a->stop_after_epochs,
                  "probe.augment: stop after N epochs of this call, keeping the state in probe-checkpoint.safetensors; "
                  "the same command continues from there (as after a crash)")
      ->check(CLI::Range(int64_t{1}, int64_t{1000000}));
  return [a] { return run_linear_probe(*a); };
}

Command add_finetune(CLI::App& app) {
  auto a = std::make_shared<EvalArgs>();
  auto* sub = app.add_subcommand(
      "finetune",
      "Backbone + linear classifier trained on (a part of) the labels, as the official semi-supervised "
      "evaluation: finetune.json");
  add_common(sub, *a);
  sub->add_option("--train-percent", a->train_percent,
                  "Percent of each class's labelled training samples (finetune.train_percent; 1 and 10 are the "
                  "semi-supervised benchmarks)");
  sub->add_option("--stop-after-epochs", a->stop_after_epochs,
                  "Stop after N epochs of this call, keeping the state in finetune-checkpoint.safetensors; the same "
                  "command continues from there (as after a crash)")
      ->check(CLI::Range(int64_t{1}, int64_t{1000000}));
  sub->add_option("--subset", a->subset,
                  "File naming the training samples, one per line (e.g. SimCLR's imagenet_subsets/1percent.txt)");
  return [a] { return run_finetune(*a); };
}

Command add_knn(CLI::App& app) {
  auto a = std::make_shared<EvalArgs>();
  add_common(app.add_subcommand("knn", "Weighted kNN on frozen features (DINO protocol): knn.json"), *a);
  return [a] { return run_knn(*a); };
}

}  // namespace twins::cli

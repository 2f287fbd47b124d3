// Fine-tuning evaluation (twins finetune): which samples it trains on, that it learns, that
// lr_backbone 0 leaves the backbone exactly as it was, and its configuration errors.
#include <ATen/ATen.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>

#include "tests/test_util.h"
#include "twins/data/dataset.h"
#include "twins/data/image_io.h"
#include "twins/distributed/communicator.h"
#include "twins/eval/evaluate.h"
#include "twins/eval/features.h"
#include "twins/eval/finetune.h"
#include "twins/io.h"
#include "twins/models/resnet.h"
#include "twins/models/safetensors.h"
#include "twins/models/vit.h"
#include "twins/models/weights.h"

using namespace twins::eval;
using twins::test::check_throws_with;
namespace fs = std::filesystem;

namespace {

// Samples with the given labels; ids as an image folder's ("root/c<label>/img_<i>.png"), except
// the names in `ids` where given.
class LabelledSamples : public twins::data::Dataset {
 public:
  explicit LabelledSamples(std::vector<int64_t> labels, std::map<int64_t, std::string> ids = {})
      : labels_(std::move(labels)), ids_(std::move(ids)) {}
  int64_t size() const override { return static_cast<int64_t>(labels_.size()); }
  at::Tensor image(int64_t i) const override { return at::full({4, 4, 3}, i % 256, at::kByte); }
  int64_t label(int64_t i) const override { return labels_.at(static_cast<size_t>(i)); }
  std::string id(int64_t i) const override {
    if (const auto it = ids_.find(i); it != ids_.end()) return it->second;
    return "root/c" + std::to_string(label(i)) + "/img_" + std::to_string(i) + ".png";
  }
  int64_t num_classes() const override { return 3; }

 private:
  std::vector<int64_t> labels_;
  std::map<int64_t, std::string> ids_;
};

std::vector<int64_t> labels_50_30_3_unlabelled_5() {
  std::vector<int64_t> labels;
  for (int i = 0; i < 88; ++i) labels.push_back(i < 50 ? 0 : i < 80 ? 1 : i < 83 ? 2 : -1);
  return labels;
}

// Two classes told apart by colour (reddish and bluish noise), 16 x 16 PNGs in class folders.
void write_colour_folder(const fs::path& root, int per_class, uint64_t seed) {
  at::manual_seed(seed);
  for (int c = 0; c < 2; ++c) {
    fs::create_directories(root / ("class" + std::to_string(c)));
    for (int i = 0; i < per_class; ++i) {
      at::Tensor img = at::randint(0, 100, {16, 16, 3}, at::kInt);
      img.select(2, c == 0 ? 0 : 2).add_(150);
      twins::data::write_image((root / ("class" + std::to_string(c)) / ("img" + std::to_string(i) + ".png")).string(),
                               img.to(at::kByte));
    }
  }
}

// A colour-folder task in a fresh folder: train/ and test/ image folders, a small random ResNet
// saved as backbone.safetensors (seed `seed`), and an eval config for them without its probe or
// finetune block.
struct ColourTask {
  fs::path dir;
  std::string backbone;
  std::shared_ptr<twins::models::ResNet> network;
  nlohmann::json config;
};
ColourTask colour_task(const std::string& name, int train_per_class, int test_per_class, uint64_t seed) {
  ColourTask t;
  t.dir = twins::test::fresh_dir("finetune", name);
  write_colour_folder(t.dir / "train", train_per_class, seed);
  write_colour_folder(t.dir / "test", test_per_class, seed + 1);
  twins::models::ResNetOptions ro = twins::models::resnet_options("resnet18");
  ro.width = 8, ro.cifar_stem = true;
  at::manual_seed(seed);
  t.network = std::make_shared<twins::models::ResNet>(ro);
  t.backbone = (t.dir / "backbone.safetensors").string();
  twins::models::save_backbone(t.backbone, *t.network, twins::models::BackboneInfo{});
  t.config = {{"train_data", {{"type", "image_folder"}, {"root", (t.dir / "train").string()}}},
              {"test_data", {{"type", "image_folder"}, {"root", (t.dir / "test").string()}}},
              {"image_size", 16},
              {"normalize", {{"mean", {0.5, 0.5, 0.5}}, {"std", {0.25, 0.25, 0.25}}}},
              {"batch_size", 8},
              {"workers", 1},
              {"device", "cpu"}};
  return t;
}

}  // namespace

namespace {

// Every tensor of two backbones' states equal, bit for bit.
void check_same_weights(const twins::models::Network& a, const twins::models::Network& b) {
  const auto x = twins::models::backbone_state(a), y = twins::models::backbone_state(b);
  REQUIRE(x.size() == y.size());
  for (size_t i = 0; i < x.size(); ++i) {
    INFO(x[i].first);
    CHECK(x[i].first == y[i].first);
    CHECK(at::equal(x[i].second, y[i].second));
  }
}

// The seconds a checkpoint says the calls before it spent (`key`, checked to be there), replaced
// by 1000 s, as if those calls had run that long.
double plant_seconds(const std::string& checkpoint, const std::string& key) {
  twins::models::SafeTensorsFile file = twins::models::load_safetensors(checkpoint);
  REQUIRE(file.metadata.count(key) == 1);
  const double spent = std::stod(file.metadata[key]);
  file.metadata[key] = "1000";
  twins::models::save_safetensors(checkpoint, file.tensors, file.metadata);
  return spent;
}

}  // namespace

TEST_CASE("eval: fine-tuning takes its percentage of every class, or the samples a file names") {
  const LabelledSamples d(labels_50_30_3_unlabelled_5());
  auto class_counts = [&](const std::vector<int64_t>& chosen) {
    std::map<int64_t, int> counts;
    for (int64_t i : chosen) ++counts[d.label(i)];
    return counts;
  };
  const auto ten = select_train_samples(d, 10, "", 0);
  CHECK(class_counts(ten) == std::map<int64_t, int>{{0, 5}, {1, 3}, {2, 1}});  // 0.3 of a sample: one
  CHECK(std::is_sorted(ten.begin(), ten.end()));
  CHECK(std::set<int64_t>(ten.begin(), ten.end()).size() == ten.size());
  CHECK(select_train_samples(d, 10, "", 0) == ten);  // a function of the seed
  CHECK(select_train_samples(d, 10, "", 1) != ten);
  CHECK(select_train_samples(d, 100, "", 0).size() == 83);  // every labelled sample, no unlabelled one
  check_throws_with<std::invalid_argument>([&] { select_train_samples(d, 0, "", 0); }, "finetune.train_percent");

  const fs::path dir = twins::test::fresh_dir("finetune", "subset");
  const fs::path list = dir / "subset.txt";
  std::ofstream(list) << "img_3.png\r\n\nroot/c1/img_60.png\nimg_81.png  \nimg_3.png\n";
  CHECK(select_train_samples(d, 10, list.string(), 0) == std::vector<int64_t>{3, 60, 81});
  std::ofstream(dir / "unknown.txt") << "img_3.png\nimg_999.png\n";
  check_throws_with<std::runtime_error>([&] { select_train_samples(d, 10, (dir / "unknown.txt").string(), 0); },
                                        "unknown.txt line 2: \"img_999.png\" names no sample of train_data");
  std::ofstream(dir / "unlabelled.txt") << "img_85.png\n";
  check_throws_with<std::runtime_error>([&] { select_train_samples(d, 10, (dir / "unlabelled.txt").string(), 0); },
                                        "has no label");
  const LabelledSamples twins_names({0, 1}, {{0, "a/c0/same.png"}, {1, "a/c1/same.png"}});
  std::ofstream(dir / "ambiguous.txt") << "same.png\n";
  check_throws_with<std::runtime_error>(
      [&] { select_train_samples(twins_names, 10, (dir / "ambiguous.txt").string(), 0); }, "names several");
  std::ofstream(dir / "ids.txt") << "a/c1/same.png\n";
  CHECK(select_train_samples(twins_names, 10, (dir / "ids.txt").string(), 0) == std::vector<int64_t>{1});
  // An exact id goes before a file name, even one that other samples share.
  const LabelledSamples bare({0, 1, 1}, {{0, "same.png"}, {1, "a/c1/same.png"}, {2, "b/c1/same.png"}});
  CHECK(select_train_samples(bare, 10, (dir / "ambiguous.txt").string(), 0) == std::vector<int64_t>{0});
  check_throws_with<std::runtime_error>([&] { select_train_samples(d, 10, (dir / "none.txt").string(), 0); },
                                        "cannot open");

  // The subset as a dataset: the base's samples, in the order given.
  auto base = std::make_shared<LabelledSamples>(labels_50_30_3_unlabelled_5());
  const auto sub = twins::data::subset(base, {60, 3});
  REQUIRE(sub->size() == 2);
  CHECK(sub->label(0) == 1);
  CHECK(sub->id(1) == "root/c0/img_3.png");
  CHECK(at::equal(sub->image(0), base->image(60)));
  CHECK(sub->num_classes() == 3);
  check_throws_with<std::invalid_argument>([&] { twins::data::subset(base, {88}); }, "index 88 outside");
  fs::remove_all(dir);
}

TEST_CASE("eval: fine-tuning learns, and with lr_backbone 0 leaves the backbone untouched") {
  ColourTask task = colour_task("learn", 32, 8, 1);
  const fs::path& dir = task.dir;
  const auto& original = task.network;
  const std::string& backbone = task.backbone;
  nlohmann::json& config = task.config;
  config["finetune"] = {
      {"epochs", 4}, {"batch_size", 8}, {"lr_backbone", 0.02}, {"lr_head", 0.2}, {"train_percent", 50}};
  const auto before = twins::models::backbone_state(*original);
  auto same_as_before = [&](const twins::models::Network& net) {
    const auto after = twins::models::backbone_state(net);
    REQUIRE(after.size() == before.size());
    for (size_t i = 0; i < before.size(); ++i)
      if (!at::equal(after[i].second, before[i].second)) return false;
    return true;
  };

  const FinetuneRun tuned = run_finetune(backbone, EvalConfig::parse(config));
  CHECK(tuned.train_samples == 32);  // 50% of 32 per class
  CHECK(tuned.test_samples == 16);
  CHECK(tuned.num_classes == 2);
  CHECK(tuned.feature_dim == original->output_dim());
  REQUIRE(tuned.epoch_loss.size() == 4);
  INFO("losses ", tuned.epoch_loss[0], " ... ", tuned.epoch_loss[3], ", top-1 ", tuned.test.top1);
  CHECK(tuned.epoch_loss[2] + tuned.epoch_loss[3] < 2 * tuned.epoch_loss[0]);
  CHECK(tuned.test.top1 >= 75);
  CHECK(tuned.head_weight.sizes() == at::IntArrayRef{2, original->output_dim()});
  CHECK_FALSE(same_as_before(*tuned.backbone));
  CHECK(tuned.protocol.find("fine-tuned backbone, 32 training samples (50% of each class)") == 0);

  config["finetune"]["lr_backbone"] = 0.0;
  const FinetuneRun frozen = run_finetune(backbone, EvalConfig::parse(config));
  CHECK(same_as_before(*frozen.backbone));  // weights and BatchNorm statistics
  CHECK(frozen.test.top1 >= 87.5);
  CHECK(frozen.protocol.find("frozen backbone") == 0);
  fs::remove_all(dir);
}

TEST_CASE("eval: the augmented linear probe (probe.augment) learns through the frozen backbone") {
  ColourTask task = colour_task("augmented_probe", 16, 8, 8);
  const fs::path& dir = task.dir;
  const std::string& backbone = task.backbone;
  nlohmann::json& config = task.config;
  config["probe"] = {{"augment", true}, {"epochs", 5}, {"batch_size", 8}, {"crop_scale", {0.3, 1.0}}};
  const LinearProbeRun run = run_linear_probe(backbone, EvalConfig::parse(config), "");
  CHECK(run.protocol.find("augmented: random resized crop [0.3, 1] + flip") == 0);
  CHECK(run.num_classes == 2);
  INFO("top-1 ", run.result.test.top1);
  CHECK(run.result.test.top1 >= 75);
  if (!twins::test::have_gloo()) return;  // several ranks on the CPU

  // On 3 ranks (2 images each per batch of 6; 32 images: the sampler repeats one, and the last
  // batch is short), rank 0 steps the classifier on the gathered batch in one process's order
  // without the repeats: the same views and batches as one process, so the same scores.
  // (A small learning rate keeps the loss, and so the weight of every sample, far from zero.)
  config["probe"]["batch_size"] = 6, config["probe"]["epochs"] = 2, config["probe"]["lr"] = 0.002;
  const EvalConfig cfg = EvalConfig::parse(config);
  const LinearProbeRun one = run_linear_probe(backbone, cfg, "");
  auto comms = twins::distributed::Communicator::create_local_group(3);
  std::vector<LinearProbeRun> runs(3);
  twins::test::on_threads(3, [&](int r) {
    runs[static_cast<size_t>(r)] = run_linear_probe(backbone, cfg, "", comms[static_cast<size_t>(r)]);
  });
  CHECK(runs[0].main_rank);
  CHECK_FALSE(runs[1].main_rank);
  CHECK(runs[0].protocol == one.protocol + ", 3 ranks");
  CHECK(runs[0].result.test.top1 == one.result.test.top1);
  CHECK(runs[0].result.test.top5 == one.result.test.top5);
  CHECK(runs[0].result.train.top1 == one.result.train.top1);
  REQUIRE(one.head_weight.defined());
  CHECK(twins::test::max_rel_error(runs[0].head_weight, one.head_weight) < 1e-5);
  CHECK(twins::test::max_rel_error(runs[0].head_bias, one.head_bias) < 1e-5);

  // Stopped after an epoch and resumed from its checkpoint: the uninterrupted classifier, bit for
  // bit in one process; a checkpoint of 3 ranks resumed by one process, and one process's by 3
  // ranks, within float rounding.
  LinearProbeControl control;
  control.checkpoint = (dir / "probe" / "probe-checkpoint.safetensors").string();
  control.stop_after_epochs = 1;
  const LinearProbeRun stopped = run_linear_probe(backbone, cfg, "", nullptr, control);
  CHECK_FALSE(stopped.finished);
  CHECK(stopped.epochs_done == 1);
  REQUIRE(fs::exists(control.checkpoint));
  CHECK(plant_seconds(control.checkpoint, "twins_probe_seconds") > 0);
  control.stop_after_epochs = 0;
  const LinearProbeRun resumed = run_linear_probe(backbone, cfg, "", nullptr, control);
  CHECK(resumed.finished);
  CHECK(resumed.start_epoch == 1);
  CHECK(resumed.result.seconds >= 1000);  // probe.json's probe_seconds: the calls before count
  CHECK(at::equal(resumed.head_weight, one.head_weight));
  CHECK(at::equal(resumed.head_bias, one.head_bias));
  CHECK(resumed.result.test.top1 == one.result.test.top1);
  // Stopped within an epoch (a stop requested: after the call's first batch), twice, and resumed
  // with a checkpoint every 4 batches: the uninterrupted classifier, bit for bit; the same with
  // the stop asked of rank 2 of 3 alone (every rank stops after that batch), resumed by one process.
  fs::remove(control.checkpoint);
  std::atomic<bool> stop{true};
  control.stop = &stop;
  for (int64_t b = 1; b <= 2; ++b) {
    const LinearProbeRun part = run_linear_probe(backbone, cfg, "", nullptr, control);
    CHECK_FALSE(part.finished);
    CHECK(part.start_batch == b - 1);
    CHECK(part.stopped_at_batch == b);
    CHECK(twins::models::load_safetensors(control.checkpoint).metadata.at("twins_probe_batches_done") ==
          std::to_string(b));
  }
  {  // a place past the epoch's end is refused, naming the key
    const auto kept = twins::models::load_safetensors(control.checkpoint);
    auto file = kept;
    file.metadata["twins_probe_batches_done"] = "6";
    twins::models::save_safetensors(control.checkpoint, file.tensors, file.metadata);
    check_throws_with<std::runtime_error>([&] { run_linear_probe(backbone, cfg, "", nullptr, control); },
                                          "malformed twins_probe_batches_done (batch 6 of an epoch of 6");
    twins::models::save_safetensors(control.checkpoint, kept.tensors, kept.metadata);
  }
  stop = false;
  nlohmann::json every = config;
  every["probe"]["checkpoint_every_steps"] = 4;
  const LinearProbeRun rest = run_linear_probe(backbone, EvalConfig::parse(every), "", nullptr, control);
  CHECK(rest.finished);
  CHECK(rest.start_batch == 2);
  CHECK(at::equal(rest.head_weight, one.head_weight));
  CHECK(at::equal(rest.head_bias, one.head_bias));
  fs::remove(control.checkpoint);
  {
    std::atomic<bool> stops[3] = {false, false, true};
    twins::test::on_threads(3, [&](int r) {
      LinearProbeControl mine = control;
      mine.stop = &stops[r];
      runs[static_cast<size_t>(r)] = run_linear_probe(backbone, cfg, "", comms[static_cast<size_t>(r)], mine);
    });
    for (const auto& run3 : runs) {
      CHECK_FALSE(run3.finished);
      CHECK(run3.stopped_at_batch == 1);
    }
  }
  const LinearProbeRun after_ranks = run_linear_probe(backbone, cfg, "", nullptr, control);
  CHECK(after_ranks.start_batch == 1);
  CHECK(twins::test::max_rel_error(after_ranks.head_weight, one.head_weight) < 1e-5);
  control.stop = nullptr;
  fs::remove(control.checkpoint);
  control.stop_after_epochs = 1;
  REQUIRE_FALSE(run_linear_probe(backbone, cfg, "", nullptr, control).finished);

  // The last epoch writes no checkpoint: the one after epoch 1 is still there, and resumed again.
  control.stop_after_epochs = 1;
  twins::test::on_threads(3, [&](int r) {
    runs[static_cast<size_t>(r)] = run_linear_probe(backbone, cfg, "", comms[static_cast<size_t>(r)], control);
  });
  for (const auto& run3 : runs) {
    CHECK(run3.finished);  // from epoch 1: nothing left to stop after
    CHECK(run3.start_epoch == 1);
  }
  CHECK(twins::test::max_rel_error(runs[0].head_weight, one.head_weight) < 1e-5);
  fs::remove(control.checkpoint);
  twins::test::on_threads(3, [&](int r) {
    runs[static_cast<size_t>(r)] = run_linear_probe(backbone, cfg, "", comms[static_cast<size_t>(r)], control);
  });
  CHECK_FALSE(runs[0].finished);
  CHECK_FALSE(runs[2].finished);
  control.stop_after_epochs = 0;
  const LinearProbeRun from_ranks = run_linear_probe(backbone, cfg, "", nullptr, control);
  CHECK(from_ranks.start_epoch == 1);
  CHECK(twins::test::max_rel_error(from_ranks.head_weight, one.head_weight) < 1e-5);
  // A checkpoint of other settings is refused, naming it.
  config["probe"]["lr"] = 0.003;
  check_throws_with<std::runtime_error>(
      [&] { run_linear_probe(backbone, EvalConfig::parse(config), "", nullptr, control); },
      control.checkpoint + " was written for another backbone or other settings");
  config["probe"]["lr"] = 0.002;

  // The global batch must divide over the ranks.
  config["probe"]["batch_size"] = 7;
  const EvalConfig odd = EvalConfig::parse(config);
  std::vector<std::string> errors(3);
  twins::test::on_threads(3, [&](int r) {
    try {
      run_linear_probe(backbone, odd, "", comms[static_cast<size_t>(r)]);
    } catch (const std::invalid_argument& e) {
      errors[static_cast<size_t>(r)] = e.what();
    }
  });
  for (const auto& e : errors) CHECK(e.find("probe.batch_size: 7 is the global batch") == 0);
  fs::remove_all(dir);
}

TEST_CASE("eval: fine-tuning resumed from its checkpoint gives the uninterrupted result") {
  ColourTask task = colour_task("resume", 8, 4, 5);
  const fs::path& dir = task.dir;
  const std::string& backbone = task.backbone;
  nlohmann::json& config = task.config;
  config["finetune"] = {{"epochs", 3}, {"batch_size", 4}, {"lr_backbone", 0.02}, {"lr_head", 0.2}};
  config["workers"] = 2;
  const FinetuneRun unscored = run_finetune(backbone, EvalConfig::parse(config));
  CHECK(unscored.test_per_epoch.empty());
  // Scored after every epoch (the official evaluate.py's best-epoch report): the same training.
  config["finetune"]["eval_every_epochs"] = 1;
  const EvalConfig cfg = EvalConfig::parse(config);
  const FinetuneRun whole = run_finetune(backbone, cfg);
  CHECK(whole.finished);
  CHECK(at::equal(whole.head_weight, unscored.head_weight));
  CHECK(whole.test.top1 == unscored.test.top1);
  REQUIRE(whole.test_per_epoch.size() == 3);
  CHECK(whole.test_per_epoch[2].epoch == 3);
  CHECK(whole.test_per_epoch[2].test.top1 == whole.test.top1);

  FinetuneControl control;
  control.checkpoint = (dir / "out" / "finetune-checkpoint.safetensors").string();
  control.stop_after_epochs = 2;
  control.metrics = (dir / "out" / "finetune-metrics.jsonl").string();
  control.tensorboard_dir = (dir / "out" / "tb").string();
  const FinetuneRun first = run_finetune(backbone, cfg, control);
  CHECK_FALSE(first.finished);
  CHECK(first.epochs_done == 2);
  REQUIRE(fs::exists(control.checkpoint));
  // As if the run had died after logging epoch 3 but before checkpointing it: the resumed run
  // drops that line and logs the epoch again.
  twins::io::AppendFile(control.metrics).append("{\"epoch\":3,\"loss\":99}\n");
  CHECK(plant_seconds(control.checkpoint, "twins_finetune_seconds") > 0);
  control.stop_after_epochs = 0;
  const FinetuneRun resumed = run_finetune(backbone, cfg, control);
  CHECK(resumed.finished);
  CHECK(resumed.start_epoch == 2);
  CHECK(resumed.seconds >= 1000);  // finetune.json's seconds: the calls before count
  CHECK(resumed.epoch_loss == whole.epoch_loss);
  CHECK(at::equal(resumed.head_weight, whole.head_weight));
  REQUIRE(resumed.test_per_epoch.size() == 3);  // the first two from the checkpoint
  for (size_t e = 0; e < 3; ++e) {
    CHECK(resumed.test_per_epoch[e].epoch == whole.test_per_epoch[e].epoch);
    CHECK(resumed.test_per_epoch[e].test.top1 == whole.test_per_epoch[e].test.top1);
    CHECK(resumed.test_per_epoch[e].test.top5 == whole.test_per_epoch[e].test.top5);
  }
  check_same_weights(*whole.backbone, *resumed.backbone);
  CHECK(resumed.test.top1 == whole.test.top1);
  // The per-epoch log: one line per epoch over both calls, the numbers of the result.
  std::vector<nlohmann::json> lines;
  {
    std::ifstream in(control.metrics);
    for (std::string line; std::getline(in, line);) lines.push_back(nlohmann::json::parse(line));
  }
  REQUIRE(lines.size() == 3);
  for (size_t e = 0; e < 3; ++e) {
    CAPTURE(e);
    CHECK(lines[e]["epoch"] == e + 1);
    CHECK(lines[e]["epochs"] == 3);
    CHECK(lines[e]["loss"].get<double>() == whole.epoch_loss[e]);
    CHECK(lines[e]["test_top1"].get<double>() == whole.test_per_epoch[e].test.top1);
    CHECK(lines[e]["test_top5"].get<double>() == whole.test_per_epoch[e].test.top5);
    CHECK(lines[e]["lr_head"].get<double>() <= 0.2);
    CHECK(lines[e].contains("epoch_seconds"));
  }
  CHECK(lines[0]["lr_head"].get<double>() == 0.2);  // the cosine schedule's start
  int event_files = 0;                              // one per call
  for (const auto& entry : fs::directory_iterator(control.tensorboard_dir))
    event_files += entry.path().filename().string().rfind("events.out.tfevents.", 0) == 0 && fs::file_size(entry) > 0;
  CHECK(event_files == 2);

  // A checkpoint from other settings is not taken for this run's.
  config["finetune"]["lr_head"] = 0.1;
  check_throws_with<std::runtime_error>([&] { run_finetune(backbone, EvalConfig::parse(config), control); },
                                        "was written for another backbone or other settings");
  fs::remove_all(dir);
}

TEST_CASE("eval: features extracted in shares over ranks are gathered on rank 0 in dataset order") {
  if (!twins::test::have_gloo()) return;  // several ranks on the CPU
  auto network = [] {
    twins::models::ResNetOptions ro = twins::models::resnet_options("resnet18");
    ro.width = 8, ro.cifar_stem = true;
    at::manual_seed(3);
    return std::make_shared<twins::models::ResNet>(ro);
  };
  twins::augment::Normalization norm;
  norm.mean = {0.5, 0.5, 0.5}, norm.std = {0.25, 0.25, 0.25};
  ExtractOptions xo;
  xo.batch_size = 16, xo.workers = 1, xo.progress = false;
  xo.gather_bytes = 4 * 64 * 3 * 5;  // 5 rows of 64 floats from each of 3 ranks per collective
  // 88 samples (5 unlabelled) over 3 ranks (30, 29, 29), and 2 samples over 3 (rank 2 has none).
  for (const int64_t n : {88, 2}) {
    CAPTURE(n);
    std::vector<int64_t> labels = labels_50_30_3_unlabelled_5();
    labels.resize(static_cast<size_t>(n));
    const auto dataset = std::make_shared<LabelledSamples>(labels);
    const auto view = eval_view(*dataset, 4, norm);
    const Features one = extract_features(*network(), dataset, view, at::kCPU, xo);
    REQUIRE(network()->output_dim() == 64);
    auto comms = twins::distributed::Communicator::create_local_group(3);
    std::vector<std::shared_ptr<twins::models::ResNet>> nets{network(), network(), network()};
    std::vector<Features> got(3);
    twins::test::on_threads(3, [&](int r) {
      got[static_cast<size_t>(r)] = extract_features_shared(*nets[static_cast<size_t>(r)], dataset, view, at::kCPU, xo,
                                                            *comms[static_cast<size_t>(r)]);
    });
    REQUIRE(got[0].features.defined());
    CHECK(got[0].features.sizes() == one.features.sizes());
    CHECK(at::equal(got[0].labels, one.labels));
    CHECK(twins::test::max_rel_error(got[0].features, one.features) < 1e-5);
    CHECK_FALSE(got[1].features.defined());
    CHECK_FALSE(got[2].labels.defined());
  }
}

TEST_CASE("eval: cached features are served again, and not once the data's files changed, even as many or in place") {
  ColourTask task = colour_task("cache", 4, 3, 23);
  const EvalConfig c = EvalConfig::parse(task.config);
  const fs::path cache = task.dir / "out";
  int64_t classes = 0;
  const auto [train, test] = eval_features(task.backbone, c, cache.string(), &classes);
  CHECK(classes == 2);
  REQUIRE(train.features.size(0) == 8);
  std::vector<fs::path> files;
  for (const auto& entry : fs::directory_iterator(cache)) files.push_back(entry.path());
  REQUIRE(files.size() == 2);  // features-train-<key>.safetensors, features-test-<key>.safetensors
  // Served from the cache: planted zeros come back.
  for (const auto& file : files) {
    const auto f = twins::models::load_safetensors(file.string());
    twins::models::save_safetensors(file.string(),
                                    {{"features", at::zeros_like(f.at("features"))}, {"labels", f.at("labels")}});
  }
  const auto [cached_train, cached_test] = eval_features(task.backbone, c, cache.string(), &classes);
  CHECK(cached_train.features.abs().sum().item<double>() == 0);
  CHECK(cached_test.features.abs().sum().item<double>() == 0);
  // One training image replaced by another (same name, same number of images): the training
  // features are extracted afresh, as without a cache; the test set's are still served.
  const fs::path replaced = task.dir / "train" / "class0" / "img0.png";
  twins::data::write_image(replaced.string(), at::full({16, 16, 3}, 7, at::kByte));
  const auto [fresh_train, fresh_test] = eval_features(task.backbone, c, "", &classes);
  const auto [again_train, again_test] = eval_features(task.backbone, c, cache.string(), &classes);
  CHECK(at::equal(again_train.features, fresh_train.features));
  CHECK_FALSE(at::equal(again_train.features, train.features));
  CHECK(again_test.features.abs().sum().item<double>() == 0);
  // A list whose labels were edited (same files), here the label of row 2 of 24, which is not
  // one of the 16 samples whose pixels the key takes (rows 0, 1, 3, 4, 6 ...): its labels are
  // read afresh.
  auto write_list = [&](int row2_label) {
    std::ofstream list(task.dir / "test.csv");
    for (int row = 0; row < 24; ++row)
      list << "test/class" << row % 2 << "/img" << row / 2 % 3 << ".png," << (row == 2 ? row2_label : row % 2) << "\n";
  };
  nlohmann::json listed = task.config;
  listed["test_data"] = {{"type", "csv"}, {"file", (task.dir / "test.csv").string()}};
  auto row2 = [&] {
    return eval_features(task.backbone, EvalConfig::parse(listed), cache.string(), &classes).second.labels[2];
  };
  write_list(0);
  CHECK(row2().item<int64_t>() == 0);
  write_list(1);
  CHECK(row2().item<int64_t>() == 1);
  // An image edited in place (same name, same labels) that none of the 16 sampled rows shows:
  // test/class0/img1.png, rows 2, 8, 14 and 20. Its file's size and time tell: its features are
  // extracted afresh.
  auto row2_features = [&](const std::string& cache_dir) {
    return eval_features(task.backbone, EvalConfig::parse(listed), cache_dir, &classes).second.features[2];
  };
  const at::Tensor before = row2_features(cache.string());
  twins::data::write_image((task.dir / "test" / "class0" / "img1.png").string(), at::full({16, 16, 3}, 90, at::kByte));
  const at::Tensor after = row2_features(cache.string());
  CHECK_FALSE(at::equal(after, before));
  CHECK(at::equal(after, row2_features("")));
  // The same bytes with a later time alone (a file written again as it was, or copied without
  // its times) also makes a new key: one more cached file, the features as they were.
  const auto count_cached = [&] { return std::distance(fs::directory_iterator(cache), fs::directory_iterator()); };
  const auto cached_before = count_cached();
  const fs::path edited = task.dir / "test" / "class0" / "img1.png";
  fs::last_write_time(edited, fs::last_write_time(edited) + std::chrono::seconds(5));
  CHECK(at::equal(row2_features(cache.string()), after));
  CHECK(count_cached() == cached_before + 1);
  fs::remove_all(task.dir);
}

namespace {

// What an extraction killed after labels.numel() rows leaves in `partial`: those rows (features
// of sevens, then each label) and the state `state`.
void plant_partial(const std::string& partial, const at::Tensor& labels, int64_t dim, const std::string& state) {
  std::ofstream file(partial, std::ios::binary);
  for (int64_t i = 0; i < labels.numel(); ++i) {
    const std::vector<float> sevens(static_cast<size_t>(dim), 7.f);
    const int64_t label = labels[i].item<int64_t>();
    file.write(reinterpret_cast<const char*>(sevens.data()), static_cast<std::streamsize>(dim * sizeof(float)));
    file.write(reinterpret_cast<const char*>(&label), sizeof label);
  }
  file.close();
  std::ofstream(partial + ".json") << state;
}

// The cache file of the training features in `dir`.
fs::path train_cache_in(const fs::path& dir) {
  for (const auto& entry : fs::directory_iterator(dir))
    if (entry.path().filename().string().rfind("features-train-", 0) == 0) return entry.path();
  return {};
}

}  // namespace

TEST_CASE("eval: feature extraction for the cache continues from the rows a killed run left on disk") {
  ColourTask task = colour_task("partial", 12, 3, 31);  // 24 training images: batches of 8
  const EvalConfig c = EvalConfig::parse(task.config);
  const fs::path out = task.dir / "out";
  int64_t classes = 0;
  const Features full = eval_features(task.backbone, c, out.string(), &classes).first;
  REQUIRE(full.features.size(0) == 24);
  const int64_t dim = full.features.size(1);
  const fs::path cache = train_cache_in(out);
  REQUIRE_FALSE(cache.empty());
  // What a run killed after 10 rows leaves: those rows (planted sevens, with the true labels)
  // and a state saying 10. The next run takes the first batch (8 rows) from disk, extracts the
  // rest, writes the cache and removes the partial files.
  const auto plant = [&](int64_t rows, const std::string& state) {
    fs::remove(cache);
    plant_partial(cache.string() + ".partial", full.labels.narrow(0, 0, rows), dim, state);
  };
  const std::string ten = R"({"key": "24 images, )" + std::to_string(dim) + R"( features", "rows_done": 10})";
  plant(10, ten);
  const Features continued = eval_features(task.backbone, c, out.string(), &classes).first;
  CHECK(at::equal(continued.labels, full.labels));
  CHECK(at::equal(continued.features.narrow(0, 0, 8), at::full({8, dim}, 7.f)));
  CHECK(at::equal(continued.features.narrow(0, 8, 16), full.features.narrow(0, 8, 16)));
  CHECK(fs::exists(cache));
  for (const char* suffix : {".partial", ".partial.json", ".partial.lock"})
    CHECK_FALSE(fs::exists(cache.string() + suffix));
  // A state that claims more rows than the file holds, or of another shape, starts over.
  plant(3, ten);
  CHECK(at::equal(eval_features(task.backbone, c, out.string(), &classes).first.features, full.features));
  plant(10, R"({"key": "25 images, )" + std::to_string(dim) + R"( features", "rows_done": 10})");
  CHECK(at::equal(eval_features(task.backbone, c, out.string(), &classes).first.features, full.features));
  fs::remove_all(task.dir);
}

TEST_CASE("eval: feature extraction over ranks continues each rank's share from its own partial file") {
  if (!twins::test::have_gloo()) return;  // several ranks on the CPU
  ColourTask task = colour_task("partial_ranks", 12, 1, 37);  // 24 training images: 12 a rank, batches of 8
  const EvalConfig c = EvalConfig::parse(task.config);
  const fs::path out = task.dir / "out";
  int64_t classes = 0;
  const auto [full, full_test] = eval_features(task.backbone, c, out.string(), &classes);
  const fs::path cache = train_cache_in(out);
  REQUIRE_FALSE(cache.empty());
  fs::remove(cache);
  const int64_t dim = full.features.size(1);
  // Rank 1 of 2 was killed after 10 rows of its share (samples 1, 3, 5, ...): it takes the first
  // batch of them (8) from disk; rank 0 left nothing and starts afresh. A run of 3 ranks killed
  // before left its rank 0's rows too: they go once the cache is written.
  const std::string key = R"({"key": "12 images, )" + std::to_string(dim) + R"( features", "rows_done": 10})";
  const at::Tensor odd = full.labels.slice(0, 1, 24, 2);
  plant_partial(cache.string() + ".rank1-of-2.partial", odd.narrow(0, 0, 10), dim, key);
  plant_partial(cache.string() + ".rank0-of-3.partial", full.labels.slice(0, 0, 24, 3).narrow(0, 0, 4), dim,
                R"({"key": "8 images, )" + std::to_string(dim) + R"( features", "rows_done": 4})");
  std::ofstream(cache.string() + ".rank5-of-6.partial.json") << "{}";  // (its rows file gone)
  // Every rank's (train, test) features from eval_features on `world` ranks.
  const auto on_ranks = [&](int world) {
    auto comms = twins::distributed::Communicator::create_local_group(world);
    std::vector<std::pair<Features, Features>> got(static_cast<size_t>(world));
    twins::test::on_threads(world, [&](int r) {
      int64_t mine = 0;
      got[static_cast<size_t>(r)] = eval_features(task.backbone, c, out.string(), &mine, comms[static_cast<size_t>(r)]);
    });
    return got;
  };
  const auto got = on_ranks(2);
  const Features& f = got[0].first;
  REQUIRE(f.features.sizes() == full.features.sizes());
  CHECK_FALSE(got[1].first.features.defined());
  CHECK(at::equal(f.labels, full.labels));
  for (int64_t i = 0; i < 24; ++i) {
    CAPTURE(i);
    if (i % 2 == 1 && i < 16)
      CHECK(at::equal(f.features[i], at::full({dim}, 7.f)));
    else
      CHECK(twins::test::max_rel_error(f.features[i], full.features[i]) < 1e-5);
  }
  // The cache is what rank 0 returned, and no partial file is left, of either run.
  REQUIRE(fs::exists(cache));
  CHECK(at::equal(twins::models::load_safetensors(cache.string()).at("features"), f.features));
  for (const auto& entry : fs::directory_iterator(out)) {
    const std::string name = entry.path().filename().string();
    CAPTURE(name);
    CHECK(name.find(".partial") == std::string::npos);
  }
  // 3 ranks over the 2 test images: rank 2's share is empty.
  fs::remove_all(out);
  const Features test = on_ranks(3)[0].second;
  REQUIRE(test.features.sizes() == full_test.features.sizes());
  CHECK(at::equal(test.labels, full_test.labels));
  CHECK(twins::test::max_rel_error(test.features, full_test.features) <
        1e-4);  // 1 image a batch here, 2 there: other kernels (1.04e-5 on LibTorch 2.14)
  fs::remove_all(task.dir);
}

TEST_CASE("eval: fine-tuning stopped within an epoch, or checkpointed there, resumes to the uninterrupted result") {
  ColourTask task = colour_task("mid_epoch", 8, 4, 9);
  const fs::path& dir = task.dir;
  // 16 training images, batch 4: four batches an epoch.
  task.config["finetune"] = {{"epochs", 2}, {"batch_size", 4}, {"lr_backbone", 0.02}, {"lr_head", 0.2}};
  const EvalConfig cfg = EvalConfig::parse(task.config);
  const FinetuneRun whole = run_finetune(task.backbone, cfg);

  // A stop requested before the call: each call trains one batch, checkpoints there and returns.
  std::atomic<bool> stop{true};
  FinetuneControl control;
  control.checkpoint = (dir / "out" / "finetune-checkpoint.safetensors").string();
  control.metrics = (dir / "out" / "finetune-metrics.jsonl").string();
  control.stop = &stop;
  for (int64_t b = 1; b <= 3; ++b) {
    CAPTURE(b);
    const FinetuneRun part = run_finetune(task.backbone, cfg, control);
    CHECK_FALSE(part.finished);
    CHECK(part.start_epoch == 0);
    CHECK(part.start_batch == b - 1);
    CHECK(part.epochs_done == 0);
    CHECK(part.stopped_at_batch == b);
    REQUIRE(fs::exists(control.checkpoint));
    const auto meta = twins::models::load_safetensors(control.checkpoint).metadata;
    REQUIRE(meta.count("twins_finetune_partial_epoch") == 1);
    const auto partial = nlohmann::json::parse(meta.at("twins_finetune_partial_epoch"));
    CHECK(partial["batches_done"] == b);
    CHECK(partial["batches_counted"] == nlohmann::json::array({b}));
    CHECK(partial["learned"] == nlohmann::json::array({true}));
    CHECK(partial["loss_sums"].at(0).get<double>() > 0);
    CHECK(meta.at("twins_finetune_epochs_done") == "0");
  }
  // Stopped in an epoch's last batch: the epoch ends (logged, checkpointed whole), then it stops.
  const FinetuneRun at_end = run_finetune(task.backbone, cfg, control);
  CHECK_FALSE(at_end.finished);
  CHECK(at_end.start_batch == 3);
  CHECK(at_end.epochs_done == 1);
  CHECK(at_end.stopped_at_batch == 0);
  REQUIRE(at_end.epoch_loss.size() == 1);
  CHECK(at_end.epoch_loss[0] == whole.epoch_loss.at(0));  // the sums carried over four calls, bit for bit
  CHECK(twins::models::load_safetensors(control.checkpoint).metadata.count("twins_finetune_partial_epoch") == 0);

  // The rest with a checkpoint every 3 batches (after batch 6 of 8, mid-epoch): the uninterrupted
  // run's weights and losses exactly.
  stop = false;
  nlohmann::json every = task.config;
  every["finetune"]["checkpoint_every_steps"] = 3;
  const FinetuneRun rest = run_finetune(task.backbone, EvalConfig::parse(every), control);
  CHECK(rest.finished);
  CHECK(rest.start_epoch == 1);
  CHECK(rest.start_batch == 0);
  CHECK(rest.epoch_loss == whole.epoch_loss);
  CHECK(at::equal(rest.head_weight, whole.head_weight));
  CHECK(at::equal(rest.head_bias, whole.head_bias));
  check_same_weights(*whole.backbone, *rest.backbone);
  CHECK(rest.test.top1 == whole.test.top1);
  std::vector<nlohmann::json> lines;  // one line per epoch, none for the stops within one
  {
    std::ifstream in(control.metrics);
    for (std::string line; std::getline(in, line);) lines.push_back(nlohmann::json::parse(line));
  }
  REQUIRE(lines.size() == 2);
  CHECK(lines[0]["loss"].get<double>() == whole.epoch_loss[0]);
  CHECK(lines[1]["loss"].get<double>() == whole.epoch_loss[1]);

  // A checkpoint written mid-epoch, resumed with checkpoint_every_steps (not a protocol setting)
  // changed; and one whose place is malformed is refused, naming the key.
  stop = true;
  fs::remove(control.checkpoint);
  REQUIRE_FALSE(run_finetune(task.backbone, cfg, control).finished);
  const auto written = twins::models::load_safetensors(control.checkpoint);
  // Each malformed in one way only (a whole epoch here is 4 batches).
  const std::pair<const char*, const char*> bad_states[] = {
      {R"({"batches_done": 0, "loss_sums": [0.5], "batches_counted": [1], "learned": [true], "seconds": 1})",
       "malformed twins_finetune_partial_epoch"},
      {R"({"batches_done": 1, "loss_sums": [0.5, 0.5], "batches_counted": [1], "learned": [true], "seconds": 1})",
       "malformed twins_finetune_partial_epoch"},
      {R"({"batches_done": 1, "loss_sums": [0.5], "batches_counted": [-1], "learned": [true], "seconds": 1})",
       "malformed twins_finetune_partial_epoch"},
      {R"({"batches_done": 4, "loss_sums": [0.5], "batches_counted": [1], "learned": [true], "seconds": 1})",
       "malformed twins_finetune_partial_epoch (batch 4 of an epoch of 4: did train_data change?)"}};
  for (const auto& bad : bad_states) {  // (no structured binding: clang cannot capture one in C++17)
    INFO(bad.first);
    auto file = written;
    file.metadata["twins_finetune_partial_epoch"] = bad.first;
    twins::models::save_safetensors(control.checkpoint, file.tensors, file.metadata);
    check_throws_with<std::runtime_error>([&] { run_finetune(task.backbone, cfg, control); }, bad.second);
  }
  // Well formed: it resumes.
  {
    auto file = written;
    file.metadata["twins_finetune_partial_epoch"] =
        R"({"batches_done": 3, "loss_sums": [0.5], "batches_counted": [3], "learned": [true], "seconds": 1})";
    twins::models::save_safetensors(control.checkpoint, file.tensors, file.metadata);
    const FinetuneRun fine = run_finetune(task.backbone, cfg, control);
    CHECK(fine.start_batch == 3);
  }
  check_throws_with<std::invalid_argument>(
      [&] {
        nlohmann::json bad = task.config;
        bad["finetune"]["checkpoint_every_steps"] = -1;
        EvalConfig::parse(bad);
      },
      "finetune.checkpoint_every_steps");

  // A ViT with stochastic depth (random draws inside the network): stopped after batches 1 and 2
  // of the first epoch and resumed, the uninterrupted weights (each batch draws from a seed of
  // its own).
  twins::models::ViTOptions vo;
  vo.image_size = 16, vo.patch_size = 8, vo.depth = 2, vo.hidden = 16, vo.heads = 2, vo.mlp = 32;
  vo.drop_path = 0.5;
  at::manual_seed(3);
  const std::string vit = (dir / "vit.safetensors").string();
  twins::models::save_backbone(vit, twins::models::ViT(vo), twins::models::BackboneInfo{});
  const FinetuneRun vit_whole = run_finetune(vit, cfg);
  fs::remove(control.checkpoint);
  control.metrics.clear();
  stop = true;
  CHECK(run_finetune(vit, cfg, control).stopped_at_batch == 1);
  CHECK(run_finetune(vit, cfg, control).stopped_at_batch == 2);
  stop = false;
  const FinetuneRun vit_resumed = run_finetune(vit, cfg, control);
  CHECK(vit_resumed.start_batch == 2);
  CHECK(vit_resumed.epoch_loss == vit_whole.epoch_loss);
  CHECK(at::equal(vit_resumed.head_weight, vit_whole.head_weight));
  check_same_weights(*vit_whole.backbone, *vit_resumed.backbone);
  fs::remove_all(dir);
}

TEST_CASE("eval: data-parallel fine-tuning averages the ranks' gradients as one process with the global batch") {
  if (!twins::test::have_gloo()) return;  // several ranks on the CPU
  ColourTask task = colour_task("data_parallel", 8, 5, 11);
  const fs::path& dir = task.dir;
  nlohmann::json& config = task.config;
  // 16 training images, global batch 8: two steps an epoch, 4 images per rank and step.
  config["finetune"] = {
      {"epochs", 2}, {"batch_size", 8}, {"lr_backbone", 0.0}, {"lr_head", 0.2}, {"eval_every_epochs", 1}};
  auto on_two_ranks = [&](const EvalConfig& cfg, FinetuneControl control) {
    auto comms = twins::distributed::Communicator::create_local_group(2);
    std::vector<FinetuneRun> runs(2);
    twins::test::on_threads(2, [&](int r) {
      FinetuneControl mine = control;
      mine.communicator = comms[static_cast<size_t>(r)];
      runs[static_cast<size_t>(r)] = run_finetune(task.backbone, cfg, mine);
    });
    CHECK(runs[0].main_rank);
    CHECK_FALSE(runs[1].main_rank);
    CHECK(runs[1].world_size == 2);
    CHECK(runs[0].finished == runs[1].finished);
    if (runs[0].finished) CHECK(at::equal(runs[0].head_weight, runs[1].head_weight));  // the ranks stay in step
    CHECK(runs[0].epoch_loss == runs[1].epoch_loss);
    CHECK(runs[0].test.top1 == runs[1].test.top1);
    return runs[0];
  };

  // Frozen backbone (no BatchNorm batch statistics): the ranks' shares of each global batch are
  // the one process's batch, so the head learns the same, up to the order of float sums.
  const EvalConfig frozen = EvalConfig::parse(config);
  const FinetuneRun one = run_finetune(task.backbone, frozen);
  const FinetuneRun two = on_two_ranks(frozen, {});
  // Relative to the largest weight: the order of the sums moves each weight by float roundoff of
  // that scale (4e-8 of 0.18 on an Intel Xeon's oneDNN), which is large relative to a weight near 0.
  auto error = [](const at::Tensor& a, const at::Tensor& b) {
    return twins::test::max_rel_error(a, b, b.abs().max().item<double>());
  };
  INFO("head error ", error(two.head_weight, one.head_weight));
  CHECK(error(two.head_weight, one.head_weight) < 1e-5);
  CHECK(error(two.head_bias, one.head_bias) < 1e-5);
  REQUIRE(two.epoch_loss.size() == 2);
  CHECK(two.epoch_loss[1] == doctest::Approx(one.epoch_loss[1]).epsilon(1e-5));
  CHECK(two.test_samples == 10);  // 5 + 5 test images split 5 / 5 and summed
  CHECK(two.test.top1 == one.test.top1);
  CHECK(two.test.top5 == one.test.top5);
  REQUIRE(two.test_per_epoch.size() == 2);
  CHECK(two.test_per_epoch[0].test.top1 == one.test_per_epoch.at(0).test.top1);
  CHECK(two.protocol.find("2 ranks x 4 images per batch") != std::string::npos);

  // Fine-tuned on two ranks, stopped after an epoch and resumed: the uninterrupted run's weights.
  config["finetune"]["lr_backbone"] = 0.02;
  const EvalConfig tuned = EvalConfig::parse(config);
  const FinetuneRun whole = on_two_ranks(tuned, {});
  FinetuneControl control;
  control.checkpoint = (dir / "out" / "finetune-checkpoint.safetensors").string();
  control.stop_after_epochs = 1;
  const FinetuneRun first = on_two_ranks(tuned, control);
  CHECK(first.epochs_done == 1);
  REQUIRE(fs::exists(control.checkpoint));
  {  // A rank that does not see the checkpoint (another node's folder) stops every rank.
    auto comms = twins::distributed::Communicator::create_local_group(2);
    std::vector<std::string> errors(2);
    twins::test::on_threads(2, [&](int r) {
      FinetuneControl mine = control;
      mine.communicator = comms[static_cast<size_t>(r)];
      if (r == 1) mine.checkpoint = (dir / "elsewhere" / "finetune-checkpoint.safetensors").string();
      try {
        run_finetune(task.backbone, tuned, mine);
      } catch (const std::runtime_error& e) {
        errors[static_cast<size_t>(r)] = e.what();
      }
    });
    for (const std::string& e : errors) {
      INFO(e);
      CHECK(e.find("finetune: the ranks found different checkpoints at ") == 0);
      CHECK(e.find(" (epochs, batches done per rank: rank 0: 1, 0; rank 1: 0, 0); every node must see the same "
                   "output folder") != std::string::npos);
    }
    CHECK_FALSE(fs::exists(dir / "elsewhere"));
  }
  control.stop_after_epochs = 0;
  const FinetuneRun resumed = on_two_ranks(tuned, control);
  CHECK(resumed.start_epoch == 1);
  CHECK(resumed.epoch_loss == whole.epoch_loss);
  CHECK(at::equal(resumed.head_weight, whole.head_weight));
  check_same_weights(*whole.backbone, *resumed.backbone);

  // A stop requested on one rank only (its own signal): both stop after the same batch, mid-epoch,
  // and resume to the uninterrupted run's weights.
  fs::remove(control.checkpoint);
  {
    auto comms = twins::distributed::Communicator::create_local_group(2);
    std::atomic<bool> stops[2] = {false, true};
    std::vector<FinetuneRun> parts(2);
    twins::test::on_threads(2, [&](int r) {
      FinetuneControl mine = control;
      mine.communicator = comms[static_cast<size_t>(r)];
      mine.stop = &stops[r];
      parts[static_cast<size_t>(r)] = run_finetune(task.backbone, tuned, mine);
    });
    for (const FinetuneRun& part : parts) {
      CHECK_FALSE(part.finished);
      CHECK(part.epochs_done == 0);
      CHECK(part.stopped_at_batch == 1);
    }
  }
  const FinetuneRun after_stop = on_two_ranks(tuned, control);
  CHECK(after_stop.start_batch == 1);
  REQUIRE(after_stop.epoch_loss.size() == 2);
  CHECK(after_stop.epoch_loss == whole.epoch_loss);  // each rank carried its own sums
  CHECK(at::equal(after_stop.head_weight, whole.head_weight));
  check_same_weights(*whole.backbone, *after_stop.backbone);

  // The global batch must split evenly, and leave BatchNorm at least 2 images per rank.
  FinetuneControl odd;
  odd.communicator = twins::distributed::Communicator::create_local_group(2)[0];
  config["finetune"]["batch_size"] = 2;
  check_throws_with<std::invalid_argument>([&] { run_finetune(task.backbone, EvalConfig::parse(config), odd); },
                                           "finetune.batch_size: 2 over 2 rank(s) is one image per batch");
  config["finetune"]["batch_size"] = 7;
  check_throws_with<std::invalid_argument>(
      [&] { run_finetune(task.backbone, EvalConfig::parse(config), odd); },
      "finetune.batch_size: 7 is the global batch and must divide evenly over the 2 ranks");
  fs::remove_all(dir);
}

TEST_CASE("eval: the finetune block of an eval config is checked key by key") {
  const nlohmann::json base = {{"train_data", {{"type", "cifar10"}}}, {"test_data", {{"type", "cifar10"}}}};
  const EvalConfig defaults = EvalConfig::parse(base);
  CHECK(defaults.finetune.epochs == 20);  // VICReg's ImageNet 1% settings
  CHECK(defaults.finetune.lr_backbone == doctest::Approx(0.03));
  CHECK(defaults.finetune.lr_head == doctest::Approx(0.08));
  CHECK(defaults.finetune.train_percent == 100);
  auto with = [&](const nlohmann::json& finetune) {
    nlohmann::json c = base;
    c["finetune"] = finetune;
    return EvalConfig::parse(c);
  };
  CHECK(with({{"subset", "s.txt"}}).finetune.subset == "s.txt");
  check_throws_with<std::invalid_argument>([&] { with({{"train_percent", 0}}); }, "finetune.train_percent");
  check_throws_with<std::invalid_argument>([&] { with({{"train_percent", 101}}); }, "finetune.train_percent");
  check_throws_with<std::invalid_argument>([&] { with({{"lr_backbone", -1}}); }, "finetune.lr_backbone");
  check_throws_with<std::invalid_argument>([&] { with({{"lr_head", 0}}); }, "finetune.lr_head");
  check_throws_with<std::invalid_argument>([&] { with({{"precision", "fp16"}}); }, "finetune.precision");
  check_throws_with<std::invalid_argument>([&] { with({{"crop_scale", {0.5, 0.2}}}); }, "finetune.crop_scale");
  check_throws_with<std::invalid_argument>([&] { with({{"lr", 0.1}}); }, "finetune.lr");
  check_throws_with<std::invalid_argument>(
      [&] {
        with({{"train_percent", 10}, {"subset", "s.txt"}});
      },
      "finetune.subset");
}

#include <ATen/ATen.h>
#include <sys/wait.h>
#include <torch/nn/module.h>
#include <torch/optim/adamw.h>
#include <torch/optim/sgd.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <numeric>

#include "core/compat.h"
#include "core/tensorboard.h"
#include "tests/test_util.h"
#include "tests/train/tiny_run.h"
#include "train/multi_tensor_adamw.h"
#include "train/run_log.h"
#include "train/ssl_model.h"
#include "twins/augment/random.h"
#include "twins/config.h"
#include "twins/eval/evaluate.h"
#include "twins/eval/probe.h"
#include "twins/io.h"
#include "twins/losses.h"
#include "twins/models/safetensors.h"
#include "twins/models/vit.h"
#include "twins/models/weights.h"
#include "twins/runtime.h"
#include "twins/train/lars.h"
#include "twins/train/pretrain.h"
#include "twins/train/recipe.h"
#include "twins/train/schedule.h"
#include "twins/train/trainer.h"

using namespace twins::train;
using nlohmann::json;
using twins::test::check_throws_with;
using twins::test::quiet;
using twins::test::tiny_recipe;
using twins::test::TinyData;
namespace fs = std::filesystem;

namespace {

std::vector<json> read_lines(const fs::path& file) {
  std::vector<json> out;
  std::ifstream in(file);
  for (std::string line; std::getline(in, line);) out.push_back(json::parse(line));
  return out;
}

// The "loss" of each step a run logged in `dir`/metrics.jsonl.
std::vector<double> logged_losses(const fs::path& dir) {
  std::vector<double> out;
  for (const auto& l : read_lines(dir / "metrics.jsonl"))
    if (l.contains("loss")) out.push_back(l["loss"]);
  return out;
}

// Feeds a golden file's gradients ("grads"[step][param]) to `opt` for 3 steps; the largest
// absolute difference of the parameters from the golden "after"[step][param].
double replay_lars_golden(LARS& opt, std::vector<at::Tensor>& params, const json& g) {
  double worst = 0;
  for (size_t step = 0; step < 3; ++step) {
    for (size_t i = 0; i < params.size(); ++i)
      params[i].mutable_grad() =
          at::tensor(g["grads"][step][i].get<std::vector<double>>(), at::kDouble).view(params[i].sizes());
    opt.step();
    for (size_t i = 0; i < params.size(); ++i) {
      const at::Tensor expected =
          at::tensor(g["after"][step][i].get<std::vector<double>>(), at::kDouble).view(params[i].sizes());
      worst = std::max(worst, (params[i].detach() - expected).abs().max().item<double>());
    }
  }
  return worst;
}

}  // namespace

TEST_CASE("train: LARS matches the official VICReg LARS step for step") {
  const json g = twins::test::read_json(twins::test::reference_path("lars_golden.json"));
  std::vector<at::Tensor> params;
  for (size_t i = 0; i < 3; ++i) {
    std::vector<int64_t> shape = g["shapes"][i];
    params.push_back(
        at::tensor(g["initial"][i].get<std::vector<double>>(), at::kDouble).view(shape).set_requires_grad(true));
  }
  LARS opt(params,
           LARSOptions(g["lr"].get<double>()).weight_decay(g["weight_decay"]).momentum(g["momentum"]).eta(g["eta"]));
  const double worst = replay_lars_golden(opt, params, g);
  MESSAGE("LARS worst absolute difference over 3 steps: ", worst);
  CHECK(worst < 1e-13);
}

TEST_CASE("train: LARS state survives save and load") {
  at::manual_seed(0);
  auto make = [] {
    return std::vector<at::Tensor>{at::randn({3, 3}).set_requires_grad(true), at::randn({3}).set_requires_grad(true)};
  };
  std::vector<at::Tensor> a = make(), b;
  for (auto& t : a) b.push_back(t.detach().clone().set_requires_grad(true));
  LARS oa(a, LARSOptions(0.5).weight_decay(0.1)), ob(b, LARSOptions(0.5).weight_decay(0.1));
  auto step = [](std::vector<at::Tensor>& ps, LARS& o, int seed) {
    at::manual_seed(seed);
    for (auto& p : ps) p.mutable_grad() = at::randn(p.sizes());
    o.step();
  };
  step(a, oa, 1), step(b, ob, 1);
  torch::serialize::OutputArchive out;
  oa.save(out);
  std::ostringstream s;
  out.save_to(s);
  LARS oc(b, LARSOptions(0.5).weight_decay(0.1));  // fresh optimizer on b's parameters
  std::istringstream in(s.str());
  torch::serialize::InputArchive arch;
  arch.load_from(in);
  oc.load(arch);
  step(a, oa, 2), step(b, oc, 2);
  for (size_t i = 0; i < a.size(); ++i) CHECK(at::equal(a[i], b[i]));
}

TEST_CASE("train: warm-up, cosine and tau schedules") {
  CHECK(warmup_cosine_lr(0, 100, 10, 2.0, 0.001) == 0.0);
  CHECK(warmup_cosine_lr(5, 100, 10, 2.0, 0.001) == doctest::Approx(1.0));
  CHECK(warmup_cosine_lr(10, 100, 10, 2.0, 0.001) == doctest::Approx(2.0));
  CHECK(warmup_cosine_lr(55, 100, 10, 2.0, 0.001) == doctest::Approx(2.0 * 0.5 + 0.002 * 0.5));
  CHECK(warmup_cosine_lr(100, 100, 10, 2.0, 0.001) == doctest::Approx(0.002));
  CHECK(byol_tau(0, 1000, 0.996) == doctest::Approx(0.996));
  CHECK(byol_tau(500, 1000, 0.996) == doctest::Approx(0.998));
  CHECK(byol_tau(1000, 1000, 0.996) == doctest::Approx(1.0));
  CHECK(scaled_lr(0.2, 2048) == doctest::Approx(1.6));
}

TEST_CASE("train: BYOL's EMA moves parameters and BatchNorm statistics") {
  TinyData data(8);
  const Recipe r = Recipe::parse(tiny_recipe("byol", data.dir));
  twins::train::detail::SSLModel m(r, 4);
  {
    at::NoGradGuard g;
    for (auto& p : m.backbone->parameters()) p.add_(1.0);
  }
  m.backbone->train();
  m.backbone->forward(at::randn({4, 1, 12, 12}) * 3 + 2);  // changes the online running stats
  const auto online_p = m.backbone->named_parameters(), target_p = m.target_backbone->named_parameters();
  const auto online_b = m.backbone->named_buffers(), target_b = m.target_backbone->named_buffers();
  const at::Tensor p0 = target_p["conv1.weight"].clone(), b0 = target_b["bn1.running_mean"].clone();
  m.ema_update(0.75);
  CHECK(at::allclose(target_p["conv1.weight"], 0.75 * p0 + 0.25 * online_p["conv1.weight"]));
  CHECK(at::allclose(target_b["bn1.running_mean"], 0.75 * b0 + 0.25 * online_b["bn1.running_mean"]));
  CHECK_FALSE(at::equal(target_b["bn1.running_mean"], b0));
  CHECK(target_b["bn1.num_batches_tracked"].item<int64_t>() == online_b["bn1.num_batches_tracked"].item<int64_t>());
  CHECK_FALSE(target_p["conv1.weight"].requires_grad());
}

TEST_CASE("train: every method trains end to end and writes its run folder") {
  TinyData data(64);
  for (const std::string& method : twins::losses::loss_names()) {
    CAPTURE(method);
    const fs::path out = data.dir / ("run_" + method);
    json cfg = tiny_recipe(method, data.dir);
    cfg["train"]["epochs"] = 4;
    if (method == "byol") cfg["train"]["workers"] = "auto";  // (the recipes')
    const auto result = pretrain(cfg, quiet(out));
    CHECK(result.steps == 16);
    CHECK_FALSE(result.interrupted);
    for (const char* f : {"config.json", "metrics.jsonl", "backbone.safetensors"}) CHECK(fs::exists(out / f));
    const auto lines = read_lines(out / "metrics.jsonl");
    std::vector<double> losses;
    for (const auto& l : lines) {
      if (l.contains("loss")) losses.push_back(l["loss"]);
      if (l.contains("loss")) {
        CHECK(l.contains("lr"));
        CHECK(l.contains("images_per_s"));
        CHECK(l.contains("data_wait"));
      }
    }
    REQUIRE(losses.size() == 16);
    for (double v : losses) CHECK(std::isfinite(v));
    const double first = (losses[0] + losses[1] + losses[2]) / 3, last = (losses[13] + losses[14] + losses[15]) / 3;
    MESSAGE(method, ": loss ", first, " -> ", last);
    CHECK(last < first);
    CHECK(lines.back().value("summary", false));
    CHECK(lines[lines.size() - 2].contains("online_probe_train_top1"));
    // The backbone file: torchvision names, the architecture in the metadata, loadable.
    const auto backbone = twins::models::load_safetensors((out / "backbone.safetensors").string());
    CHECK(backbone.contains("conv1.weight"));
    CHECK(backbone.contains("layer4.0.bn2.running_var"));
    CHECK_FALSE(backbone.contains("fc.weight"));
    CHECK(json::parse(backbone.metadata.at("twins_backbone"))["type"] == "resnet");
    CHECK(fs::exists(out / "checkpoints"));
  }
}

TEST_CASE("train: resume is bit-identical, and a corrupt checkpoint falls back to the previous one") {
  TinyData data(48);
  json cfg = tiny_recipe("byol", data.dir);
  cfg["train"]["epochs"] = 3;  // 3 steps per epoch, 9 in all
  cfg["train"]["checkpoint_every_steps"] = 1;
  cfg["train"]["keep_checkpoints"] = 3;
  const auto full = pretrain(cfg, quiet(data.dir / "full"));
  REQUIRE(full.steps == 9);

  PretrainOptions part = quiet(data.dir / "part");
  part.stop_after = 4;  // stops inside epoch 1
  const auto first = pretrain(cfg, part);
  CHECK(first.interrupted);
  CHECK(first.steps == 4);
  CHECK_FALSE(fs::exists(data.dir / "part/backbone.safetensors"));
  // Corrupt the newest checkpoint (step 4): the resume must use step 3 and still end identical.
  const fs::path newest = data.dir / "part/checkpoints/step-00000004.safetensors";
  REQUIRE(fs::exists(newest));
  fs::resize_file(newest, fs::file_size(newest) - 100);
  PretrainOptions rest = quiet(data.dir / "part");
  rest.resume = true;
  const auto second = pretrain(json::object(), rest);
  CHECK(second.steps == 9);
  const auto a = twins::models::load_safetensors((data.dir / "full/backbone.safetensors").string());
  const auto b = twins::models::load_safetensors((data.dir / "part/backbone.safetensors").string());
  REQUIRE(a.tensors.size() == b.tensors.size());
  for (size_t i = 0; i < a.tensors.size(); ++i) {
    CAPTURE(a.tensors[i].first);
    CHECK(at::equal(a.tensors[i].second, b.at(a.tensors[i].first)));
  }
  // ...and the last checkpoints (target network, optimizer state) agree too.
  const auto ca = twins::models::load_safetensors((data.dir / "full/checkpoints/step-00000009.safetensors").string());
  const auto cb = twins::models::load_safetensors((data.dir / "part/checkpoints/step-00000009.safetensors").string());
  CHECK(at::equal(ca.at("target_backbone.layer1.0.conv1.weight"), cb.at("target_backbone.layer1.0.conv1.weight")));
  CHECK(at::equal(ca.at("probe.weight"), cb.at("probe.weight")));
  // Only keep_checkpoints remain.
  int count = 0;
  for (const auto& e : fs::directory_iterator(data.dir / "part/checkpoints"))
    count += e.path().extension() == ".safetensors";
  CHECK(count == 3);
}

TEST_CASE(
    "train: auto_resume starts a run and continues it bit-identically with the same command, refusing another "
    "config, and a folder that holds a run is refused without it") {
  TinyData data(48);
  json cfg = tiny_recipe("vicreg", data.dir);
  cfg["train"]["epochs"] = 2;  // 3 steps per epoch
  cfg["train"]["checkpoint_every_steps"] = 1;
  REQUIRE(pretrain(cfg, quiet(data.dir / "full")).steps == 6);
  const fs::path dir = data.dir / "restarted";
  PretrainOptions same = quiet(dir);  // torchrun --max-restarts: one command for every attempt
  same.auto_resume = true;
  same.stop_after = 2;
  const auto first = pretrain(cfg, same);
  CHECK(first.interrupted);
  CHECK(first.steps == 2);
  check_throws_with<std::invalid_argument>([&] { pretrain(cfg, quiet(dir)); },
                                           dir.string() + " already holds a run (" +
                                               (dir / "checkpoints/step-00000002.safetensors").string() +
                                               "): continue it with --resume");
  json other = cfg;
  other["train"]["epochs"] = 3;
  check_throws_with<std::invalid_argument>(
      [&] { pretrain(other, same); },
      "--auto-resume: " + dir.string() + " holds a run of another config (train.epochs: 2 there, 3 given)");
  same.stop_after = 0;
  CHECK(pretrain(cfg, same).steps == 6);
  const auto a = twins::models::load_safetensors((data.dir / "full/backbone.safetensors").string());
  const auto b = twins::models::load_safetensors((dir / "backbone.safetensors").string());
  REQUIRE(a.tensors.size() == b.tensors.size());
  for (size_t i = 0; i < a.tensors.size(); ++i) {
    CAPTURE(a.tensors[i].first);
    CHECK(at::equal(a.tensors[i].second, b.at(a.tensors[i].first)));
  }
  // Each step logged once, across the two invocations.
  int64_t steps_logged = 0;
  for (const auto& l : read_lines(dir / "metrics.jsonl")) steps_logged += l.contains("loss");
  CHECK(steps_logged == 6);
}

TEST_CASE(
    "train: a run stopped at an epoch's last step scores that epoch when resumed, as one not stopped, and logs each "
    "step once") {
  TinyData data(48);  // 3 steps per epoch
  json cfg = tiny_recipe("vicreg", data.dir);
  cfg["train"]["epochs"] = 2;
  cfg["online_probe"] = {{"eval_data", {{"type", "mnist"}, {"root", data.dir.string()}}}, {"knn", {{"k", {1, 5}}}}};
  const auto full = pretrain(cfg, quiet(data.dir / "full"));
  auto epoch_lines = [](const fs::path& metrics) {
    std::vector<json> out;
    for (const auto& l : read_lines(metrics))
      if (l.contains("epoch_seconds")) out.push_back(l);
    return out;
  };
  const std::vector<json> want = epoch_lines(data.dir / "full/metrics.jsonl");
  REQUIRE(want.size() == 2);
  // Stopped after the first epoch's last step, and after the run's very last step.
  for (int64_t stop_after : {3, 6}) {
    CAPTURE(stop_after);
    const fs::path dir = data.dir / ("stopped" + std::to_string(stop_after));
    PretrainOptions part = quiet(dir);
    part.stop_after = stop_after;
    REQUIRE(pretrain(cfg, part).interrupted);
    {
      // A line torn by an earlier crash, which an earlier version's resume continued on the same
      // line (the step 2 line after the tear): that line is kept.
      std::string all;
      for (const json& l : read_lines(dir / "metrics.jsonl"))
        all += (l.value("step", 0) == 2 && !l.contains("epoch_seconds") ? "{\"step\": 2, \"lo" : "") + l.dump() + "\n";
      std::ofstream(dir / "metrics.jsonl", std::ios::trunc) << all;
    }
    {
      // What a run killed after that checkpoint would have logged past it, the last line torn.
      std::ofstream crashed(dir / "metrics.jsonl", std::ios::app);
      crashed << json{{"step", stop_after + 1}, {"epoch", stop_after / 3}, {"loss", 99.0}}.dump() << "\n"
              << json{{"epoch", stop_after / 3 - 1}, {"step", stop_after}, {"epoch_seconds", 1.0}}.dump() << "\n"
              << "{\"step\": " << stop_after + 2 << ", \"lo";
    }
    PretrainOptions rest = quiet(dir);
    rest.resume = true;
    const auto resumed = pretrain(json::object(), rest);
    CHECK(resumed.epochs_completed == 2);
    // Every step and epoch once, in order, the crashed run's lines gone; both invocations' summaries.
    std::vector<int64_t> steps, summaries;
    for (const auto& l : read_lines(dir / "metrics.jsonl")) {
      if (l.contains("summary")) {
        summaries.push_back(l["steps"].get<int64_t>());
      } else if (!l.contains("epoch_seconds")) {
        steps.push_back(l["step"].get<int64_t>());
        CHECK(l["loss"] != 99.0);
      }
    }
    CHECK(steps == std::vector<int64_t>{1, 2, 3, 4, 5, 6});
    CHECK(summaries == std::vector<int64_t>{stop_after, 6});
    REQUIRE(resumed.online_knn_top1);
    CHECK(*resumed.online_knn_top1 == *full.online_knn_top1);
    const std::vector<json> got = epoch_lines(dir / "metrics.jsonl");
    REQUIRE(got.size() == 2);
    for (size_t e = 0; e < 2; ++e)
      for (const char* key : {"epoch", "step", "online_probe_train_top1", "online_probe_eval_top1",
                              "online_knn_k1_top1", "online_knn_k5_top1", "online_knn_k5_top5"}) {
        CAPTURE(e);
        CAPTURE(key);
        REQUIRE(got[e].contains(key));
        CHECK(got[e][key] == want[e][key]);
      }
  }
}

TEST_CASE("train: a non-finite loss stops the run naming the step and the term") {
  TinyData data(32);
  json cfg = tiny_recipe("vicreg", data.dir);
  cfg["optimizer"] = {{"type", "sgd"}, {"base_lr", 1e30}, {"momentum", 0.0}};
  check_throws_with<std::runtime_error>([&] { pretrain(cfg, quiet(data.dir / "nan")); }, "the loss is not finite");
  try {
    pretrain(cfg, quiet(data.dir / "nan2"));
  } catch (const std::runtime_error& e) {
    const std::string what = e.what();
    CHECK(what.find("step ") == 0);
    CHECK(what.find("invariance=") != std::string::npos);
  }
}

TEST_CASE("train: bf16 on the CPU: convolutions in bf16, the loss in fp32, and every method trains") {
  TinyData data(64);
  {
    const Recipe r = Recipe::parse(tiny_recipe("vicreg", data.dir));
    twins::train::detail::SSLModel m(r, 0);
    m.train();
    at::manual_seed(3);
    const std::vector<at::Tensor> views{at::randn({16, 1, 12, 12}), at::randn({16, 1, 12, 12})};
    const auto fp32 = m.forward(views);
    twins::train::detail::SSLModel::Output bf16;
    {
      const twins::compat::Autocast autocast(at::kCPU, true, at::kBFloat16);
      bf16 = m.forward(views);
    }
    CHECK((fp32.features.scalar_type() == at::kFloat));
    CHECK((bf16.features.scalar_type() == at::kBFloat16));
    CHECK((bf16.loss.total.scalar_type() == at::kFloat));
    for (const auto& term : bf16.loss.terms) CHECK((term.second.scalar_type() == at::kFloat));
    const double a = fp32.loss.total.item<double>(), b = bf16.loss.total.item<double>();
    CHECK(std::abs(a - b) < 0.05 * std::abs(a));
    bf16.loss.total.backward();
    for (const auto& p : m.backbone->parameters()) {
      REQUIRE(p.grad().defined());
      CHECK((p.grad().scalar_type() == at::kFloat));
      CHECK(p.grad().isfinite().all().item<bool>());
    }
  }
  // The scope restores the state it found.
  CHECK_FALSE(twins::compat::autocast_enabled(at::kCPU));
  // Every method trains in bf16 as in fp32: the same first loss (the same weights and batch, up to
  // bf16's rounding), then losses of the same size. (Whether 16 steps on random images lower the
  // loss is the fp32 test's question; the answer wavers with LibTorch's bf16 kernels, and for
  // Barlow Twins with its 0.005-weighted off-diagonal terms in bf16 gradients, in fp32 as well.)
  for (const std::string& method : twins::losses::loss_names()) {
    CAPTURE(method);
    std::map<std::string, std::vector<double>> losses;
    for (const std::string precision : {"fp32", "bf16"}) {
      json cfg = tiny_recipe(method, data.dir);
      cfg["train"]["epochs"] = 4;
      cfg["train"]["precision"] = precision;
      const auto result = pretrain(cfg, quiet(data.dir / (precision + "_" + method)));
      CHECK(result.steps == 16);
      losses[precision] = logged_losses(data.dir / (precision + "_" + method));
      REQUIRE(losses[precision].size() == 16);
      for (double v : losses[precision]) CHECK(std::isfinite(v));
    }
    const auto& a = losses["fp32"];
    const auto& b = losses["bf16"];
    const double mean_a = std::accumulate(a.begin(), a.end(), 0.0) / 16;
    const double mean_b = std::accumulate(b.begin(), b.end(), 0.0) / 16;
    MESSAGE(method, ": first loss fp32 ", a[0], " bf16 ", b[0], ", mean of 16 steps fp32 ", mean_a, " bf16 ", mean_b);
    // Relative to the loss, or to 1 for the cosine losses (BYOL, SimSiam), which pass through 0.
    CHECK(std::abs(b[0] - a[0]) < 0.05 * std::max(std::abs(a[0]), 1.0));
    CHECK(std::abs(mean_b - mean_a) < 0.25 * std::max(std::abs(mean_a), 1.0));
  }
  json cfg = tiny_recipe("vicreg", data.dir);
  cfg["train"]["precision"] = "fp16";
  check_throws_with<std::invalid_argument>([&] { pretrain(cfg, quiet(data.dir / "fp16")); },
                                           "train.precision: fp16 needs a CUDA device");
}

TEST_CASE(
    "train: train.cuda_graph on the CPU keeps the eager step and says why, and the probe counts labelled samples") {
  TinyData data(16);
  json cfg = tiny_recipe("vicreg", data.dir);
  TrainerOptions o;
  o.num_classes = 4, o.steps_per_epoch = 4, o.total_steps = 8;
  at::manual_seed(0);
  Trainer eager(Recipe::parse(cfg), o);
  cfg["train"]["cuda_graph"] = true;
  at::manual_seed(0);
  Trainer asked(Recipe::parse(cfg), o);
  CHECK_FALSE(asked.cuda_graph());
  CHECK(asked.cuda_graph_note() == "the device is the CPU");
  CHECK(eager.cuda_graph_note().empty());
  // Half the samples unlabelled (-1): the probe learns from and counts the other half.
  twins::data::Batch batch;
  at::manual_seed(5);
  for (int v = 0; v < 2; ++v) batch.views.push_back(at::randint(0, 256, {8, 1, 12, 12}, at::kByte));
  batch.labels = at::tensor({0, 1, 2, 3, -1, -1, -1, -1}, at::kLong);
  for (int i = 0; i < 3; ++i) CHECK(eager.step(batch).loss == asked.step(batch).loss);
  CHECK(asked.state_info()["probe_seen"] == 12);
  const auto counts = asked.end_probe_epoch();
  CHECK(counts.seen == 12);
  CHECK(counts.correct >= 0);
  CHECK(counts.correct <= 12);
  CHECK(counts.correct == eager.end_probe_epoch().correct);
  CHECK(asked.end_probe_epoch().seen == 0);  // reset
  const auto a = eager.state(), b = asked.state();
  REQUIRE(a.size() == b.size());
  for (size_t k = 0; k < a.size(); ++k) {
    CAPTURE(a[k].first);
    if (a[k].first.find("optimizer_state") == std::string::npos)  // archives keyed by tensor addresses
      CHECK(at::equal(a[k].second, b[k].second));
  }
}

TEST_CASE("train: strict recipes") {
  TinyData data(8);
  json cfg = tiny_recipe("vicreg", data.dir);
  cfg["train"]["epoch"] = 3;
  check_throws_with<std::invalid_argument>([&] { Recipe::parse(cfg); },
                                           "train.epoch: unknown key; did you mean epochs?");
  cfg = tiny_recipe("vicreg", data.dir);
  cfg["loss"]["type"] = "byol";
  check_throws_with<std::invalid_argument>([&] { Recipe::parse(cfg); }, "does not match method");
  cfg = tiny_recipe("vicreg", data.dir);
  cfg["optimizer"]["type"] = "adam";
  check_throws_with<std::invalid_argument>([&] { Recipe::parse(cfg); }, "optimizer.type: must be lars, sgd or adamw");
  cfg = tiny_recipe("byol", data.dir);
  cfg["model"].erase("predictor");
  check_throws_with<std::invalid_argument>([&] { Recipe::parse(cfg); }, "BYOL needs a predictor");
  cfg = tiny_recipe("vicreg", data.dir);
  cfg["train"]["float32_matmul_precision"] = "tf32";
  check_throws_with<std::invalid_argument>([&] { Recipe::parse(cfg); },
                                           "train.float32_matmul_precision: must be highest, high or medium");
  cfg["train"]["float32_matmul_precision"] = "high";
  CHECK(Recipe::parse(cfg).train.float32_matmul_precision == "high");
  cfg = tiny_recipe("vicreg", data.dir);
  cfg["train"]["workers"] = "auto";
  CHECK(Recipe::parse(cfg).train.workers == twins::kAutoWorkers);
  cfg["train"]["workers"] = "all";
  check_throws_with<std::invalid_argument>([&] { Recipe::parse(cfg); },
                                           "train.workers: expected an integer or \"auto\", got \"all\"");
  cfg = tiny_recipe("vicreg", data.dir);
  cfg["_comment"] = "ignored";
  CHECK_NOTHROW(Recipe::parse(cfg));
  PretrainOptions o = quiet(data.dir / "none");
  o.resume = true;
  check_throws_with<std::runtime_error>([&] { pretrain(cfg, o); }, "resume: no checkpoint");
}

TEST_CASE("train: every recipe in configs/ parses") {
  for (const auto& e : fs::directory_iterator(fs::path(TWINS_TEST_REFERENCE_DIR) / "../../configs")) {
    if (e.path().extension() != ".json") continue;
    CAPTURE(e.path().string());
    const json cfg = twins::config::load_config(e.path().string());
    CHECK_NOTHROW(Recipe::parse(cfg));
  }
}

TEST_CASE("train: hostile configs and run folders fail before any training") {
  TinyData data(32);
  json cfg = tiny_recipe("vicreg", data.dir);
  cfg["train"]["epochs"] = int64_t{1} << 62;  // epochs x steps used to overflow into 0 steps
  check_throws_with<std::invalid_argument>([&] { Recipe::parse(cfg); }, "train.epochs: must be in [1, 10^6]");
  cfg = tiny_recipe("vicreg", data.dir);
  cfg["train"]["batch_size"] = 16.5;  // used to become 16 without a word
  check_throws_with<std::invalid_argument>([&] { Recipe::parse(cfg); },
                                           "train.batch_size: expected an integer, got 16.5");
  cfg = tiny_recipe("vicreg", data.dir);
  cfg["train"]["batch_size"] = 64;
  check_throws_with<std::invalid_argument>([&] { pretrain(cfg, quiet(data.dir / "big_batch")); },
                                           "train.batch_size: 64 is larger than the 32 samples of the dataset");
  cfg = tiny_recipe("vicreg", data.dir);
  cfg["train"]["epochs"] = 1;
  // A second run on a folder in use fails at once.
  const fs::path out = data.dir / "locked";
  {
    twins::io::FolderLock held(out.string());
    check_throws_with<std::runtime_error>([&] { pretrain(cfg, quiet(out)); }, "in use by another twins process");
  }
  // Temporaries of interrupted writes are removed when the next run takes the folder.
  fs::create_directories(out / "checkpoints");
  std::ofstream(out / "checkpoints" / "step-00000001.safetensors.tmp-999999") << "half a checkpoint";
  CHECK(pretrain(cfg, quiet(out)).steps == 2);
  CHECK_FALSE(fs::exists(out / "checkpoints" / "step-00000001.safetensors.tmp-999999"));
  // A checkpoint folder that cannot be written is found before the training time is spent.
  const fs::path blocked = data.dir / "blocked";
  fs::create_directories(blocked);
  std::ofstream(blocked / "checkpoints") << "a file where the folder should be";
  check_throws_with<std::runtime_error>([&] { pretrain(cfg, quiet(blocked)); }, "cannot create the folder");
  CHECK_FALSE(fs::exists(blocked / "metrics.jsonl"));
}

TEST_CASE("train: the checksum covers the checkpoint's header: an altered step falls back to the previous one") {
  TinyData data(48);
  json cfg = tiny_recipe("vicreg", data.dir);
  cfg["train"]["epochs"] = 2;  // 3 steps per epoch
  cfg["train"]["checkpoint_every_steps"] = 1;
  cfg["train"]["keep_checkpoints"] = 3;
  const auto full = pretrain(cfg, quiet(data.dir / "full"));
  REQUIRE(full.steps == 6);
  PretrainOptions part = quiet(data.dir / "part");
  part.stop_after = 4;
  pretrain(cfg, part);
  // Alter the step recorded in the newest checkpoint's metadata (same length, so the data
  // offsets stay valid): only the checksum can tell.
  const fs::path newest = data.dir / "part/checkpoints/step-00000004.safetensors";
  std::string bytes;
  {
    std::ifstream in(newest, std::ios::binary);
    bytes.assign((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  }
  const size_t at = bytes.find("\\\"step\\\":4");
  REQUIRE(at != std::string::npos);
  bytes[at + 9] = '5';
  std::ofstream(newest, std::ios::binary) << bytes;
  check_throws_with<std::runtime_error>([&] { twins::models::load_safetensors(newest.string()); }, "checksum mismatch");
  PretrainOptions rest = quiet(data.dir / "part");
  rest.resume = true;
  CHECK(pretrain(json::object(), rest).steps == 6);  // resumed from step 3
  const auto a = twins::models::load_safetensors((data.dir / "full/backbone.safetensors").string());
  const auto b = twins::models::load_safetensors((data.dir / "part/backbone.safetensors").string());
  for (const auto& [name, t] : a.tensors) CHECK(at::equal(t, b.at(name)));
}

TEST_CASE("train: each recipe names its source and keeps the numbers that define it") {
  struct Pin {
    std::string method, lars_variant;
    double base_lr, weight_decay, warmup_start_lr, final_lr_ratio;
    int64_t epochs;
    std::string source;  // in _comment
  };
  const std::map<std::string, Pin> pins = {
      {"vicreg_cifar10.json", {"vicreg", "solo_learn", 0.3, 1e-4, 3e-5, 0.0, 1000, "solo-learn 9187ea3"}},
      {"barlow_twins_cifar10.json", {"barlow_twins", "solo_learn", 0.3, 1e-4, 3e-5, 0.0, 1000, "solo-learn 9187ea3"}},
      {"byol_cifar10.json", {"byol", "solo_learn", 1.0, 1e-5, 3e-5, 0.0, 1000, "solo-learn 9187ea3"}},
      {"simsiam_cifar10.json", {"simsiam", "official", 0.5, 1e-5, 3e-5, 0.0, 1000, "solo-learn 9187ea3"}},
      {"vicreg_imagenet.json", {"vicreg", "official", 0.2, 1e-6, 0.0, 0.001, 100, "facebookresearch/vicreg 4e12602"}},
      {"barlow_twins_imagenet.json",
       {"barlow_twins", "official", 0.2, 1e-6, 0.0, 0.001, 1000, "facebookresearch/barlowtwins 8e8d284"}},
      {"byol_imagenet.json", {"byol", "official", 0.2, 1.5e-6, 0.0, 0.0, 300, "arXiv:2006.07733"}},
      {"vicreg_vit_small_imagenet.json", {"vicreg", "official", 3e-4, 0.1, 3e-5, 0.0, 400, "solo-learn 9187ea3"}},
      {"barlow_twins_vit_small_imagenet.json",
       {"barlow_twins", "official", 3e-4, 0.1, 3e-5, 0.0, 400, "solo-learn 9187ea3"}},
      {"byol_vit_small_imagenet.json", {"byol", "official", 3e-4, 0.1, 3e-5, 0.0, 400, "solo-learn 9187ea3"}},
      {"vicreg_vit_small_cifar10.json", {"vicreg", "official", 2e-4, 0.05, 3e-5, 0.0, 1000, "solo-learn 9187ea3"}},
  };
  const fs::path configs = fs::path(TWINS_TEST_REFERENCE_DIR) / "../../configs";
  for (const auto& entry : pins) {
    const std::string& file = entry.first;
    const auto& pin = entry.second;
    CAPTURE(file);
    const json cfg = twins::config::load_config((configs / file).string());
    const Recipe r = Recipe::parse(cfg);
    const std::string comment = cfg.at("_comment");
    // The comment names the source and, for code, its commit (the first 7 hex digits suffice here).
    CHECK(comment.find(pin.source.substr(0, pin.source.find(' '))) != std::string::npos);
    if (pin.source.find(' ') != std::string::npos)
      CHECK(comment.find(pin.source.substr(pin.source.find(' ') + 1)) != std::string::npos);
    CHECK(r.method == pin.method);
    CHECK(r.optimizer.lars_variant == pin.lars_variant);
    CHECK(r.optimizer.base_lr == pin.base_lr);
    CHECK(r.optimizer.weight_decay == pin.weight_decay);
    CHECK(r.schedule.warmup_start_lr == pin.warmup_start_lr);
    CHECK(r.schedule.final_lr_ratio == pin.final_lr_ratio);
    CHECK(r.schedule.warmup_epochs == 10);
    CHECK(r.train.epochs == pin.epochs);
    // Loss weights: solo-learn sums VICReg's variance branches, the official code averages them;
    // solo-learn normalises Barlow Twins per rank and scales its loss by 0.1.
    const json loss = twins::losses::create_loss(r.loss)->to_json();
    const bool solo = pin.source.rfind("solo-learn", 0) == 0;
    const bool vit = r.backbone["type"].get<std::string>().rfind("vit", 0) == 0;
    // The ViT ImageNet recipes take solo-learn's ViT optimisation but the official methods' losses.
    const bool solo_loss = solo && !(vit && file.find("imagenet") != std::string::npos);
    if (pin.method == "vicreg") {
      CHECK(loss["sim_coeff"] == 25.0);
      CHECK(loss["std_coeff"] == 25.0);
      CHECK(loss["cov_coeff"] == 1.0);
      CHECK(loss["average_variance_branches"] == !solo_loss);
    }
    if (pin.method == "barlow_twins") {
      CHECK(loss["lambda"] == 0.0051);
      CHECK(loss["scale"] == (solo_loss ? 0.1 : 1.0));
      CHECK(loss["normalize"] == (solo_loss ? "per_rank" : "global"));
    }
    if (solo) CHECK(r.train.sync_batchnorm);
    if (solo && !vit) CHECK(r.backbone["stem_padding"] == 2);
    if (vit) CHECK(r.optimizer.type == "adamw");
    if (r.optimizer.type == "lars") CHECK(r.optimizer.clip == solo);
  }
  // The tests only know the recipes they pin: a new recipe gets a pin too.
  for (const auto& e : fs::directory_iterator(configs))
    if (e.path().extension() == ".json" && e.path().filename() != "quickstart.json")
      CHECK(pins.count(e.path().filename().string()) == 1);
}

TEST_CASE("train: LARS in solo-learn's and lightly's form matches their code step for step") {
  const json golden = twins::test::read_json(twins::test::reference_path("lars_solo_learn_golden.json"));
  for (const auto& g : golden["cases"]) {
    CAPTURE(g["name"].get<std::string>());
    std::vector<at::Tensor> params;
    for (size_t i = 0; i < 3; ++i) {
      std::vector<int64_t> shape = g["shapes"][i];
      params.push_back(
          at::tensor(g["initial"][i].get<std::vector<double>>(), at::kDouble).view(shape).set_requires_grad(true));
    }
    const auto o = LARSOptions(g["lr"].get<double>())
                       .weight_decay(g["weight_decay"])
                       .momentum(g["momentum"])
                       .eta(g["eta"])
                       .clip(g["clip"])
                       .exclude_1d(g["exclude_1d"])
                       .exclude_zero_weight_decay(g["exclude_zero_weight_decay"])
                       .variant(LARSVariant::solo_learn)
                       .eps(g["eps"]);
    std::vector<torch::optim::OptimizerParamGroup> groups;
    groups.emplace_back(std::vector<at::Tensor>{params[0], params[2]}, std::make_unique<LARSOptions>(o));
    groups.emplace_back(std::vector<at::Tensor>{params[1]},
                        std::make_unique<LARSOptions>(LARSOptions(o).weight_decay(g["bias_weight_decay"])));
    LARS opt(std::move(groups), o);
    const double worst = replay_lars_golden(opt, params, g);
    MESSAGE(g["name"].get<std::string>(), " LARS worst absolute difference over 3 steps: ", worst);
    CHECK(worst < 1e-13);
  }
}

TEST_CASE("train: each parameter group keeps its own options (newer LibTorch rebuilds them from the defaults)") {
  // LibTorch 2.14 replaced LARS's 1-D group options by the defaults (decay and adaptation on biases
  // and norms) and SGD's weight decay 0 by the weights' decay; compat::keep_group_options undoes it.
  TinyData data(8);
  for (const std::string type : {"lars", "lars zero_weight_decay", "sgd", "adamw"}) {
    CAPTURE(type);
    json config = twins::test::tiny_recipe("vicreg", data.dir);
    config["optimizer"] = {{"type", type.substr(0, type.find(' '))}, {"base_lr", 0.3}, {"weight_decay", 0.05}};
    if (type == "lars zero_weight_decay") config["optimizer"]["lars_exclude"] = "zero_weight_decay";
    const auto recipe = Recipe::parse(config);
    const twins::train::detail::SSLModel model(recipe, 0);
    const auto optimizer = twins::train::detail::make_optimizer(recipe.optimizer, model, 0.3, 0.1);
    const auto& groups = optimizer->param_groups();
    REQUIRE(groups.size() == 2);
    CHECK(groups[0].options().get_lr() == 0.3);
    CHECK(groups[1].options().get_lr() == 0.1);
    auto decay = [&](const torch::optim::OptimizerOptions& o) {
      if (type == "sgd") return static_cast<const torch::optim::SGDOptions&>(o).weight_decay();
      if (type == "adamw") return static_cast<const torch::optim::AdamWOptions&>(o).weight_decay();
      return static_cast<const LARSOptions&>(o).weight_decay();
    };
    CHECK(decay(groups[0].options()) == 0.05);
    CHECK(decay(groups[1].options()) == 0.0);
    if (type.rfind("lars", 0) == 0) {
      const auto& flat = static_cast<const LARSOptions&>(groups[1].options());
      CHECK(flat.exclude_zero_weight_decay());
      CHECK_FALSE(flat.exclude_1d());
    }
  }
}

TEST_CASE("train: the multi-tensor LARS equals the per-parameter formulas bit for bit on the CPU") {
  // The per-parameter form of both variants (what LARS::step computed before it went multi-tensor).
  auto reference = [](std::vector<at::Tensor>& ps, std::vector<at::Tensor>& mus, const std::vector<at::Tensor>& gs,
                      const LARSOptions& o) {
    for (size_t i = 0; i < ps.size(); ++i) {
      const at::Tensor& p = ps[i];
      at::Tensor d = gs[i];
      auto clip = [&](const at::Tensor& q) {
        if (!o.clip()) return q;
        return o.lr() > 0 ? at::clamp_max(q / o.lr(), 1.0) : at::ones_like(q);
      };
      if (o.exclude_1d() && p.dim() == 1) {
      } else if (o.variant() == LARSVariant::official) {
        if (o.weight_decay() != 0) d = d.add(p, o.weight_decay());
        const at::Tensor pn = p.norm(), un = d.norm(), one = at::ones_like(pn);
        d = d.mul(clip(at::where(pn > 0., at::where(un > 0, o.eta() * pn / un, one), one)));
      } else {
        const at::Tensor pn = p.norm(), gn = d.norm();
        const at::Tensor q = o.eta() * pn / (gn + o.weight_decay() * pn + o.eps());
        d = at::where(at::logical_and(pn > 0, gn > 0), d.add(p, o.weight_decay()).mul(clip(q)), d);
      }
      mus[i].mul_(o.momentum()).add_(d);
      p.add_(mus[i], -o.lr());
    }
  };
  for (const auto variant : {LARSVariant::official, LARSVariant::solo_learn})
    for (const bool clip : {false, true})
      for (const double lr : {0.0, 0.3}) {
        CAPTURE(static_cast<int>(variant));
        CAPTURE(clip);
        CAPTURE(lr);
        at::manual_seed(11);
        // A weight, a conv weight, a bias (1-D: excluded), an all-zero weight, one with a zero gradient.
        std::vector<at::Tensor> a{at::randn({8, 5}), at::randn({4, 3, 3, 3}), at::randn({8}), at::zeros({6, 2}),
                                  at::randn({3, 3})};
        std::vector<at::Tensor> b, mus;
        for (auto& t : a) {
          b.push_back(t.clone());
          mus.push_back(at::zeros_like(t));
          t.set_requires_grad(true);
        }
        const auto o = LARSOptions(lr).weight_decay(1e-2).momentum(0.9).eta(0.02).clip(clip).variant(variant);
        LARS opt(a, o);
        for (int step = 0; step < 3; ++step) {
          std::vector<at::Tensor> gs;
          for (size_t i = 0; i < a.size(); ++i) gs.push_back(i == 4 ? at::zeros_like(a[i]) : at::randn_like(a[i]));
          for (size_t i = 0; i < a.size(); ++i) a[i].mutable_grad() = gs[i].clone();
          opt.step();
          reference(b, mus, gs, o);
          for (size_t i = 0; i < a.size(); ++i) CHECK(at::equal(a[i].detach(), b[i]));
        }
      }
}

TEST_CASE("train: the multi-tensor AdamW equals LibTorch's AdamW bit for bit on the CPU") {
  for (const bool amsgrad : {false, true}) {
    CAPTURE(amsgrad);
    at::manual_seed(21);
    std::vector<at::Tensor> a{at::randn({8, 5}), at::randn({4, 3, 3, 3}), at::randn({8}), at::randn({3, 3})};
    std::vector<at::Tensor> b;
    for (auto& t : a) {
      b.push_back(t.clone());
      t.set_requires_grad(true);
      b.back().set_requires_grad(true);
    }
    const auto o = torch::optim::AdamWOptions(3e-3).weight_decay(0.05).betas({0.9, 0.95}).eps(1e-8).amsgrad(amsgrad);
    auto groups = [&](std::vector<at::Tensor>& ps) {  // decayed weights; the rest without decay
      std::vector<torch::optim::OptimizerParamGroup> out;
      out.emplace_back(std::vector<at::Tensor>{ps[0], ps[1], ps[3]}, std::make_unique<torch::optim::AdamWOptions>(o));
      out.emplace_back(std::vector<at::Tensor>{ps[2]},
                       std::make_unique<torch::optim::AdamWOptions>(torch::optim::AdamWOptions(o).weight_decay(0.0)));
      return out;
    };
    twins::train::detail::MultiTensorAdamW mine(groups(a), o);
    torch::optim::AdamW theirs(groups(b), o);
    for (int step = 0; step < 4; ++step) {
      for (size_t i = 0; i < a.size(); ++i) {
        // The last weight has no gradient at step 1, so its step count lags the others'.
        const at::Tensor g = (step == 1 && i == 3) ? at::Tensor() : at::randn_like(a[i]);
        a[i].mutable_grad() = g.defined() ? g.clone() : at::Tensor();
        b[i].mutable_grad() = g.defined() ? g.clone() : at::Tensor();
      }
      mine.step();
      theirs.step();
      for (size_t i = 0; i < a.size(); ++i) CHECK(at::equal(a[i].detach(), b[i].detach()));
    }
  }
}

TEST_CASE("train: LARS clipping at lr 0 takes the limit, so the first warm-up step stores the whole update") {
  // At lr 0, min(q / lr, 1) -> 1: the momentum buffer gets d, as solo-learn's warm-up from 3e-5
  // gives, not q d (the adaptation skipped because of the zero lr).
  for (const auto variant : {LARSVariant::official, LARSVariant::solo_learn}) {
    at::Tensor p = at::full({3, 3}, 2.0, at::kDouble).set_requires_grad(true);
    LARS opt(std::vector<at::Tensor>{p},
             LARSOptions(0.0).weight_decay(0.0).momentum(0.9).eta(0.001).clip(true).variant(variant));
    p.mutable_grad() = at::full({3, 3}, 0.5, at::kDouble);
    opt.step();
    // After a second step at lr 1 with zero gradient, p moves by -(0.9 * buffer): read the buffer back.
    const at::Tensor before = p.detach().clone();
    opt.param_groups()[0].options().set_lr(1.0);
    p.mutable_grad() = at::zeros({3, 3}, at::kDouble);
    opt.step();
    const at::Tensor buffer = (before - p.detach()) / 0.9;
    CHECK(at::allclose(buffer, at::full({3, 3}, 0.5, at::kDouble)));
  }
  CHECK(warmup_cosine_lr(0, 100, 10, 2.0, 0.0, 3e-5) == doctest::Approx(3e-5));
  CHECK(warmup_cosine_lr(5, 100, 10, 2.0, 0.0, 3e-5) == doctest::Approx(3e-5 + (2.0 - 3e-5) / 2));
  CHECK(warmup_cosine_lr(100, 100, 10, 2.0, 0.0, 3e-5) == doctest::Approx(0.0));
}

TEST_CASE("train: every method trains a tiny ViT, and resume with stochastic depth and AdamW is bit-identical") {
  TinyData data(48);
  const json vit = {{"type", "vit"}, {"image_size", 12}, {"patch_size", 4}, {"in_channels", 1}, {"depth", 2},
                    {"hidden", 16},  {"heads", 2},       {"mlp", 32},       {"drop_path", 0.2}};
  for (const std::string& method : twins::losses::loss_names()) {
    CAPTURE(method);
    json cfg = tiny_recipe(method, data.dir);
    cfg["model"]["backbone"] = vit;
    cfg["model"]["backbone"]["drop_path"] = 0.0;
    cfg["train"]["epochs"] = 5;  // 3 steps per epoch
    const auto result = pretrain(cfg, quiet(data.dir / ("vit_" + method)));
    REQUIRE(result.steps == 15);
    const std::vector<double> losses = logged_losses(data.dir / ("vit_" + method));
    REQUIRE(losses.size() == 15);
    const double first = (losses[0] + losses[1] + losses[2]) / 3, last = (losses[12] + losses[13] + losses[14]) / 3;
    MESSAGE(method, " ViT: loss ", first, " -> ", last);
    CHECK(last < first);
    const auto backbone =
        twins::models::load_safetensors((data.dir / ("vit_" + method) / "backbone.safetensors").string());
    CHECK(backbone.contains("encoder.layers.encoder_layer_1.self_attention.in_proj_weight"));
  }
  // Stochastic depth draws from (seed, step): stopping and resuming changes nothing, with AdamW
  // (the ViT recipes' optimizer) restoring its moments and step counts.
  json cfg = tiny_recipe("vicreg", data.dir);
  cfg["model"]["backbone"] = vit;
  cfg["optimizer"] = {{"type", "adamw"}, {"base_lr", 1e-3}, {"weight_decay", 0.05}};
  cfg["train"]["checkpoint_every_steps"] = 1;
  const auto full = pretrain(cfg, quiet(data.dir / "vit_full"));
  PretrainOptions part = quiet(data.dir / "vit_part");
  part.stop_after = 4;
  pretrain(cfg, part);
  PretrainOptions rest = quiet(data.dir / "vit_part");
  rest.resume = true;
  CHECK(pretrain(json::object(), rest).steps == full.steps);
  const auto a = twins::models::load_safetensors((data.dir / "vit_full/backbone.safetensors").string());
  const auto b = twins::models::load_safetensors((data.dir / "vit_part/backbone.safetensors").string());
  for (const auto& entry : a.tensors) {
    const std::string& name = entry.first;
    CAPTURE(name);
    CHECK(at::equal(entry.second, b.at(name)));
  }
}

namespace {

// A step's data: `n` samples of two 12x12 grey views and labels 0-3.
twins::data::Batch random_batch(int64_t n, uint64_t seed) {
  at::manual_seed(seed);
  twins::data::Batch b;
  for (int v = 0; v < 2; ++v) b.views.push_back(at::randint(0, 256, {n, 1, 12, 12}, at::kByte));
  b.labels = at::arange(n, at::kLong).remainder(4);
  return b;
}

twins::data::Batch joined(const std::vector<twins::data::Batch>& parts) {
  twins::data::Batch b;
  for (size_t v = 0; v < parts[0].views.size(); ++v) {
    std::vector<at::Tensor> rows;
    for (const auto& p : parts) rows.push_back(p.views[v]);
    b.views.push_back(at::cat(rows));
  }
  std::vector<at::Tensor> labels;
  for (const auto& p : parts) labels.push_back(p.labels);
  b.labels = at::cat(labels);
  return b;
}

struct Stepped {
  std::vector<double> losses;
  twins::models::NamedTensors state;  // without the optimizers' archives
};

// Two steps of `cfg` (same initialisation for every call) over `batches` accumulated.
Stepped two_steps(json cfg, const std::vector<twins::data::Batch>& batches, bool cache) {
  cfg["train"]["batch_size"] = batches[0].views[0].size(0);
  cfg["train"]["grad_accumulation"] = static_cast<int64_t>(batches.size());
  cfg["train"]["grad_cache"] = cache;
  TrainerOptions o;
  o.num_classes = 4, o.steps_per_epoch = 2, o.total_steps = 2;
  at::manual_seed(0);
  Trainer trainer(Recipe::parse(cfg), o);
  Stepped s;
  for (int i = 0; i < 2; ++i) s.losses.push_back(trainer.step(batches).loss);
  for (auto& [name, t] : trainer.state())
    if (name.find("optimizer_state") == std::string::npos) s.state.emplace_back(name, t);
  return s;
}

// max |a - b| / max |b| over the tensors whose names start with one of `prefixes`.
double state_error(const Stepped& a, const Stepped& b, const std::vector<std::string>& prefixes) {
  double num = 0, den = 0;
  REQUIRE(a.state.size() == b.state.size());
  for (size_t i = 0; i < a.state.size(); ++i) {
    REQUIRE(a.state[i].first == b.state[i].first);
    bool wanted = false;
    for (const auto& p : prefixes) wanted = wanted || a.state[i].first.rfind(p, 0) == 0;
    if (!wanted || !a.state[i].second.is_floating_point()) continue;
    num = std::max(num, (a.state[i].second - b.state[i].second).abs().max().item<double>());
    den = std::max(den, b.state[i].second.abs().max().item<double>());
  }
  return num / std::max(den, 1e-30);
}

}  // namespace

TEST_CASE("train: train.grad_cache takes the loss over the step's whole batch") {
  TinyData data(8);
  const std::vector<twins::data::Batch> parts{random_batch(8, 1), random_batch(8, 2)};
  const std::vector<twins::data::Batch> whole{joined(parts)};
  const std::vector<std::string> online{"backbone.", "projector.", "predictor.", "target_"};
  // Per-sample networks (a ViT, heads without BatchNorm): accumulating two batches of 8 with
  // the cache is one step over 16, for every method; without it, only the per-sample losses are.
  const json vit = {{"type", "vit"}, {"image_size", 12}, {"patch_size", 4}, {"in_channels", 1}, {"depth", 1},
                    {"hidden", 16},  {"heads", 2},       {"mlp", 32},       {"drop_path", 0.0}};
  const json head = {{"type", "mlp"}, {"spec", "32-16"}, {"batch_norm", false}};
  for (const std::string& method : twins::losses::loss_names()) {
    CAPTURE(method);
    json cfg = tiny_recipe(method, data.dir);
    cfg["model"]["backbone"] = vit;
    cfg["model"]["projector"] = head;
    if (cfg["model"].contains("predictor")) cfg["model"]["predictor"] = head;
    const Stepped one = two_steps(cfg, whole, false), cached = two_steps(cfg, parts, true),
                  summed = two_steps(cfg, parts, false);
    const double cached_error = state_error(cached, one, online), summed_error = state_error(summed, one, online);
    MESSAGE(method, ": loss ", one.losses[1], " (one batch of 16), ", cached.losses[1], " (2 x 8 cached), ",
            summed.losses[1], " (2 x 8 summed); weights off by ", cached_error, " cached, ", summed_error, " summed");
    for (int i = 0; i < 2; ++i) CHECK(cached.losses[i] == doctest::Approx(one.losses[i]).epsilon(1e-5));
    CHECK(cached_error < 1e-5);
    if (twins::losses::create_loss(method)->needs().batch_statistics) {
      CHECK(std::abs(summed.losses[0] - one.losses[0]) > 1e-3 * std::abs(one.losses[0]));
      CHECK(summed_error > 1e-3);
    } else {
      CHECK(summed_error < 1e-5);
    }
  }
  // With BatchNorm (the ResNet and the heads), each batch's forward normalises by its own
  // statistics either way, and the running statistics move once per batch with or without the
  // cache: equal after the first step, whose forwards are the same.
  json cfg = tiny_recipe("vicreg", data.dir);
  auto first_step = [&](bool cache) {
    json c = cfg;
    c["train"]["batch_size"] = 8, c["train"]["grad_accumulation"] = 2, c["train"]["grad_cache"] = cache;
    TrainerOptions o;
    o.num_classes = 4, o.steps_per_epoch = 1, o.total_steps = 1;
    at::manual_seed(0);
    Trainer trainer(Recipe::parse(c), o);
    const double loss = trainer.step(parts).loss;
    return std::make_pair(loss, trainer.state());
  };
  // (Not structured bindings: CAPTURE's lambda cannot name them in C++17 with clang.)
  const auto cached_run = first_step(true), summed_run = first_step(false);
  const double cached_loss = cached_run.first, summed_loss = summed_run.first;
  const auto &cached_state = cached_run.second, &summed_state = summed_run.second;
  CHECK(cached_loss != summed_loss);
  int buffers = 0;
  for (size_t i = 0; i < cached_state.size(); ++i)
    if (cached_state[i].first.find("running_") != std::string::npos ||
        cached_state[i].first.find("num_batches_tracked") != std::string::npos) {
      CAPTURE(cached_state[i].first);
      CHECK(at::equal(cached_state[i].second, summed_state[i].second));
      ++buffers;
    }
  CHECK(buffers > 10);
  // BYOL (a per-sample loss) with BatchNorm, stochastic depth and the momentum target: the
  // cache's second forward draws what the first drew, so it equals the summed gradients.
  json byol = tiny_recipe("byol", data.dir);
  byol["model"]["backbone"] = vit;
  byol["model"]["backbone"]["drop_path"] = 0.3;
  byol["model"]["backbone"]["depth"] = 2;  // (the first block never drops)
  const Stepped cached = two_steps(byol, parts, true), summed = two_steps(byol, parts, false);
  const double error = state_error(cached, summed, {"backbone.", "projector.", "predictor.", "target_", "probe."});
  MESSAGE("BYOL with stochastic depth: cached and summed off by ", error);
  CHECK(error < 1e-5);
  CHECK(cached.losses[1] == doctest::Approx(summed.losses[1]).epsilon(1e-5));
  // The key is checked as a boolean.
  json bad = tiny_recipe("vicreg", data.dir);
  bad["train"]["grad_cache"] = 1;
  CHECK_THROWS_AS(Recipe::parse(bad), std::invalid_argument);
}

TEST_CASE("train: model.backbone_init starts the backbone, and BYOL's target, from a backbone file") {
  TinyData data(48);
  json cfg = tiny_recipe("byol", data.dir);
  cfg["train"]["epochs"] = 1;
  pretrain(cfg, quiet(data.dir / "source"));
  const fs::path file = data.dir / "init.safetensors";
  fs::copy_file(data.dir / "source" / "backbone.safetensors", file);
  const auto weights = twins::models::load_safetensors(file.string());

  // The trainer's backbone and momentum target hold the file's tensors (a run folder works too).
  TrainerOptions o;
  o.steps_per_epoch = 3, o.total_steps = 3;
  for (const fs::path& given : {file, data.dir / "source"}) {
    o.backbone_init = given.string();
    at::manual_seed(1);
    Trainer trainer(Recipe::parse(cfg), o);
    int compared = 0;
    for (const auto& entry : twins::models::backbone_state(trainer.backbone())) {
      const std::string& name = entry.first;
      CAPTURE(name);
      CHECK(at::equal(entry.second, weights.at(name)));
      ++compared;
    }
    CHECK(compared == static_cast<int>(weights.tensors.size()));
    std::map<std::string, at::Tensor> state;
    for (const auto& [name, t] : trainer.state()) state[name] = t;
    for (const auto& [name, t] : state)
      if (name.rfind("target_backbone.", 0) == 0) CHECK(at::equal(t, state.at(name.substr(7))));
  }
  // Another network, or no file: errors naming the key, the file and what differs.
  json wider = cfg;
  wider["model"]["backbone"]["width"] = 8;
  o.backbone_init = file.string();
  check_throws_with<std::invalid_argument>([&] { Trainer t(Recipe::parse(wider), o); },
                                           "model.backbone_init: " + file.string() + " holds another network");
  check_throws_with<std::invalid_argument>([&] { Trainer t(Recipe::parse(wider), o); }, "shape of conv1.weight");
  // The same shapes, another function: a ViT of other heads is refused; training-only settings
  // (stochastic depth) may differ.
  const json vit = {{"type", "vit"}, {"image_size", 12}, {"patch_size", 4}, {"in_channels", 1},
                    {"depth", 1},    {"hidden", 16},     {"heads", 2},      {"mlp", 32}};
  twins::models::save_backbone((data.dir / "vit.safetensors").string(), *twins::models::create_backbone(vit),
                               twins::models::BackboneInfo{});
  json other_heads = cfg;
  other_heads["model"]["backbone"] = vit;
  other_heads["model"]["backbone"]["heads"] = 4;
  o.backbone_init = (data.dir / "vit.safetensors").string();
  check_throws_with<std::invalid_argument>([&] { Trainer t(Recipe::parse(other_heads), o); },
                                           "heads: file 2, model.backbone 4");
  other_heads["model"]["backbone"]["heads"] = 2;
  other_heads["model"]["backbone"]["drop_path"] = 0.1;
  CHECK_NOTHROW(Trainer(Recipe::parse(other_heads), o));
  // A ViT trained at another image size (12 px, 3 x 3 patches; here 16 px, 4 x 4): its position
  // embedding resampled, so that the network computes what the file's does on 16 px inputs; a
  // ViT of other patches is refused.
  json larger = other_heads;
  larger["model"]["backbone"]["image_size"] = 16;
  {
    Trainer trainer(Recipe::parse(larger), o);
    auto file_vit = twins::models::load_backbone(o.backbone_init);
    auto* theirs = dynamic_cast<twins::models::ViT*>(file_vit.get());
    auto* ours = dynamic_cast<twins::models::ViT*>(&trainer.backbone());
    REQUIRE(theirs);
    REQUIRE(ours);
    at::NoGradGuard no_grad;
    theirs->eval(), ours->eval();
    const at::Tensor x = at::randn({2, 1, 16, 16});
    CHECK(twins::test::max_rel_error(ours->features(x), theirs->features(x)) < 1e-6);
    CHECK(ours->position_embedding(4, 4).sizes() == at::IntArrayRef({1, 17, 16}));
  }
  larger["model"]["backbone"]["patch_size"] = 2;
  check_throws_with<std::invalid_argument>([&] { Trainer t(Recipe::parse(larger), o); },
                                           "patch_size: file 4, model.backbone 2");
  o.backbone_init = (data.dir / "absent.safetensors").string();
  check_throws_with<std::runtime_error>([&] { Trainer t(Recipe::parse(cfg), o); }, "absent.safetensors");
  json bad = cfg;
  bad["model"]["backbone_init"] = 3;
  CHECK_THROWS_AS(Recipe::parse(bad), std::invalid_argument);

  // pretrain reads the file when the run starts, not when it resumes: the file may be gone by
  // then, and the resumed run ends where the uninterrupted one does.
  cfg["model"]["backbone_init"] = file.string();
  cfg["train"]["checkpoint_every_steps"] = 1;
  pretrain(cfg, quiet(data.dir / "full"));
  PretrainOptions part = quiet(data.dir / "part");
  part.stop_after = 1;
  pretrain(cfg, part);
  fs::remove(file);
  PretrainOptions rest = quiet(data.dir / "part");
  rest.resume = true;
  pretrain(json::object(), rest);
  const auto full = twins::models::load_safetensors((data.dir / "full/backbone.safetensors").string());
  const auto resumed = twins::models::load_safetensors((data.dir / "part/backbone.safetensors").string());
  const auto random = twins::models::load_safetensors((data.dir / "source/backbone.safetensors").string());
  bool differs_from_source = false;
  for (const auto& entry : full.tensors) {
    const std::string& name = entry.first;
    const at::Tensor& t = entry.second;
    CAPTURE(name);
    CHECK(at::equal(t, resumed.at(name)));
    differs_from_source = differs_from_source || !at::equal(t, random.at(name));
  }
  CHECK(differs_from_source);  // it trained on
  CHECK(full.metadata.at("twins_provenance").find("from " + file.string()) != std::string::npos);
}

TEST_CASE("train: the run folder's TensorBoard events file holds metrics.jsonl's numbers") {
  CHECK(twins::detail::crc32c("123456789") == 0xE3069283u);  // the CRC-32C check value
  CHECK(twins::detail::crc32c("") == 0u);
  TinyData data(48);
  json cfg = tiny_recipe("vicreg", data.dir);
  cfg["train"]["epochs"] = 2;
  pretrain(cfg, quiet(data.dir / "tb"));
  std::vector<fs::path> events;
  for (const auto& entry : fs::directory_iterator(data.dir / "tb"))
    if (entry.path().filename().string().find("tfevents") != std::string::npos) events.push_back(entry.path());
  REQUIRE(events.size() == 1);
  CHECK(events[0].filename().string().rfind("events.out.tfevents.", 0) == 0);
  // Decoded by the protobuf library, framing checked with the crc32c package.
  const std::string cmd = "/usr/bin/python3 " + std::string(TWINS_TEST_REFERENCE_DIR) + "/tfevents_check.py '" +
                          events[0].string() + "' '" + (data.dir / "tb" / "metrics.jsonl").string() + "'";
  const int status = std::system(cmd.c_str());
  const int code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  if (code == 77)
    MESSAGE("skipped the protobuf check: python3-protobuf or python3-crc32c is not installed");
  else
    CHECK(code == 0);
  // Steps of many varint bytes and a negative one, values beyond float's range, NaN and infinity.
  {
    twins::train::detail::RunLog log(data.dir / "edge", true, false, true, -1);
    log.append({{"step", -1}, {"a", 1.5}});
    log.append({{"step", 300}, {"loss", 2.25}, {"nan", std::nan("")}, {"inf", HUGE_VAL}, {"note", "text"}});
    log.append({{"step", int64_t{1} << 40}, {"epoch_seconds", 3.0}, {"big", 1e300}, {"neg", -1e300}, {"flag", true}});
    log.append({{"summary", true}, {"steps", 3}});
  }
  std::string edge;
  for (const auto& entry : fs::directory_iterator(data.dir / "edge"))
    if (entry.path().filename().string().find("tfevents") != std::string::npos) edge = entry.path().string();
  REQUIRE(!edge.empty());
  const std::string edge_cmd = "/usr/bin/python3 " + std::string(TWINS_TEST_REFERENCE_DIR) + "/tfevents_check.py '" +
                               edge + "' '" + (data.dir / "edge" / "metrics.jsonl").string() + "'";
  const int edge_status = std::system(edge_cmd.c_str());
  if (code != 77) CHECK((WIFEXITED(edge_status) ? WEXITSTATUS(edge_status) : -1) == 0);

  cfg["train"]["tensorboard"] = false;
  pretrain(cfg, quiet(data.dir / "no_tb"));
  for (const auto& entry : fs::directory_iterator(data.dir / "no_tb"))
    CHECK(entry.path().filename().string().find("tfevents") == std::string::npos);
}

TEST_CASE("train: online_probe.knn scores eval_data as twins knn would, without changing the training") {
  TinyData data(48);  // labels i % 4
  const json spec = {{"type", "mnist"}, {"root", data.dir.string()}};
  json plain = tiny_recipe("vicreg", data.dir);
  plain["online_probe"] = {{"eval_data", spec}};
  json cfg = plain;
  cfg["online_probe"]["knn"] = {{"k", {1, 5}}, {"every_epochs", 2}};
  const auto without = pretrain(plain, quiet(data.dir / "plain"));
  const auto with = pretrain(cfg, quiet(data.dir / "knn"));
  REQUIRE(with.online_knn_top1);
  CHECK_FALSE(without.online_knn_top1);
  // Monitoring leaves the weights alone.
  const auto a = twins::models::load_safetensors((data.dir / "plain/backbone.safetensors").string());
  const auto b = twins::models::load_safetensors((data.dir / "knn/backbone.safetensors").string());
  for (const auto& entry : a.tensors) {
    CAPTURE(entry.first);
    CHECK(at::equal(entry.second, b.at(entry.first)));
  }
  // Scored after epochs 2 and 3 (every 2, and the last), each k's top-1 and top-5.
  std::vector<json> epochs;
  for (const auto& l : read_lines(data.dir / "knn/metrics.jsonl"))
    if (l.contains("epoch_seconds")) epochs.push_back(l);
  REQUIRE(epochs.size() == 3);
  CHECK_FALSE(epochs[0].contains("online_knn_k1_top1"));
  CHECK(epochs[1].contains("online_knn_k5_top5"));
  CHECK(epochs[2].contains("online_probe_eval_top1"));
  // The bank is the eval data itself here: each sample is its own nearest neighbour.
  CHECK(epochs[2]["online_knn_k1_top1"].get<double>() == 100.0);
  CHECK(*with.online_knn_top1 == 100.0);
  CHECK(read_lines(data.dir / "knn/metrics.jsonl").back()["online_knn_top1"].get<double>() == 100.0);

  // The same numbers as the evaluation library's kNN on the finished backbone (the eval
  // transform of the training views' size and normalisation).
  const auto eval_config = twins::eval::EvalConfig::parse({{"train_data", spec},
                                                           {"test_data", spec},
                                                           {"image_size", 12},
                                                           {"normalize", {{"mean", {0.5}}, {"std", {0.25}}}},
                                                           {"device", "cpu"}});
  int64_t classes = 0;
  const auto features =
      twins::eval::eval_features((data.dir / "knn/backbone.safetensors").string(), eval_config, "", &classes);
  twins::eval::KnnOptions ko;
  ko.k = {1, 5};
  const auto offline = twins::eval::knn(features.first, features.second, classes, ko, at::kCPU);
  CHECK(epochs[2]["online_knn_k5_top1"].get<double>() == doctest::Approx(offline.at(5).top1).epsilon(1e-12));
  CHECK(epochs[2]["online_knn_k5_top5"].get<double>() == doctest::Approx(offline.at(5).top5).epsilon(1e-12));

  // A bank of 12 samples drawn with train.seed, and the monitor without the probe.
  cfg["online_probe"]["enabled"] = false;
  cfg["online_probe"]["knn"]["bank_size"] = 12;
  const auto sampled = pretrain(cfg, quiet(data.dir / "sampled"));
  const json last = read_lines(data.dir / "sampled/metrics.jsonl").back();
  CHECK_FALSE(last.contains("online_probe_top1"));
  std::vector<int64_t> picked = twins::augment::permutation(48, twins::augment::Rng(uint64_t{7}));
  picked.resize(12);
  std::sort(picked.begin(), picked.end());
  const auto again =
      twins::eval::eval_features((data.dir / "sampled/backbone.safetensors").string(), eval_config, "", &classes);
  const twins::eval::Features bank{again.first.features.index_select(0, at::tensor(picked)),
                                   again.first.labels.index_select(0, at::tensor(picked))};
  const auto small = twins::eval::knn(bank, again.second, classes, ko, at::kCPU);
  REQUIRE(sampled.online_knn_top1);
  CHECK(*sampled.online_knn_top1 == doctest::Approx(small.at(1).top1).epsilon(1e-12));
  CHECK(*sampled.online_knn_top1 < 100.0);

  // Its keys are checked as the eval config's are.
  cfg = plain;
  cfg["online_probe"]["knn"] = {{"k", 0}};
  check_throws_with<std::invalid_argument>([&] { Recipe::parse(cfg); },
                                           "online_probe.knn.k: values must be in [1, 10^6]");
  cfg["online_probe"]["knn"] = {{"bank_sise", 10}};
  check_throws_with<std::invalid_argument>([&] { Recipe::parse(cfg); },
                                           "online_probe.knn.bank_sise: unknown key; did you mean bank_size?");
  cfg["online_probe"]["knn"] = {{"k", 20}};
  cfg["online_probe"].erase("eval_data");
  check_throws_with<std::invalid_argument>([&] { Recipe::parse(cfg); },
                                           "online_probe.knn: needs online_probe.eval_data");
  cfg["online_probe"]["knn"]["enabled"] = false;
  CHECK_NOTHROW(Recipe::parse(cfg));

  // The online probe's eval data is opened before the first step: a wrong path fails at once.
  cfg = plain;
  cfg["online_probe"]["eval_data"]["root"] = (data.dir / "nowhere").string();
  check_throws_with<std::runtime_error>([&] { pretrain(cfg, quiet(data.dir / "no_eval_data")); },
                                        "online_probe.eval_data");
  CHECK((!fs::exists(data.dir / "no_eval_data/checkpoints") || fs::is_empty(data.dir / "no_eval_data/checkpoints")));
}

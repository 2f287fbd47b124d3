// CUDA against the CPU, in the style of ggml's backend tests: each case computes the same thing on
// the CPU and on the GPU and compares. Without CUDA (CI, the 2-core machines) every case says it
// is skipped and passes, so a GPU machine runs exactly what CI compiles.
#include <ATen/ATen.h>
#include <doctest/doctest.h>
#include <torch/cuda.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/compat.h"
#include "tests/test_util.h"
#include "tests/train/tiny_run.h"
#include "twins/config.h"
#include "twins/data/image_io.h"
#include "twins/distributed/communicator.h"
#include "twins/embed.h"
#include "twins/losses.h"
#include "twins/models/network.h"
#include "twins/models/safetensors.h"
#include "twins/train/pretrain.h"
#include "twins/train/trainer.h"

using nlohmann::json;
using namespace twins;

namespace {

bool have_cuda() {
  if (torch::cuda::is_available()) {
    // fp32 comparisons: no TF32 (its 10-bit mantissa would swamp the tolerances).
    at::globalContext().setAllowTF32CuBLAS(false);
    at::globalContext().setAllowTF32CuDNN(false);
    return true;
  }
  MESSAGE("skipped: CUDA is not available on this machine");
  return false;
}

double rel_error(const at::Tensor& gpu, const at::Tensor& cpu) {
  return twins::test::max_rel_error(gpu.cpu().to(at::kDouble), cpu.to(at::kDouble), 1e-3);
}

// |a - b| / |b| in the 2-norm: "close" for reduced precision, where single elements near zero
// carry no meaning.
double norm_rel_error(const at::Tensor& a, const at::Tensor& b) {
  const at::Tensor ad = a.cpu().to(at::kDouble), bd = b.cpu().to(at::kDouble);
  return (ad - bd).norm().item<double>() / std::max(bd.norm().item<double>(), 1e-12);
}

// The floating-point tensors of two safetensors files (model weights, BatchNorm statistics;
// not the optimizer's bytes), compared name by name: the worst error of `error`.
// `running_stats` false leaves out BatchNorm's running means and variances.
template <class ErrorF>
double worst_file_error(const std::filesystem::path& a, const std::filesystem::path& b, ErrorF error,
                        bool running_stats = true) {
  const auto fa = models::load_safetensors(a.string()), fb = models::load_safetensors(b.string());
  REQUIRE(fa.tensors.size() == fb.tensors.size());
  double worst = 0;
  for (const auto& entry : fa.tensors) {
    if (!at::isFloatingType(entry.second.scalar_type())) continue;
    if (!running_stats && entry.first.find(".running_") != std::string::npos) continue;
    const at::Tensor other = fb.at(entry.first);
    REQUIRE(other.sizes() == entry.second.sizes());
    const double e = error(entry.second, other);
    if (e > worst) MESSAGE("  " << entry.first << ": " << e);
    worst = std::max(worst, e);
  }
  return worst;
}

// A tiny run of `method` (tests/train/tiny_run.h) on `device`: `steps` steps, a checkpoint each.
json tiny_run(const std::string& method, const std::filesystem::path& data, const std::string& device, int64_t steps,
              const std::string& precision = "fp32") {
  json cfg = test::tiny_recipe(method, data);
  cfg["train"]["device"] = device;
  cfg["train"]["precision"] = precision;
  cfg["train"]["max_steps"] = steps;
  cfg["train"]["checkpoint_every_steps"] = 1;
  return cfg;
}

std::filesystem::path last_checkpoint(const std::filesystem::path& run, int64_t step) {
  char name[64];
  std::snprintf(name, sizeof name, "step-%08lld.safetensors", static_cast<long long>(step));
  return run / "checkpoints" / name;
}

// A uint8 batch of two views [n, 1, 12, 12] with labels 0..3, as the loader gives it.
data::Batch tiny_batch(int64_t n, uint64_t seed) {
  at::manual_seed(seed);
  data::Batch b;
  for (int v = 0; v < 2; ++v) b.views.push_back(at::randint(0, 256, {n, 1, 12, 12}, at::kByte));
  b.labels = at::arange(n, at::kLong).remainder(4);
  b.indices = at::arange(n, at::kLong);
  return b;
}

std::vector<at::Tensor> backbone_parameters(train::Trainer& trainer) {
  std::vector<at::Tensor> out;
  for (const auto& p : trainer.backbone().parameters()) out.push_back(p.detach().cpu().clone());
  return out;
}

// A .npy file of float32 (what `twins embed` writes) as a tensor [rows, cols].
at::Tensor read_float_npy(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  REQUIRE(bytes.size() > 10);
  REQUIRE(std::memcmp(bytes.data(), "\x93NUMPY", 6) == 0);
  const size_t header = static_cast<uint8_t>(bytes[8]) | (static_cast<size_t>(static_cast<uint8_t>(bytes[9])) << 8);
  const std::string dict(bytes.data() + 10, header);
  REQUIRE(dict.find("'<f4'") != std::string::npos);
  const size_t open = dict.find("'shape': ("), comma = dict.find(',', open);
  const int64_t rows = std::stoll(dict.substr(open + 10, comma - open - 10));
  const size_t data = 10 + header;
  const int64_t count = static_cast<int64_t>((bytes.size() - data) / 4);
  REQUIRE(rows > 0);
  return at::from_blob(bytes.data() + data, {count}, at::kFloat).clone().view({rows, count / rows});
}

}  // namespace

TEST_CASE("cuda: every loss and its gradients equal the CPU's (fp32), and stay close under bf16 autocast") {
  if (!have_cuda()) return;
  for (const auto& name : losses::loss_names()) {
    CAPTURE(name);
    const auto loss = losses::create_loss({{"type", name}});
    at::manual_seed(0);
    std::vector<at::Tensor> cpu_inputs;
    for (int i = 0; i < 6; ++i) cpu_inputs.push_back(at::randn({32, 64}));
    auto run = [&](const at::Device& device, bool bf16) {
      std::vector<at::Tensor> x;
      for (const auto& t : cpu_inputs) x.push_back(t.to(device).requires_grad_(true));
      at::Tensor total;
      {
        compat::Autocast autocast(at::kCUDA, bf16, at::kBFloat16);
        total = loss->compute(losses::ViewEmbeddings{x[0], x[1], x[2]}, losses::ViewEmbeddings{x[3], x[4], x[5]}).total;
      }
      total.backward();
      std::vector<at::Tensor> out{total.detach().to(at::kFloat).cpu()};
      for (const auto& t : x) out.push_back(t.grad().defined() ? t.grad().cpu() : at::zeros({1}));
      return out;
    };
    const auto cpu = run(at::kCPU, false), gpu = run(at::Device(at::kCUDA, 0), false);
    for (size_t k = 0; k < cpu.size(); ++k) {
      CAPTURE(k);
      CHECK(rel_error(gpu[k], cpu[k]) < 1e-4);
    }
    const auto bf16 = run(at::Device(at::kCUDA, 0), true);
    CHECK(std::isfinite(bf16[0].item<double>()));
    CHECK(rel_error(bf16[0], cpu[0]) < 5e-2);
  }
}

TEST_CASE(
    "cuda: ResNet-18/50 and the MLP heads forward and backward equal the CPU's, and channels_last equals contiguous") {
  if (!have_cuda()) return;
  auto run = [&](models::Network& net, const at::Tensor& input) {
    net.train();
    net.zero_grad();
    const at::Tensor y = net.forward(input);
    y.pow(2).mean().backward();
    std::vector<at::Tensor> out{y.detach().cpu()};
    for (const auto& p : net.parameters()) out.push_back(p.grad().cpu());
    return out;
  };
  auto worst_error = [](const std::vector<at::Tensor>& gpu, const std::vector<at::Tensor>& cpu) {
    REQUIRE(cpu.size() == gpu.size());
    double worst = 0;
    for (size_t k = 0; k < cpu.size(); ++k) worst = std::max(worst, rel_error(gpu[k], cpu[k]));
    return worst;
  };
  struct Case {
    const char* name;
    std::shared_ptr<models::Network> net;
    at::Tensor input;
    bool image;
  };
  at::manual_seed(1);
  std::vector<Case> cases;
  cases.push_back({"resnet18 (CIFAR stem, 32 px)",
                   models::create_backbone(json{{"type", "resnet18"}, {"cifar_stem", true}}), at::randn({8, 3, 32, 32}),
                   true});
  cases.push_back(
      {"resnet50 (224 px)", models::create_backbone(json{{"type", "resnet50"}}), at::randn({4, 3, 224, 224}), true});
  cases.push_back({"vicreg_projector", models::create_head("vicreg_projector", 512), at::randn({16, 512}), false});
  cases.push_back(
      {"barlow_twins_projector", models::create_head("barlow_twins_projector", 512), at::randn({16, 512}), false});
  cases.push_back({"byol_predictor", models::create_head("byol_predictor", 256), at::randn({16, 256}), false});
  for (auto& c : cases) {
    CAPTURE(c.name);
    auto gpu_net = c.net->copy();
    gpu_net->to(at::Device(at::kCUDA, 0));
    const auto cpu = run(*c.net, c.input);
    const auto gpu = run(*gpu_net, c.input.cuda());
    const double worst = worst_error(gpu, cpu);
    MESSAGE(c.name << " CUDA vs CPU, largest relative error over output and gradients: " << worst);
    CHECK(worst < 1e-3);
    if (!c.image) continue;
    auto nhwc_net = c.net->copy();
    nhwc_net->to(at::Device(at::kCUDA, 0));
    const auto nhwc = run(*nhwc_net, c.input.cuda().contiguous(at::MemoryFormat::ChannelsLast));
    const double layout = rel_error(nhwc[0], gpu[0]);
    MESSAGE(c.name << " channels_last vs contiguous on CUDA, output relative error: " << layout);
    CHECK(layout < 1e-4);
  }
}

TEST_CASE("cuda: the training step of every method runs on the GPU in fp32 and bf16 with finite speed") {
  if (!have_cuda()) return;
  for (const char* method : {"vicreg", "barlow_twins", "byol"}) {
    for (const char* precision : {"fp32", "bf16"}) {
      CAPTURE(method);
      CAPTURE(precision);
      json cfg =
          config::load_config(std::string(TWINS_TEST_REFERENCE_DIR) + "/../../configs/" + method + "_cifar10.json");
      cfg["train"]["batch_size"] = 32;
      cfg["train"]["precision"] = precision;
      cfg["train"]["channels_last"] = true;
      const auto r = train::bench_step(cfg, 2, 1, "cuda");
      CHECK(r.device.rfind("cuda", 0) == 0);
      CHECK(r.images_per_second > 0);
    }
  }
}

TEST_CASE("cuda: one training step of each method equals the CPU's in fp32 (TF32 off), and bf16 is finite and close") {
  if (!have_cuda()) return;
  test::TinyData data(48);
  for (const char* method : {"vicreg", "barlow_twins", "byol"}) {
    CAPTURE(method);
    const auto run = [&](const std::string& device, const std::string& precision) {
      const auto dir = data.dir / (std::string(method) + "-" + device + "-" + precision);
      train::pretrain(tiny_run(method, data.dir, device, 2, precision), test::quiet(dir));
      return last_checkpoint(dir, 2);
    };
    const auto cpu = run("cpu", "fp32");
    // Every model tensor of the checkpoint after 2 steps: online network, heads, BYOL's target,
    // BatchNorm statistics, the online probe.
    const double fp32 = worst_file_error(run("cuda", "fp32"), cpu, rel_error);
    MESSAGE(method << ": fp32 CUDA vs CPU after 2 steps, largest relative error " << fp32);
    CHECK(fp32 < 1e-4);
    // bf16: the weights (not the running statistics, which after 2 steps hold little more than
    // two batch means of bf16 activations) within 5% in norm, and finite (NaN fails the check).
    const double bf16 = worst_file_error(run("cuda", "bf16"), cpu, norm_rel_error, /*running_stats=*/false);
    MESSAGE(method << ": bf16 CUDA vs fp32 CPU after 2 steps, largest norm-relative error " << bf16);
    CHECK(bf16 < 5e-2);
  }
}

TEST_CASE("cuda: train.grad_cache steps equal the CPU's in fp32 (TF32 off), and bf16 ones are close") {
  if (!have_cuda()) return;
  test::TinyData data(48);
  for (const char* method : {"vicreg", "byol"}) {
    CAPTURE(method);
    const auto run = [&](const std::string& device, const std::string& precision) {
      json cfg = tiny_run(method, data.dir, device, 2, precision);
      cfg["train"]["batch_size"] = 8, cfg["train"]["grad_accumulation"] = 2, cfg["train"]["grad_cache"] = true;
      const auto dir = data.dir / ("cache-" + std::string(method) + "-" + device + "-" + precision);
      train::pretrain(cfg, test::quiet(dir));
      return last_checkpoint(dir, 2);
    };
    const auto cpu = run("cpu", "fp32");
    const double fp32 = worst_file_error(run("cuda", "fp32"), cpu, rel_error);
    MESSAGE(method << ": grad_cache fp32 CUDA vs CPU after 2 steps, largest relative error " << fp32);
    CHECK(fp32 < 1e-4);
    const double bf16 = worst_file_error(run("cuda", "bf16"), cpu, norm_rel_error, /*running_stats=*/false);
    MESSAGE(method << ": grad_cache bf16 CUDA vs fp32 CPU after 2 steps, largest norm-relative error " << bf16);
    CHECK(bf16 < 5e-2);
  }
}

TEST_CASE("cuda: fp16 with the gradient scaler: an overflowing step is skipped and halves the scale") {
  if (!have_cuda()) return;
  test::TinyData data(16);
  json cfg = test::tiny_recipe("vicreg", data.dir);
  cfg["train"]["precision"] = "fp16";
  const auto recipe = train::Recipe::parse(cfg);
  train::TrainerOptions o;
  o.device = at::Device(at::kCUDA, 0), o.num_classes = 4, o.steps_per_epoch = 3, o.total_steps = 9;
  at::manual_seed(0);
  train::Trainer trainer(recipe, o);
  CHECK(trainer.precision() == train::Precision::fp16);
  // From the initial scale 65536 (GradScaler's), as PyTorch's: the first steps may overflow; each
  // that does is skipped and halves the scale, until one updates.
  double scale = 65536.0;
  bool updated = false;
  for (uint64_t i = 0; i < 20 && !updated; ++i) {
    const auto r = trainer.step(tiny_batch(16, 1 + i));
    CHECK(std::isfinite(r.loss));
    if (r.skipped)
      scale /= 2;
    else
      updated = true;
    CHECK(trainer.state_info()["fp16_scale"].get<double>() == scale);
  }
  REQUIRE(updated);

  // Set the scale so large that the scaled gradients overflow in fp16.
  const auto file = std::filesystem::path(data.dir) / "state.safetensors";
  models::save_safetensors(file.string(), trainer.state());
  json info = trainer.state_info();
  info["fp16_scale"] = 1e38;
  trainer.load_state(models::load_safetensors(file.string()), info);
  const auto before = backbone_parameters(trainer);
  const auto overflow = trainer.step(tiny_batch(16, 30));
  CHECK(overflow.skipped);
  CHECK(std::isfinite(overflow.loss));  // the loss itself is unscaled
  CHECK(trainer.state_info()["fp16_scale"].get<double>() == doctest::Approx(5e37));
  const auto after = backbone_parameters(trainer);
  for (size_t k = 0; k < before.size(); ++k) CHECK(at::equal(before[k], after[k]));

  // Back to scale 1 (nothing to overflow): the next step updates, with finite weights.
  info["fp16_scale"] = 1.0;
  trainer.load_state(models::load_safetensors(file.string()), info);
  const auto good = trainer.step(tiny_batch(16, 31));
  CHECK_FALSE(good.skipped);
  const auto stepped = backbone_parameters(trainer);
  bool changed = false;
  for (size_t k = 0; k < stepped.size(); ++k) {
    CHECK(stepped[k].isfinite().all().item<bool>());
    changed = changed || !at::equal(stepped[k], before[k]);
  }
  CHECK(changed);
}

TEST_CASE(
    "cuda: NCCL at world size 1: all-reduce, the gradient reducer and SyncBatchNorm give the single-process step") {
  if (!have_cuda()) return;
  distributed::Environment env;
  env.launcher = "torchrun";
  env.master_port = 20000 + static_cast<int>(::getpid() % 20000);
  distributed::CommunicatorOptions co;
  co.backend = "nccl";
  const auto comm = distributed::Communicator::create(env, at::Device(at::kCUDA, 0), co);
  CHECK(comm->backend() == "nccl");
  CHECK(comm->world_size() == 1);
  at::Tensor x = at::arange(6, at::TensorOptions().dtype(at::kFloat).device(at::kCUDA));
  comm->all_reduce(x);
  CHECK(at::equal(x.cpu(), at::arange(6, at::kFloat)));

  test::TinyData data(16);
  for (bool sync_bn : {false, true}) {
    CAPTURE(sync_bn);
    json cfg = test::tiny_recipe("byol", data.dir);
    cfg["train"]["sync_batchnorm"] = sync_bn;
    cfg["train"]["precision"] = "fp32";  // (auto is bf16 on CUDA: SyncBatchNorm's sums against cuDNN's at 1e-5)
    const auto recipe = train::Recipe::parse(cfg);
    train::TrainerOptions o;
    o.device = at::Device(at::kCUDA, 0), o.num_classes = 4, o.steps_per_epoch = 3, o.total_steps = 9;
    at::manual_seed(0);
    train::Trainer alone(recipe, o);
    o.communicator = comm;
    at::manual_seed(0);
    train::Trainer ranked(recipe, o);
    for (uint64_t step = 0; step < 2; ++step) {
      const auto a = alone.step(tiny_batch(16, 10 + step)), b = ranked.step(tiny_batch(16, 10 + step));
      CHECK(b.loss == doctest::Approx(a.loss).epsilon(1e-5));
    }
    const auto pa = backbone_parameters(alone), pb = backbone_parameters(ranked);
    double worst = 0;
    for (size_t k = 0; k < pa.size(); ++k) worst = std::max(worst, rel_error(pb[k], pa[k]));
    MESSAGE("NCCL world 1" << (sync_bn ? " with SyncBatchNorm" : "") << " vs one process, relative error " << worst);
    CHECK(worst < 1e-4);
  }
}

TEST_CASE("cuda: a step replayed from a CUDA graph equals the eager step (train.cuda_graph) in fp32, bf16 and fp16") {
  if (!have_cuda()) return;
  // The same cuDNN algorithms on both sides (deterministic, no autotuning), restored afterwards.
  auto& context = at::globalContext();
  const bool deterministic = context.deterministicCuDNN(), benchmark = context.benchmarkCuDNN();
  context.setDeterministicCuDNN(true);
  context.setBenchmarkCuDNN(false);
  test::TinyData data(16);
  for (const char* method : {"vicreg", "barlow_twins", "byol"}) {
    for (const char* precision : {"fp32", "bf16", "fp16"}) {
      CAPTURE(method);
      CAPTURE(precision);
      json cfg = test::tiny_recipe(method, data.dir);
      cfg["train"]["precision"] = precision;
      train::TrainerOptions o;
      o.device = at::Device(at::kCUDA, 0), o.num_classes = 4, o.steps_per_epoch = 4, o.total_steps = 12;
      at::manual_seed(0);
      train::Trainer eager(train::Recipe::parse(cfg), o);
      cfg["train"]["cuda_graph"] = true;
      at::manual_seed(0);
      train::Trainer graphed(train::Recipe::parse(cfg), o);
      REQUIRE(graphed.cuda_graph());
      // Three eager warm-up steps, the capture, replays, a smaller batch (eager), replays again.
      // A failed capture throws (naming train.cuda_graph) and fails the case.
      const int64_t sizes[] = {16, 16, 16, 16, 16, 16, 8, 16, 16};
      uint64_t seed = 100;
      for (const int64_t n : sizes) {
        const data::Batch batch = tiny_batch(n, seed++);
        const auto a = eager.step(batch), b = graphed.step(batch);
        CAPTURE(seed);
        CHECK(b.loss == doctest::Approx(a.loss).epsilon(1e-5));
        CHECK(b.skipped == a.skipped);
      }
      const auto ea = eager.state(), ga = graphed.state();
      REQUIRE(ea.size() == ga.size());
      double worst = 0;
      for (size_t k = 0; k < ea.size(); ++k)
        if (at::isFloatingType(ea[k].second.scalar_type()))
          worst = std::max(worst, norm_rel_error(ga[k].second, ea[k].second));
      MESSAGE(method << " " << precision << ": graphed vs eager after 9 steps, largest norm-relative error " << worst);
      CHECK(worst < (std::string(precision) == "fp32" ? 1e-5 : 1e-3));
      const auto pe = eager.end_probe_epoch(), pg = graphed.end_probe_epoch();
      CHECK(pg.seen == pe.seen);
      CHECK(std::abs(pg.correct - pe.correct) <= 1);
    }
  }
  context.setDeterministicCuDNN(deterministic);
  context.setBenchmarkCuDNN(benchmark);
  // `twins bench step` times the replayed step.
  json cfg = config::load_config(std::string(TWINS_TEST_REFERENCE_DIR) + "/../../configs/vicreg_cifar10.json");
  cfg["train"]["batch_size"] = 32;
  cfg["train"]["precision"] = "bf16";
  cfg["train"]["channels_last"] = true;
  cfg["train"]["cuda_graph"] = true;
  const auto r = train::bench_step(cfg, 3, 1, "cuda");
  CHECK(r.cuda_graph);
  CHECK(r.images_per_second > 0);
}

TEST_CASE("cuda: resume in deterministic mode is bit-identical (N + M steps == N, resume, M)") {
  if (!have_cuda()) return;
  test::TinyData data(48);
  json cfg = tiny_run("byol", data.dir, "cuda", 0);
  cfg["train"]["epochs"] = 2;  // 3 steps per epoch
  CHECK(cfg["train"]["deterministic"].get<bool>());
  const auto full = train::pretrain(cfg, test::quiet(data.dir / "full"));
  REQUIRE(full.steps == 6);
  auto part = test::quiet(data.dir / "part");
  part.stop_after = 4;
  CHECK(train::pretrain(cfg, part).interrupted);
  auto rest = test::quiet(data.dir / "part");
  rest.resume = true;
  CHECK(train::pretrain(json::object(), rest).steps == 6);
  const double worst =
      worst_file_error(last_checkpoint(data.dir / "full", 6), last_checkpoint(data.dir / "part", 6),
                       [](const at::Tensor& a, const at::Tensor& b) { return at::equal(a, b) ? 0.0 : 1.0; });
  CHECK(worst == 0);
}

TEST_CASE("cuda: a run stopped on the CPU resumes on the GPU, and one stopped on the GPU resumes on the CPU") {
  if (!have_cuda()) return;
  test::TinyData data(48);
  // LARS's momentum goes to the device the run resumes on, not the one it was saved from.
  for (const auto& devices : {std::pair<std::string, std::string>{"cpu", "cuda"}, {"cuda", "cpu"}}) {
    const std::string& first = devices.first;
    const std::string& then = devices.second;
    CAPTURE(first);
    json cfg = tiny_run("byol", data.dir, first, 0);
    cfg["train"]["epochs"] = 2;  // 3 steps per epoch
    const std::filesystem::path dir = data.dir / ("from_" + first);
    auto part = test::quiet(dir);
    part.stop_after = 2;
    CHECK(train::pretrain(cfg, part).interrupted);
    auto rest = test::quiet(dir);
    rest.resume = true, rest.device = then;
    CHECK(train::pretrain(json::object(), rest).steps == 6);
  }
}

TEST_CASE("cuda: the Embedder and `twins embed` on CUDA equal the CPU within 1e-4") {
  if (!have_cuda()) return;
  test::TinyData data(48);
  const auto run = data.dir / "run";
  train::pretrain(tiny_run("vicreg", data.dir, "cpu", 2), test::quiet(run));
  const std::string backbone = (run / "backbone.safetensors").string();
  at::manual_seed(5);
  const at::Tensor images = at::randint(0, 256, {10, 1, 16, 16}, at::kByte);
  EmbedderOptions co, go;
  co.device = "cpu", go.device = "cuda";
  const at::Tensor cpu = Embedder(backbone, co).embed(images), gpu = Embedder(backbone, go).embed(images);
  REQUIRE(cpu.sizes() == gpu.sizes());
  MESSAGE("Embedder CUDA vs CPU, relative error " << rel_error(gpu, cpu));
  CHECK(rel_error(gpu, cpu) < 1e-4);
#ifdef TWINS_CLI_PATH
  const auto folder = data.dir / "images";
  std::filesystem::create_directories(folder / "a");
  for (int64_t i = 0; i < images.size(0); ++i)
    data::write_image((folder / "a" / ("img" + std::to_string(i) + ".png")).string(),
                      images[i].permute({1, 2, 0}).contiguous());
  // The command keeps PyTorch's default, TF32 cuDNN convolutions (10-bit mantissa): within 1e-4
  // with TF32 off (NVIDIA_TF32_OVERRIDE=0, cuBLAS and cuDNN alike), and close with it on.
  for (const char* run_as : {"cpu", "cuda", "cuda-tf32"}) {
    const std::string name = run_as, device = name == "cpu" ? "cpu" : "cuda";
    const std::string command = std::string(name == "cuda" ? "NVIDIA_TF32_OVERRIDE=0 " : "") + TWINS_CLI_PATH +
                                " embed --backbone " + backbone + " --input " + folder.string() + " --device " +
                                device + " --output " + (data.dir / (name + ".npy")).string() + " > /dev/null 2>&1";
    REQUIRE(std::system(command.c_str()) == 0);
  }
  const at::Tensor cli_cpu = read_float_npy(data.dir / "cpu.npy"), cli_gpu = read_float_npy(data.dir / "cuda.npy");
  REQUIRE(cli_cpu.sizes() == cli_gpu.sizes());
  CHECK(cli_cpu.size(0) == images.size(0));
  MESSAGE("twins embed --device cuda (TF32 off) vs cpu, relative error " << rel_error(cli_gpu, cli_cpu));
  CHECK(rel_error(cli_gpu, cli_cpu) < 1e-4);
  const at::Tensor cli_tf32 = read_float_npy(data.dir / "cuda-tf32.npy");
  MESSAGE("twins embed --device cuda (TF32, the default) vs cpu, relative error in the 2-norm "
          << norm_rel_error(cli_tf32, cli_cpu));
  CHECK(norm_rel_error(cli_tf32, cli_cpu) < 1e-2);
#endif
}

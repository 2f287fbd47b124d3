// CUDA against the CPU, in the style of ggml's backend tests: each case computes the same thing on
// the CPU and on the GPU and compares. Without CUDA (CI, the 2-core machines) every case says it
// is skipped and passes, so a GPU machine runs exactly what CI compiles.
#include <ATen/ATen.h>
#include <doctest/doctest.h>
#include <torch/cuda.h>

#include <nlohmann/json.hpp>

#include "core/compat.h"
#include "tests/test_util.h"
#include "twins/config.h"
#include "twins/losses.h"
#include "twins/models/network.h"
#include "twins/train/pretrain.h"

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
        compat::CudaAutocast autocast(bf16, at::kBFloat16);
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

TEST_CASE("cuda: ResNet-18 forward and backward equal the CPU's; channels_last equals contiguous") {
  if (!have_cuda()) return;
  at::manual_seed(1);
  auto cpu_net = models::create_backbone(json{{"type", "resnet18"}, {"cifar_stem", true}});
  auto gpu_net = cpu_net->copy();
  gpu_net->to(at::Device(at::kCUDA, 0));
  const at::Tensor x = at::randn({8, 3, 32, 32});
  auto run = [&](models::Network& net, const at::Tensor& input) {
    net.train();
    net.zero_grad();
    const at::Tensor y = net.forward(input);
    y.pow(2).mean().backward();
    std::vector<at::Tensor> out{y.detach().cpu()};
    for (const auto& p : net.parameters()) out.push_back(p.grad().cpu());
    return out;
  };
  const auto cpu = run(*cpu_net, x);
  const auto gpu = run(*gpu_net, x.cuda());
  REQUIRE(cpu.size() == gpu.size());
  double worst = 0;
  for (size_t k = 0; k < cpu.size(); ++k) worst = std::max(worst, rel_error(gpu[k], cpu[k]));
  MESSAGE("ResNet-18 CUDA vs CPU, largest relative error over output and gradients: " << worst);
  CHECK(worst < 1e-3);
  auto nhwc_net = cpu_net->copy();
  nhwc_net->to(at::Device(at::kCUDA, 0));
  const auto nhwc = run(*nhwc_net, x.cuda().contiguous(at::MemoryFormat::ChannelsLast));
  CHECK(rel_error(nhwc[0], gpu[0]) < 1e-4);
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

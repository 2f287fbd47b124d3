// ViT backbones against torchvision's VisionTransformer: tests/reference/vit_reference.py stores a
// tiny torchvision ViT (float64 weights, vit_tiny.safetensors) and its outputs (vit_golden.json).
#include <ATen/ATen.h>
#include <torch/nn/module.h>

#include <filesystem>
#include <nlohmann/json.hpp>

#include "tests/test_util.h"
#include "twins/models/network.h"
#include "twins/models/safetensors.h"
#include "twins/models/vit.h"
#include "twins/models/weights.h"

using namespace twins::models;
using nlohmann::json;
using twins::test::check_throws_with;
namespace fs = std::filesystem;

namespace {

const json& golden() {
  static const json g = twins::test::read_json(twins::test::reference_path("vit_golden.json"));
  return g;
}

at::Tensor input(const std::string& key) {
  std::vector<int64_t> shape = golden().at(key + "_shape");
  return at::tensor(golden().at(key).get<std::vector<double>>(), at::kDouble).view(shape);
}

// The reference model's architecture (torchvision's constructor arguments in twins' words).
json tiny_spec(const std::string& pool = "cls") {
  const json& c = golden().at("config");
  return {{"type", "vit"},
          {"image_size", c.at("image_size")},
          {"patch_size", c.at("patch_size")},
          {"depth", c.at("num_layers")},
          {"hidden", c.at("hidden_dim")},
          {"heads", c.at("num_heads")},
          {"mlp", c.at("mlp_dim")},
          {"pool", pool}};
}

// The reference weights loaded into a twins ViT, in float64.
std::shared_ptr<Network> reference_vit(const std::string& pool = "cls") {
  auto net = create_backbone(tiny_spec(pool));
  net->to(at::kDouble);
  const SafeTensorsFile f = load_safetensors(twins::test::reference_path("vit_tiny.safetensors"));
  at::NoGradGuard no_grad;
  for (auto& entry : backbone_state(*net)) {
    const std::string name = entry.first;
    REQUIRE_MESSAGE(f.contains(name), name);
    entry.second.copy_(f.at(name));
  }
  net->eval();
  return net;
}

}  // namespace

TEST_CASE("vit: torchvision's names and shapes, and the presets' sizes") {
  auto net = create_backbone(tiny_spec());
  std::vector<std::pair<std::string, std::vector<int64_t>>> ours;
  for (const auto& [name, t] : backbone_state(*net)) ours.emplace_back(name, t.sizes().vec());
  std::vector<std::pair<std::string, std::vector<int64_t>>> theirs;
  for (const auto& e : golden().at("state")) theirs.emplace_back(e.at(0), e.at(1).get<std::vector<int64_t>>());
  std::sort(ours.begin(), ours.end());
  std::sort(theirs.begin(), theirs.end());
  CHECK(ours == theirs);
  CHECK(ViT::state_elements(std::dynamic_pointer_cast<ViT>(net)->options()) == count_parameters(*net));
  // torchvision's vit_b_16 has 86,567,656 parameters with its 1000-class head (768 x 1000 + 1000).
  CHECK(count_parameters(*create_backbone(json{{"type", "vit_base"}})) == 86567656 - 769000);
  CHECK(create_backbone(json{{"type", "vit_small"}})->output_dim() == 384);
  CHECK(create_backbone(json{{"type", "vit_tiny"}, {"image_size", 32}, {"patch_size", 4}})->output_dim() == 192);
  CHECK(create_backbone(json{{"type", "vit_tiny"}, {"num_classes", 10}})->output_dim() == 10);
  check_throws_with<std::invalid_argument>(
      [] {
        create_backbone(json{{"type", "vit"}, {"hidden", 100}, {"heads", 3}});
      },
      "heads");
  check_throws_with<std::invalid_argument>(
      [] {
        create_backbone(json{{"type", "vit_tiny"}, {"image_size", 30}, {"patch_size", 4}});
      },
      "multiple");
  check_throws_with<std::invalid_argument>(
      [] {
        create_backbone(json{{"type", "vit_tiny"}, {"pool", "max"}});
      },
      "pool");
}

TEST_CASE("vit: forward equals torchvision's VisionTransformer in float64") {
  auto net = reference_vit();
  at::NoGradGuard no_grad;
  const at::Tensor cls = twins::test::tensor_from_json(golden().at("cls"));
  CHECK(net->forward(input("input")).sub(cls).abs().max().item<double>() < 1e-10);
  auto mean = reference_vit("mean");
  const at::Tensor pooled = twins::test::tensor_from_json(golden().at("mean"));
  CHECK(mean->forward(input("input")).sub(pooled).abs().max().item<double>() < 1e-10);
}

TEST_CASE("vit: position embeddings interpolate bicubically for other input sizes") {
  auto net = reference_vit();
  auto* vit = dynamic_cast<ViT*>(net.get());
  REQUIRE(vit);
  at::NoGradGuard no_grad;
  const at::Tensor pos24 = at::tensor(golden().at("pos_24").get<std::vector<double>>(), at::kDouble);
  CHECK(vit->position_embedding(6, 6).flatten().sub(pos24).abs().max().item<double>() < 1e-12);
  const at::Tensor cls24 = twins::test::tensor_from_json(golden().at("cls_24"));
  CHECK(net->forward(input("input_24")).sub(cls24).abs().max().item<double>() < 1e-10);
  const at::Tensor cls16x24 = twins::test::tensor_from_json(golden().at("cls_16x24"));
  CHECK(net->forward(input("input_16x24")).sub(cls16x24).abs().max().item<double>() < 1e-10);
  // The trained grid is returned as is.
  CHECK(vit->position_embedding(4, 4).data_ptr() == vit->named_parameters()["encoder.pos_embedding"].data_ptr());
  check_throws_with<std::invalid_argument>(
      [&] {
        net->forward(at::zeros({1, 3, 18, 16}, at::kDouble));
      },
      "multiples of the patch size 4");
}

TEST_CASE("vit: gradients match finite differences") {
  at::manual_seed(5);
  auto net = create_backbone(json{{"type", "vit"},
                                  {"image_size", 8},
                                  {"patch_size", 4},
                                  {"depth", 2},
                                  {"hidden", 8},
                                  {"heads", 2},
                                  {"mlp", 12},
                                  {"drop_path", 0.0}});
  net->to(at::kDouble);
  {
    at::NoGradGuard no_grad;
    for (auto& p : net->parameters()) p.add_(at::randn_like(p) * 0.1);
  }
  const at::Tensor x = at::randn({2, 3, 8, 8}, at::kDouble).requires_grad_(true);
  const at::Tensor w = at::randn({2, 8}, at::kDouble);
  auto objective = [&] { return (net->forward(x) * w).sum(); };
  objective().backward();
  const double h = 1e-6;
  int checked = 0;
  auto check_entries = [&](at::Tensor t, const std::string& name) {
    const at::Tensor g = t.grad().clone();
    at::NoGradGuard no_grad;
    for (int64_t i = 0; i < t.numel(); i += std::max<int64_t>(1, t.numel() / 3)) {
      const double v = t.view(-1)[i].item<double>();
      t.view(-1)[i].fill_(v + h);
      const double up = objective().item<double>();
      t.view(-1)[i].fill_(v - h);
      const double down = objective().item<double>();
      t.view(-1)[i].fill_(v);
      const double numeric = (up - down) / (2 * h), analytic = g.view(-1)[i].item<double>();
      CAPTURE(name);
      CAPTURE(i);
      CHECK(std::abs(numeric - analytic) <= 1e-6 * std::max(1.0, std::abs(analytic)));
      ++checked;
    }
  };
  for (auto& p : net->named_parameters()) check_entries(p.value(), p.key());
  check_entries(x, "input");
  CHECK(checked > 60);
}

TEST_CASE("vit: stochastic depth drops whole samples in training only") {
  at::manual_seed(1);
  auto net = create_backbone(json{{"type", "vit"},
                                  {"image_size", 8},
                                  {"patch_size", 4},
                                  {"depth", 3},
                                  {"hidden", 8},
                                  {"heads", 2},
                                  {"mlp", 8},
                                  {"drop_path", 0.5}});
  const at::Tensor x = at::randn({16, 3, 8, 8});
  net->eval();
  const at::Tensor a = net->forward(x), b = net->forward(x);
  CHECK(at::equal(a, b));
  net->train();
  at::manual_seed(2);
  const at::Tensor c = net->forward(x);
  at::manual_seed(2);
  CHECK(at::equal(c, net->forward(x)));  // the same draws from the same seed
  at::manual_seed(3);
  CHECK_FALSE(at::equal(c, net->forward(x)));
}

TEST_CASE("vit: torchvision files import, twins files round-trip, heads are inferred for the standard family") {
  const fs::path dir = twins::test::fresh_dir("vit", "files");
  // The torchvision file is 16 wide: its heads cannot be inferred, and the message says what to do.
  check_throws_with<std::runtime_error>([] { read_backbone(twins::test::reference_path("vit_tiny.safetensors")); },
                                        "twins_backbone");
  // With the architecture in the metadata it loads through read_backbone, as every --backbone does.
  {
    SafeTensorsFile f = load_safetensors(twins::test::reference_path("vit_tiny.safetensors"));
    save_safetensors((dir / "tv.safetensors").string(), f.tensors, {{metadata_key::architecture, tiny_spec().dump()}});
    const auto loaded = read_backbone((dir / "tv.safetensors").string());
    at::NoGradGuard no_grad;
    const at::Tensor cls = twins::test::tensor_from_json(golden().at("cls"));
    // read_backbone builds a float32 network: the float64 weights are rounded on the way in.
    loaded.network->to(at::kDouble);
    CHECK(loaded.network->forward(input("input")).sub(cls).abs().max().item<double>() < 1e-5);
  }
  // A 64-wide ViT saved without metadata (as torchvision would): one head inferred, same outputs,
  // and a torchvision classifier (heads.head) in the file is ignored.
  at::manual_seed(4);
  auto net = create_backbone(json{
      {"type", "vit"}, {"image_size", 16}, {"patch_size", 8}, {"depth", 2}, {"hidden", 64}, {"heads", 1}, {"mlp", 96}});
  net->eval();
  NamedTensors state = backbone_state(*net);
  state.emplace_back("heads.head.weight", at::zeros({10, 64}));
  state.emplace_back("heads.head.bias", at::zeros({10}));
  save_safetensors((dir / "plain.safetensors").string(), state, {});
  const auto plain = read_backbone((dir / "plain.safetensors").string());
  CHECK(plain.network->to_json()["heads"] == 1);
  CHECK(plain.network->to_json()["mlp"] == 96);
  CHECK(plain.info.provenance.find("ViT") != std::string::npos);
  CHECK(plain.info.image_size == 16);  // the size its position embeddings were trained at: embed's default
  const at::Tensor x = at::randn({2, 3, 16, 16});
  at::NoGradGuard no_grad;
  CHECK(at::allclose(plain.network->forward(x), net->forward(x), 1e-6, 1e-6));
  // twins' own file keeps the whole architecture (mean pooling, drop path) in its metadata.
  auto pooled = create_backbone(json{
      {"type", "vit_tiny"}, {"image_size", 32}, {"patch_size", 8}, {"depth", 1}, {"pool", "mean"}, {"drop_path", 0.1}});
  pooled->eval();
  save_backbone((dir / "twins.safetensors").string(), *pooled, BackboneInfo{});
  const auto again = read_backbone((dir / "twins.safetensors").string());
  CHECK(again.network->to_json() == pooled->to_json());
  const at::Tensor y = at::randn({2, 3, 32, 32});
  CHECK(at::equal(again.network->forward(y), pooled->forward(y)));
  fs::remove_all(dir);
}

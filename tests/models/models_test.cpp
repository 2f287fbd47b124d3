#include <ATen/ATen.h>
#include <torch/nn/module.h>

#include <fstream>
#include <sstream>

#include "tests/test_util.h"
#include "twins/models/mlp.h"
#include "twins/models/network.h"
#include "twins/models/resnet.h"

using namespace twins::models;
using twins::test::check_throws_with;

namespace {

struct Reference {
  std::vector<std::pair<std::string, std::vector<int64_t>>> entries;
  int64_t parameters = 0;
};

// tests/reference/<arch>_state.txt, written by torchvision_resnets.py from torchvision itself.
Reference read_reference(const std::string& arch) {
  std::ifstream in(twins::test::reference_path(arch + "_state.txt"));
  REQUIRE(in);
  Reference ref;
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream s(line);
    std::string name, shape;
    s >> name >> shape;
    if (name == "#parameters") {
      ref.parameters = std::stoll(shape);
      continue;
    }
    std::vector<int64_t> dims;
    std::istringstream d(shape);
    for (std::string part; std::getline(d, part, ',');) dims.push_back(std::stoll(part));
    ref.entries.emplace_back(name, dims);
  }
  return ref;
}

// Our state in torchvision's state_dict order: for each module, its parameters then buffers.
std::vector<std::pair<std::string, std::vector<int64_t>>> state_of(const torch::nn::Module& m) {
  std::vector<std::pair<std::string, std::vector<int64_t>>> out;
  for (const auto& item : m.named_modules()) {
    const std::string prefix = item.key().empty() ? "" : item.key() + ".";
    for (const auto& p : item.value()->named_parameters(/*recurse=*/false))
      out.emplace_back(prefix + p.key(), p.value().sizes().vec());
    for (const auto& b : item.value()->named_buffers(/*recurse=*/false))
      out.emplace_back(prefix + b.key(), b.value().sizes().vec());
  }
  return out;
}

}  // namespace

TEST_CASE("models: ResNets have torchvision's names, shapes and parameter counts") {
  for (const std::string arch : {"resnet18", "resnet50"}) {
    CAPTURE(arch);
    const Reference ref = read_reference(arch);
    ResNetOptions o = resnet_options(arch);
    o.num_classes = 1000;
    auto net = std::make_shared<ResNet>(o);
    CHECK(count_parameters(*net) == ref.parameters);
    const auto ours = state_of(*net);
    REQUIRE(ours.size() == ref.entries.size());
    for (size_t i = 0; i < ours.size(); ++i) {
      CAPTURE(ref.entries[i].first);
      CHECK(ours[i].first == ref.entries[i].first);
      CHECK(ours[i].second == ref.entries[i].second);
    }
  }
  CHECK(count_parameters(ResNet(resnet_options("resnet18"))) + 512 * 1000 + 1000 == 11689512);
}

TEST_CASE("models: backbone outputs and options") {
  at::manual_seed(0);
  ResNetOptions o = resnet_options("resnet18");
  SUBCASE("ImageNet stem") {
    ResNet net(o);
    CHECK(net.forward(at::randn({2, 3, 64, 64})).sizes() == std::vector<int64_t>{2, 512});
    CHECK(net.output_dim() == 512);
  }
  SUBCASE("CIFAR stem keeps the resolution through the stem") {
    o.cifar_stem = true;
    ResNet net(o);
    CHECK(net.named_parameters()["conv1.weight"].sizes() == std::vector<int64_t>{64, 3, 3, 3});
    CHECK(net.forward(at::randn({2, 3, 32, 32})).sizes() == std::vector<int64_t>{2, 512});
  }
  SUBCASE("grey input, narrow width, bottlenecks") {
    ResNetOptions r50 = resnet_options("resnet50");
    r50.in_channels = 1, r50.width = 16;
    ResNet net(r50);
    CHECK(net.output_dim() == 2048 / 4);
    CHECK(net.forward(at::randn({3, 1, 32, 32})).sizes() == std::vector<int64_t>{3, 512});
  }
  SUBCASE("zero_init_residual zeroes each block's last BatchNorm weight") {
    o.zero_init_residual = true;
    ResNet net(o);
    const auto params = net.named_parameters();
    CHECK(params["layer1.0.bn2.weight"].abs().sum().item<double>() == 0.0);
    CHECK(params["layer1.0.bn1.weight"].sum().item<double>() == 64.0);
    CHECK(params["bn1.weight"].sum().item<double>() == 64.0);
  }
  SUBCASE("torchvision's initialisation: kaiming normal, fan_out") {
    ResNet net(o);
    const at::Tensor w = net.named_parameters()["layer4.0.conv1.weight"];  // 512 x 256 x 3 x 3
    const double expected_std = std::sqrt(2.0 / (512 * 9));
    CHECK(w.std().item<double>() == doctest::Approx(expected_std).epsilon(0.02));
  }
  SUBCASE("a wrong input shape names the expected one") {
    ResNet net(o);
    check_throws_with<std::invalid_argument>(
        [&] {
          net.forward(at::randn({2, 1, 32, 32}));
        },
        "resnet: expected input [N, 3, H, W], got [2, 1, 32, 32]");
  }
}

TEST_CASE("models: copy() is deep and exact") {
  at::manual_seed(1);
  auto net = create_backbone({{"type", "resnet18"}, {"width", 8}, {"cifar_stem", true}});
  net->eval();
  auto twin = net->copy();
  const at::Tensor x = at::randn({2, 3, 16, 16});
  CHECK(at::equal(net->forward(x), twin->forward(x)));
  {
    at::NoGradGuard no_grad;
    for (auto& p : twin->parameters()) p.add_(1.0);
  }
  CHECK_FALSE(at::equal(net->forward(x), twin->forward(x)));
  CHECK(net->named_buffers().size() == twin->named_buffers().size());
}

TEST_CASE("models: MLP heads") {
  SUBCASE("VICReg projector: nn.Sequential names, no bias on the last layer") {
    auto head = create_head("vicreg_projector", 512);
    CHECK(head->output_dim() == 8192);
    const auto p = head->named_parameters();
    CHECK(p.contains("0.weight"));
    CHECK(p.contains("0.bias"));
    CHECK(p.contains("1.weight"));  // BatchNorm1d
    CHECK(p.contains("3.weight"));
    CHECK(p.contains("6.weight"));
    CHECK_FALSE(p.contains("6.bias"));
    CHECK(p["6.weight"].sizes() == std::vector<int64_t>{8192, 8192});
    CHECK(head->named_buffers().contains("4.running_var"));
  }
  SUBCASE("Barlow Twins projector: no bias anywhere") {
    auto head = create_head({{"type", "barlow_twins_projector"}, {"spec", "64-64-32"}}, 16);
    for (const auto& item : head->named_parameters()) {
      CAPTURE(item.key());
      // BatchNorm's affine bias ("1.bias") stays; no Linear has one
      CHECK((item.key() != "0.bias" && item.key() != "3.bias" && item.key() != "6.bias"));
    }
    CHECK_FALSE(head->named_parameters().contains("0.bias"));
    CHECK_FALSE(head->named_parameters().contains("3.bias"));
    CHECK(head->forward(at::randn({4, 16})).sizes() == std::vector<int64_t>{4, 32});
  }
  SUBCASE("BYOL predictor: 4096-256 with biases") {
    auto head = create_head("byol_predictor", 256);
    CHECK(head->output_dim() == 256);
    CHECK(count_parameters(*head) == (256 * 4096 + 4096) + 2 * 4096 + (4096 * 256 + 256));
  }
  SUBCASE("bad specs") {
    check_throws_with<std::invalid_argument>(
        [] {
          create_head({{"type", "mlp"}, {"spec", "128-x-4"}}, 8);
        },
        "head.spec: \"128-x-4\"");
    check_throws_with<std::invalid_argument>(
        [] {
          create_head({{"type", "mlp"}, {"spec", "128--4"}}, 8);
        },
        "head.spec");
  }
}

TEST_CASE("models: registry sweep") {
  at::manual_seed(2);
  for (const auto& name : backbone_names()) {
    CAPTURE(name);
    // Small width keeps ResNet-50 quick; every backbone still builds from its defaults.
    const bool vit = name.rfind("vit", 0) == 0;
    auto net = vit ? create_backbone({{"type", name}, {"image_size", 16}, {"patch_size", 8}, {"depth", 1}})
                   : create_backbone({{"type", name}, {"width", 4}, {"cifar_stem", true}});
    net->train();
    const at::Tensor y = net->forward(at::randn({2, 3, 16, 16}));
    CHECK(y.sizes() == std::vector<int64_t>{2, net->output_dim()});
    CHECK(create_backbone(net->to_json())->to_json() == net->to_json());
  }
  for (const auto& name : head_names()) {
    CAPTURE(name);
    auto head = create_head({{"type", name}, {"spec", "32-8"}}, 12);
    CHECK(head->forward(at::randn({3, 12})).sizes() == std::vector<int64_t>{3, 8});
    CHECK(create_head(head->to_json(), 12)->to_json() == head->to_json());
    CHECK(create_head(name, 12)->output_dim() > 0);
  }
  CHECK(backbone_names() == std::vector<std::string>{"resnet", "resnet18", "resnet34", "resnet50", "vit", "vit_base",
                                                     "vit_small", "vit_tiny"});
  check_throws_with<std::invalid_argument>([] { create_backbone("resnet19"); }, "did you mean resnet18?");
  check_throws_with<std::invalid_argument>(
      [] {
        create_backbone({{"type", "resnet18"}, {"widht", 8}});
      },
      "backbone.widht: unknown key; did you mean width?");
  check_throws_with<std::invalid_argument>(
      [] {
        create_backbone({{"type", "resnet18"}, {"layers", {1, 1, 1, 1}}});
      },
      "backbone.layers: unknown key");
  auto small = create_backbone({{"type", "resnet"}, {"layers", {1, 1, 1, 1}}, {"width", 8}});
  CHECK(small->output_dim() == 64);
}

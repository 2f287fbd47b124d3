#include "twins/models/weights.h"

#include <ATen/ATen.h>
#include <torch/nn/module.h>

#include <filesystem>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>

#include "twins/models/resnet.h"

namespace twins::models {
namespace {

// A torchvision ResNet's options from its state dict names and shapes.
nlohmann::json infer_resnet(const SafeTensorsFile& f, const std::string& path) {
  if (!f.contains("conv1.weight"))
    throw std::runtime_error(path + ": no conv1.weight: not a ResNet backbone in torchvision's names "
                             "(and no twins_backbone metadata to say what it is)");
  const at::Tensor& conv1 = f.at("conv1.weight");
  std::vector<int64_t> layers(4, 0);
  const std::regex block(R"(^layer([1-4])\.(\d+)\.)");
  for (const auto& [name, t] : f.tensors) {
    std::smatch m;
    if (std::regex_search(name, m, block)) {
      const size_t stage = std::stoul(m[1]) - 1;
      layers[stage] = std::max<int64_t>(layers[stage], std::stoll(m[2]) + 1);
    }
  }
  return {{"type", "resnet"},
          {"layers", layers},
          {"bottleneck", f.contains("layer1.0.conv3.weight")},
          {"width", conv1.size(0)},
          {"in_channels", conv1.size(1)},
          {"cifar_stem", conv1.size(2) == 3}};
}

}  // namespace

NamedTensors backbone_state(const Network& backbone) {
  NamedTensors out;
  for (const auto& p : backbone.named_parameters()) out.emplace_back(p.key(), p.value());
  for (const auto& b : backbone.named_buffers()) out.emplace_back(b.key(), b.value());
  return out;
}

void save_backbone(const std::string& path, const Network& backbone, std::map<std::string, std::string> metadata) {
  metadata["format"] = "pt";
  metadata["twins_backbone"] = backbone.to_json().dump();
  save_safetensors(path, backbone_state(backbone), metadata);
}

std::shared_ptr<Network> load_backbone(const std::string& given) {
  namespace fs = std::filesystem;
  std::string path = given;
  if (fs::is_directory(path)) {
    path = (fs::path(given) / "backbone.safetensors").string();
    if (!fs::exists(path))
      throw std::runtime_error(given + ": a folder without backbone.safetensors (has the run finished? "
                               "resume it with twins pretrain --out " + given + " --resume)");
  }
  const SafeTensorsFile f = load_safetensors(path);
  nlohmann::json spec;
  if (f.metadata.count("twins_backbone")) {
    spec = nlohmann::json::parse(f.metadata.at("twins_backbone"));
    spec["num_classes"] = 0;
  } else {
    spec = infer_resnet(f, path);
  }
  auto net = create_backbone(spec);
  // Match names and shapes both ways; list the first mismatches.
  std::vector<std::string> problems;
  std::set<std::string> expected;
  at::NoGradGuard no_grad;
  for (auto& [name, tensor] : backbone_state(*net)) {
    expected.insert(name);
    if (!f.contains(name)) {
      problems.push_back("missing " + name);
      continue;
    }
    const at::Tensor& src = f.at(name);
    if (src.sizes() != tensor.sizes()) {
      std::ostringstream s;
      s << "shape of " << name << ": file " << src.sizes() << ", model " << tensor.sizes();
      problems.push_back(s.str());
      continue;
    }
    at::Tensor dst = tensor;
    dst.copy_(src);
  }
  for (const auto& [name, t] : f.tensors)
    if (!expected.count(name) && name.rfind("fc.", 0) != 0) problems.push_back("unexpected " + name);
  if (!problems.empty()) {
    std::string message = path + ": the weights do not fit " + spec.dump() + " (" + std::to_string(problems.size()) + " problems):";
    for (size_t i = 0; i < problems.size() && i < 8; ++i) message += "\n  " + problems[i];
    if (problems.size() > 8) message += "\n  ...";
    throw std::runtime_error(message);
  }
  net->eval();
  return net;
}

}  // namespace twins::models

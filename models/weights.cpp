#include "twins/models/weights.h"

#include <ATen/ATen.h>
#include <torch/nn/module.h>

#include <cmath>
#include <filesystem>
#include <limits>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>
#include <sstream>
#include <stdexcept>

#include "twins/config.h"
#include "twins/models/resnet.h"

namespace twins::models {
namespace {

// A torchvision ResNet's options from its state dict names and shapes.
nlohmann::json infer_resnet(const SafeTensorsFile& f, const std::string& path) {
  if (!f.contains("conv1.weight"))
    throw std::runtime_error(
        path +
        ": no conv1.weight nor conv_proj.weight: not a ResNet or ViT backbone in torchvision's names "
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

// A torchvision VisionTransformer's options from its state dict names and shapes. The number of
// heads leaves no trace in the shapes: hidden / 64, as in the standard family (Ti, S, B, L, H).
nlohmann::json infer_vit(const SafeTensorsFile& f, const std::string& path) {
  const at::Tensor& conv = f.at("conv_proj.weight");
  if (!f.contains("encoder.pos_embedding") || conv.dim() != 4 || conv.size(2) != conv.size(3))
    throw std::runtime_error(path +
                             ": conv_proj.weight and class_token without a square patch embedding and "
                             "encoder.pos_embedding: not a torchvision VisionTransformer");
  const int64_t hidden = conv.size(0), patch = conv.size(2);
  const at::Tensor& pos = f.at("encoder.pos_embedding");
  const int64_t tokens = pos.dim() == 3 ? pos.size(1) : 0;
  const auto grid =
      static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(std::max<int64_t>(tokens - 1, 0)))));
  if (tokens < 2 || grid * grid != tokens - 1)
    throw std::runtime_error(path + ": encoder.pos_embedding does not hold a class token and a square grid of patches");
  int64_t depth = 0;
  const std::regex block(R"(^encoder\.layers\.encoder_layer_(\d+)\.)");
  for (const auto& [name, t] : f.tensors) {
    std::smatch m;
    if (std::regex_search(name, m, block)) depth = std::max<int64_t>(depth, std::stoll(m[1]) + 1);
  }
  const std::string mlp = "encoder.layers.encoder_layer_0.mlp.0.weight";
  if (depth == 0 || !f.contains(mlp)) throw std::runtime_error(path + ": a VisionTransformer without encoder layers");
  if (hidden % 64 != 0)
    throw std::runtime_error(path + ": cannot tell the number of attention heads of a ViT " + std::to_string(hidden) +
                             " wide (the standard family has hidden / 64): give the architecture in the metadata "
                             "entry twins_backbone, e.g. {\"type\": \"vit\", \"heads\": ...}");
  return {{"type", "vit"},  {"image_size", grid * patch}, {"patch_size", patch},  {"in_channels", conv.size(1)},
          {"depth", depth}, {"hidden", hidden},           {"heads", hidden / 64}, {"mlp", f.at(mlp).size(0)}};
}

// The classifier of a torchvision model, which a backbone file may carry and twins ignores.
bool is_classifier(const std::string& name) { return name.rfind("fc.", 0) == 0 || name.rfind("heads.", 0) == 0; }

}  // namespace

NamedTensors module_state(const torch::nn::Module& module, const std::string& prefix) {
  NamedTensors out;
  for (const auto& p : module.named_parameters()) out.emplace_back(prefix + p.key(), p.value());
  for (const auto& b : module.named_buffers()) out.emplace_back(prefix + b.key(), b.value());
  return out;
}

void load_module_state(torch::nn::Module& module, const SafeTensorsFile& file, const std::string& what,
                       const std::string& prefix) {
  at::NoGradGuard no_grad;
  for (auto& [name, tensor] : module_state(module, prefix)) {
    if (!file.contains(name)) throw std::runtime_error(what + " lacks " + name);
    const at::Tensor& src = file.at(name);
    if (src.sizes() != tensor.sizes() || src.scalar_type() != tensor.scalar_type())
      throw std::runtime_error(what + " entry " + name + " has another shape or type than the model's");
    at::Tensor dst = tensor;
    dst.copy_(src);
  }
}

NamedTensors backbone_state(const Network& backbone) { return module_state(backbone); }

std::vector<std::string> state_differences(const NamedTensors& into, const NamedTensors& from,
                                           const std::string& into_label, const std::string& from_label,
                                           bool (*ignored)(const std::string&)) {
  std::map<std::string, const at::Tensor*> unmatched;
  for (const auto& [name, tensor] : from) unmatched.emplace(name, &tensor);
  std::vector<std::string> problems;
  for (const auto& [name, tensor] : into) {
    const auto it = unmatched.find(name);
    if (it == unmatched.end()) {
      problems.push_back("missing " + name);
      continue;
    }
    if (it->second->sizes() != tensor.sizes()) {
      std::ostringstream s;
      s << "shape of " << name << ": " << from_label << " " << it->second->sizes() << ", " << into_label << " "
        << tensor.sizes();
      problems.push_back(s.str());
    }
    unmatched.erase(it);
  }
  for (const auto& [name, tensor] : from)
    if (unmatched.count(name) && !(ignored && ignored(name))) problems.push_back("unexpected " + name);
  return problems;
}

void copy_state_by_name(const NamedTensors& into, const NamedTensors& from) {
  const std::map<std::string, at::Tensor> source(from.begin(), from.end());
  at::NoGradGuard no_grad;
  for (const auto& [name, tensor] : into) {
    at::Tensor dst = tensor;
    dst.copy_(source.at(name));
  }
}

std::string list_problems(const std::string& head, const std::vector<std::string>& problems) {
  std::string message =
      head + " (" + std::to_string(problems.size()) + (problems.size() == 1 ? " difference):" : " differences):");
  for (size_t i = 0; i < problems.size() && i < 8; ++i) message += "\n  " + problems[i];
  if (problems.size() > 8) message += "\n  ...";
  return message;
}

std::map<std::string, std::string> BackboneInfo::to_metadata() const {
  std::map<std::string, std::string> m;
  if (image_size > 0) m[metadata_key::image_size] = std::to_string(image_size);
  if (!mean.empty() || !std.empty()) m[metadata_key::normalize] = nlohmann::json{{"mean", mean}, {"std", std}}.dump();
  if (!method.empty()) m[metadata_key::method] = method;
  if (!version.empty()) m[metadata_key::version] = version;
  if (!provenance.empty()) m[metadata_key::provenance] = provenance;
  return m;
}

BackboneInfo BackboneInfo::from_metadata(const std::map<std::string, std::string>& m, const std::string& file) {
  BackboneInfo info;
  auto get = [&](const char* key) -> const std::string* {
    const auto it = m.find(key);
    return it == m.end() ? nullptr : &it->second;
  };
  auto bad = [&](const char* key, const std::string& why) {
    return std::runtime_error(file + ": metadata " + key + " " + why + ": \"" + m.at(key) + "\"");
  };
  if (const std::string* v = get(metadata_key::image_size)) {
    const auto size = config::parse_integer(*v);
    if (!size || *size < 1 || *size > std::numeric_limits<int>::max())
      throw bad(metadata_key::image_size, "is not a positive integer");
    info.image_size = static_cast<int>(*size);
  }
  if (const std::string* v = get(metadata_key::normalize)) {
    const auto n = nlohmann::json::parse(*v, nullptr, /*allow_exceptions=*/false);
    try {
      info.mean = n.at("mean").get<std::vector<double>>(), info.std = n.at("std").get<std::vector<double>>();
    } catch (const std::exception&) {
      throw bad(metadata_key::normalize, "is not {\"mean\": [...], \"std\": [...]}");
    }
    if (info.mean.size() != info.std.size() || info.mean.empty())
      throw bad(metadata_key::normalize, "needs as many means as standard deviations");
    for (double s : info.std)
      if (!(s > 0)) throw bad(metadata_key::normalize, "has a standard deviation that is not positive");
  }
  if (const std::string* v = get(metadata_key::method)) info.method = *v;
  if (const std::string* v = get(metadata_key::version)) info.version = *v;
  if (const std::string* v = get(metadata_key::provenance)) info.provenance = *v;
  return info;
}

void save_backbone(const std::string& path, const Network& backbone, std::map<std::string, std::string> metadata) {
  metadata["format"] = "pt";
  metadata[metadata_key::architecture] = backbone.to_json().dump();
  save_safetensors(path, backbone_state(backbone), metadata);
}

void save_backbone(const std::string& path, const Network& backbone, const BackboneInfo& info) {
  save_backbone(path, backbone, info.to_metadata());
}

LoadedBackbone read_backbone(const std::string& given) {
  namespace fs = std::filesystem;
  std::string path = given;
  if (fs::is_directory(path)) {
    path = (fs::path(given) / "backbone.safetensors").string();
    if (!fs::exists(path))
      throw std::runtime_error(given +
                               ": a folder without backbone.safetensors (a run folder whose training has not "
                               "finished: resume it, then use its backbone)");
  }
  const SafeTensorsFile f = load_safetensors(path);
  nlohmann::json spec;
  LoadedBackbone out;
  out.path = path;
  out.info = BackboneInfo::from_metadata(f.metadata, path);
  if (f.metadata.count(metadata_key::architecture)) {
    spec = nlohmann::json::parse(f.metadata.at(metadata_key::architecture), nullptr, /*allow_exceptions=*/false);
    if (!spec.is_object())
      throw std::runtime_error(path + ": metadata " + metadata_key::architecture + " is not a JSON object");
    spec["num_classes"] = 0;
  } else if (f.contains("conv_proj.weight") && f.contains("class_token")) {
    spec = infer_vit(f, path);
    if (out.info.provenance.empty()) out.info.provenance = "inferred from tensor names (torchvision ViT)";
    // Without metadata, a ViT's own size is the one its position embeddings hold (224 for the
    // torchvision family, 32 for a CIFAR ViT): embedding at it needs no interpolation.
    if (out.info.image_size <= 0) out.info.image_size = spec.at("image_size").get<int>();
  } else {
    spec = infer_resnet(f, path);
    if (out.info.provenance.empty()) out.info.provenance = "inferred from tensor names (torchvision ResNet)";
  }
  // A file's metadata may describe any network: count what it would hold before building it.
  const std::string where = path + " (" + metadata_key::architecture + ")";
  int64_t held = 0;
  for (const auto& [name, t] : f.tensors)
    if (!is_classifier(name)) held += t.numel();
  const int64_t described = backbone_state_elements(spec, where);
  // Building needs about `described` values; far more than the file holds is refused here (a
  // near miss is built and its mismatched tensors listed below).
  if (described > 2 * held + (int64_t{1} << 20))
    throw std::runtime_error(path + ": the architecture " + spec.dump() + " has " + std::to_string(described) +
                             " values, but the file holds " + std::to_string(held) + ": the weights do not fit it");
  auto net = create_backbone(spec, where);
  // Match names and shapes both ways; list the first mismatches.
  const NamedTensors into = backbone_state(*net);
  const std::vector<std::string> problems = state_differences(into, f.tensors, "model", "file", is_classifier);
  if (!problems.empty())
    throw std::runtime_error(list_problems(path + ": the weights do not fit " + spec.dump(), problems));
  copy_state_by_name(into, f.tensors);
  net->eval();
  out.network = net;
  return out;
}

std::shared_ptr<Network> load_backbone(const std::string& path) { return read_backbone(path).network; }

}  // namespace twins::models

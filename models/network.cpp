// The backbone and head registries, and helpers on any Network.
#include "twins/models/network.h"

#include <torch/nn/module.h>

#include <algorithm>
#include <array>
#include <nlohmann/json.hpp>
#include <stdexcept>

#include "models/batch_norm.h"
#include "twins/config.h"
#include "twins/models/mlp.h"
#include "twins/models/resnet.h"
#include "twins/models/vit.h"
#include "twins/registry.h"

namespace twins::models {
namespace {

ResNetOptions read_resnet(const nlohmann::json& spec, const std::string& path, const std::string& name) {
  ResNetOptions o = name == "resnet" ? ResNetOptions{} : resnet_options(name);
  config::ConfigReader r(spec, path);
  r.allow("type");
  if (name == "resnet") {  // the generic form: any stage depths, e.g. a small quickstart net
    r.get("layers", o.layers);
    r.get("bottleneck", o.bottleneck);
  }
  r.get("in_channels", o.in_channels);
  r.get("width", o.width);
  r.get("cifar_stem", o.cifar_stem);
  r.get("stem_padding", o.stem_padding);
  r.get("zero_init_residual", o.zero_init_residual);
  r.get("num_classes", o.num_classes);
  r.finish();
  return o;
}

ViTOptions read_vit(const nlohmann::json& spec, const std::string& path, const std::string& name) {
  ViTOptions o = vit_options(name);
  config::ConfigReader r(spec, path);
  r.allow("type");
  r.get("image_size", o.image_size);
  r.get("patch_size", o.patch_size);
  r.get("in_channels", o.in_channels);
  r.get("depth", o.depth);
  r.get("hidden", o.hidden);
  r.get("heads", o.heads);
  // A changed width keeps the family's MLP ratio unless the MLP size is given.
  o.mlp = 4 * o.hidden;
  r.get("mlp", o.mlp);
  r.get("dropout", o.dropout);
  r.get("attention_dropout", o.attention_dropout);
  r.get("drop_path", o.drop_path);
  r.get("pool", o.pool);
  r.get("num_classes", o.num_classes);
  r.finish();
  return o;
}

constexpr std::array<const char*, 4> kResNets{"resnet", "resnet18", "resnet34", "resnet50"};
constexpr std::array<const char*, 4> kViTs{"vit", "vit_tiny", "vit_small", "vit_base"};

template <size_t N>
bool listed_in(const std::string& name, const std::array<const char*, N>& names) {
  return std::find(names.begin(), names.end(), name) != names.end();
}

const Registry<Network>& backbones() {
  static const Registry<Network> r = [] {
    Registry<Network> r("backbone");
    for (const char* name : kResNets) {
      const std::string n = name;
      r.add(n, [n](const nlohmann::json& s, const std::string& path) {
        return std::make_shared<ResNet>(read_resnet(s, path, n));
      });
    }
    for (const char* name : kViTs) {
      const std::string n = name;
      r.add(n, [n](const nlohmann::json& s, const std::string& path) {
        return std::make_shared<ViT>(read_vit(s, path, n));
      });
    }
    return r;
  }();
  return r;
}

// Every head is an MLP; the named ones differ in their defaults (the official recipes').
MLPOptions head_defaults(const std::string& name) {
  MLPOptions o;
  if (name == "vicreg_projector") {
    o.spec = "8192-8192-8192", o.last_bias = false;
  } else if (name == "barlow_twins_projector") {
    o.spec = "8192-8192-8192", o.bias = false, o.last_bias = false;
  } else if (name == "byol_projector" || name == "byol_predictor") {
    o.spec = "4096-256";
  }
  return o;
}

// Heads get their input size as an argument (the backbone's or the projector's output), never
// from the JSON, where a user could write a wrong one.
const Registry<Network, int64_t>& heads() {
  static const Registry<Network, int64_t> r = [] {
    Registry<Network, int64_t> r("head");
    for (const char* name : {"mlp", "vicreg_projector", "barlow_twins_projector", "byol_projector", "byol_predictor"}) {
      const std::string n = name;
      r.add(n, [n](const nlohmann::json& s, const std::string& path, int64_t in_dim) {
        MLPOptions o = head_defaults(n);
        config::ConfigReader r(s, path);
        r.allow("type");
        r.get("spec", o.spec);
        r.get("bias", o.bias);
        r.get("last_bias", o.last_bias);
        r.get("batch_norm", o.batch_norm);
        r.get("last_batch_norm", o.last_batch_norm);
        r.get("last_affine", o.last_affine);
        r.finish();
        return std::make_shared<MLP>(in_dim, o, path);
      });
    }
    return r;
  }();
  return r;
}

}  // namespace

std::shared_ptr<Network> create_backbone(const nlohmann::json& spec, const std::string& path) {
  return backbones().create(spec, path);
}

std::shared_ptr<Network> create_head(const nlohmann::json& spec, int64_t in_dim, const std::string& path) {
  return heads().create(spec, path, in_dim);
}

std::vector<std::string> backbone_names() { return backbones().names(); }

int64_t backbone_state_elements(const nlohmann::json& spec, const std::string& path) {
  const std::string type = config::type_of(spec, path);
  if (listed_in(type, kResNets))
    return ResNet::state_elements(read_resnet(spec.is_string() ? nlohmann::json{{"type", type}} : spec, path, type));
  if (listed_in(type, kViTs))
    return ViT::state_elements(read_vit(spec.is_string() ? nlohmann::json{{"type", type}} : spec, path, type));
  return -1;
}
std::vector<std::string> head_names() { return heads().names(); }

int64_t count_parameters(const torch::nn::Module& module) {
  int64_t n = 0;
  for (const auto& p : module.parameters()) n += p.numel();
  return n;
}

void copy_state(const torch::nn::Module& from, torch::nn::Module& to) {
  torch::NoGradGuard no_grad;
  auto copy_dict = [](const auto& src, auto dst, const char* what) {
    if (src.size() != dst.size()) throw std::invalid_argument(std::string("copy_state: different number of ") + what);
    for (const auto& item : src) {
      at::Tensor* target = dst.find(item.key());
      if (!target || !target->sizes().equals(item.value().sizes()))
        throw std::invalid_argument(std::string("copy_state: ") + what + " " + item.key() +
                                    " missing or of another shape in the destination");
      target->copy_(item.value());
    }
  };
  copy_dict(from.named_parameters(), to.named_parameters(), "parameters");
  copy_dict(from.named_buffers(), to.named_buffers(), "buffers");
}

int64_t set_sync_batchnorm(torch::nn::Module& module, std::shared_ptr<distributed::Communicator> communicator) {
  int64_t n = 0;
  auto visit = [&](torch::nn::Module& m) {
    if (auto* bn = m.as<detail::BatchNormImpl>()) bn->communicator = communicator, ++n;
  };
  visit(module);  // modules(include_self) would need `module` to be held by a shared_ptr
  for (const auto& m : module.modules(/*include_self=*/false)) visit(*m);
  return n;
}

}  // namespace twins::models

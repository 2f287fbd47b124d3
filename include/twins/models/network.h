#pragma once
// The encoder pieces of every method, chosen by name from JSON: backbones (image -> features)
// and heads (features -> embeddings: projectors and predictors).
#include <torch/nn/module.h>
#include <nlohmann/json_fwd.hpp>

#include <memory>
#include <string>
#include <vector>

namespace twins::distributed {
class Communicator;
}

namespace twins::models {

/// Contract for a backbone or head.
/// Represents: a torch module mapping a float batch [N, ...] to [N, output_dim()].
/// Requires: inputs on the module's device and dtype; backbones take [N, C, H, W].
/// Ensures: parameter and buffer names are stable (torchvision's names for ResNets), so weights
/// move to and from other tools; copy() is a deep, independent copy (BYOL's target network).
class Network : public torch::nn::Module {
 public:
  virtual at::Tensor forward(const at::Tensor& x) = 0;
  /// Size of the last dimension of forward()'s output.
  virtual int64_t output_dim() const = 0;
  /// A deep copy: same architecture, same parameter and buffer values, nothing shared.
  virtual std::shared_ptr<Network> copy() const = 0;
  /// torch::nn::Module's clone(), so that modules holding networks clone deeply too.
  std::shared_ptr<torch::nn::Module> clone(const c10::optional<c10::Device>& device = c10::nullopt) const override {
    auto c = copy();
    if (device) c->to(*device);
    return c;
  }
  /// The hyper-parameters, as a JSON object the matching create_* function accepts.
  virtual nlohmann::json to_json() const = 0;
  /// Parameters of more than one dimension that take no weight decay (nor LARS adaptation) when
  /// the recipe excludes biases and norms: a ViT's class token and position embedding.
  virtual std::vector<at::Tensor> no_weight_decay() const { return {}; }
};

/// Builds a backbone from {"type": "resnet18"|"resnet34"|"resnet50"|"resnet", ...ResNetOptions keys}
/// or {"type": "vit_tiny"|"vit_small"|"vit_base"|"vit", ...ViTOptions keys};
/// `path` names the spec in messages ("model.backbone").
std::shared_ptr<Network> create_backbone(const nlohmann::json& spec, const std::string& path = "backbone");
/// Builds a head taking `in_dim` features, from {"type": "mlp"|"vicreg_projector"|..., ...}.
std::shared_ptr<Network> create_head(const nlohmann::json& spec, int64_t in_dim, const std::string& path = "head");

std::vector<std::string> backbone_names();
/// Elements of the parameters and buffers the backbone `spec` would have, computed without
/// building it; -1 for a type that cannot tell. Throws like create_backbone for a bad spec.
int64_t backbone_state_elements(const nlohmann::json& spec, const std::string& path = "backbone");
std::vector<std::string> head_names();

/// Total number of elements of the parameters (not buffers).
int64_t count_parameters(const torch::nn::Module& module);

/// Copies every parameter and buffer of `from` into the same-named one of `to` (shapes must
/// match; throws std::invalid_argument naming the first mismatch).
void copy_state(const torch::nn::Module& from, torch::nn::Module& to);

/// SyncBatchNorm: every BatchNorm layer of `module` (backbones and heads alike) takes its
/// training statistics over all ranks of `communicator` (null: back to this rank's batch).
/// Returns the number of layers switched. The layers keep their names, parameters and buffers.
int64_t set_sync_batchnorm(torch::nn::Module& module, std::shared_ptr<distributed::Communicator> communicator);

}  // namespace twins::models

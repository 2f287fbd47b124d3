#pragma once
// Projector and predictor heads: Linear, BatchNorm1d, ReLU between layers; a last Linear alone.
#include <string>
#include <vector>

#include "twins/models/network.h"

namespace twins::models {

struct MLPOptions {
  /// Output sizes of the layers, e.g. "8192-8192-8192" (VICReg) or "4096-256" (BYOL).
  std::string spec = "2048-2048";
  /// Bias of the hidden Linear layers (Barlow Twins: false everywhere).
  bool bias = true;
  /// Bias of the last Linear layer (VICReg and Barlow Twins: false).
  bool last_bias = true;
  /// BatchNorm1d after each hidden Linear layer.
  bool batch_norm = true;
};

/// Parses "8192-8192-8192" into {8192, 8192, 8192}; throws std::invalid_argument naming `path`.
std::vector<int64_t> parse_mlp_spec(const std::string& spec, const std::string& path);

/// The MLP head. Children are named like an nn.Sequential ("0" Linear, "1" BatchNorm1d,
/// "2" ReLU, "3" Linear, ...), as the official VICReg and Barlow Twins projectors are.
class MLP : public Network {
 public:
  MLP(int64_t in_dim, MLPOptions options);
  at::Tensor forward(const at::Tensor& x) override;
  int64_t output_dim() const override { return dims_.back(); }
  std::shared_ptr<Network> copy() const override;
  nlohmann::json to_json() const override;

 private:
  struct Layers;
  int64_t in_dim_;
  MLPOptions options_;
  std::vector<int64_t> dims_;
  std::shared_ptr<Layers> layers_;
};

}  // namespace twins::models

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
  /// BatchNorm1d after the last Linear layer too (SimSiam's projector).
  bool last_batch_norm = false;
  /// Whether that last BatchNorm1d has a weight and bias (SimSiam's official one has none).
  bool last_affine = true;
};

/// Parses "8192-8192-8192" into {8192, 8192, 8192}; throws std::invalid_argument naming `path`.
std::vector<int64_t> parse_mlp_spec(const std::string& spec, const std::string& path);

/// The MLP head. Children are named like an nn.Sequential ("0" Linear, "1" BatchNorm1d,
/// "2" ReLU, "3" Linear, ..., and with last_batch_norm a last BatchNorm1d), as the official
/// VICReg, Barlow Twins and SimSiam projectors are.
class MLP : public Network {
 public:
  /// `path` names the head in messages ("model.projector").
  MLP(int64_t in_dim, MLPOptions options, const std::string& path = "head");
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

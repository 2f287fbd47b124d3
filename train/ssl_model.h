#pragma once
// The networks of one method (private to train/): backbone and projector, BYOL's predictor and
// momentum target, and the online linear probe; the forward pass of a training step; the
// optimizer of a recipe; and the state that checkpoints hold.
#include <torch/nn/modules/linear.h>
#include <torch/optim/optimizer.h>

#include <memory>
#include <vector>

#include "twins/dist/communicator.h"
#include "twins/losses.h"
#include "twins/models/network.h"
#include "twins/models/safetensors.h"
#include "twins/train/recipe.h"

namespace twins::train::detail {

class SSLModel {
 public:
  /// Builds the networks of `recipe` (parameters initialised from the current torch seed);
  /// `num_classes` > 0 adds the online probe.
  SSLModel(const Recipe& recipe, int64_t num_classes);

  std::shared_ptr<models::Network> backbone, projector, predictor;  // predictor: BYOL only
  std::shared_ptr<models::Network> target_backbone, target_projector;  // BYOL only
  torch::nn::Linear probe{nullptr};
  std::shared_ptr<losses::Loss> loss;
  int in_channels = 3;

  void to(const at::Device& device, bool channels_last);
  void train(bool on);
  /// Data parallelism: rank 0's parameters and buffers copied to every rank, the loss's batch
  /// statistics taken over all ranks, and with `sync_batchnorm` every BatchNorm (online and
  /// target networks) synchronised.
  void distribute(const std::shared_ptr<dist::Communicator>& communicator, bool sync_batchnorm);
  /// Rank 0's BatchNorm statistics to every rank (without SyncBatchNorm; DDP's broadcast_buffers).
  void broadcast_buffers(dist::Communicator& communicator);
  /// Backbone, projector and predictor parameters (what the optimizer updates).
  std::vector<at::Tensor> parameters() const;

  struct Output {
    losses::LossOutput loss;
    at::Tensor features;  ///< backbone features of view 0 (for the online probe)
  };
  /// Forward of all views and the loss: pairs of views (0, j) and (1, j) beyond two views are
  /// averaged (multi-crop); with two views this is the method's loss.
  Output forward(const std::vector<at::Tensor>& views);
  /// BYOL: target <- tau target + (1 - tau) online, parameters and buffers alike.
  void ema_update(double tau);

  /// Every parameter and buffer, prefixed ("backbone.conv1.weight", "target_projector.0.bias").
  models::NamedTensors state() const;
  /// Loads what state() wrote; throws std::runtime_error naming a missing or misshapen entry.
  void load_state(const models::SafeTensorsFile& file);
};

/// The optimizer of a recipe over `model`'s parameters: group 0 weights, group 1 the 1-D
/// parameters (biases, norms), with base learning rates `lr` and `bias_lr`.
std::unique_ptr<torch::optim::Optimizer> make_optimizer(const OptimizerConfig& config, const SSLModel& model,
                                                        double lr, double bias_lr);

/// Sets the learning rate of every group: group g gets base[g] x factor.
void set_learning_rates(torch::optim::Optimizer& optimizer, const std::vector<double>& lrs);

/// The optimizer's state as bytes (LibTorch's archive format), and back.
std::vector<uint8_t> save_optimizer(const torch::optim::Optimizer& optimizer);
void load_optimizer(torch::optim::Optimizer& optimizer, const at::Tensor& bytes);

}  // namespace twins::train::detail

#pragma once
// The networks of one method (private to train/): backbone and projector, and what the loss
// needs besides (a predictor; a momentum target), plus the online linear probe; the forward
// pass of a training step; the optimizer of a recipe.
//
// SSLModel is a torch::nn::Module whose parts are registered submodules ("backbone",
// "projector", "predictor", "target_backbone", "target_projector", "probe"), so to(), train(),
// named_parameters(), named_buffers() and clone() cover all of them with stable names.
#include <torch/nn/module.h>
#include <torch/nn/modules/linear.h>
#include <torch/optim/optimizer.h>

#include <memory>
#include <vector>

#include "twins/distributed/communicator.h"
#include "twins/losses.h"
#include "twins/models/network.h"
#include "twins/models/safetensors.h"
#include "twins/train/recipe.h"

namespace twins::train::detail {

class SSLModel : public torch::nn::Module {
 public:
  /// Builds the networks of `recipe` (parameters initialised from the current torch seed);
  /// `num_classes` > 0 adds the online probe.
  SSLModel(const Recipe& recipe, int64_t num_classes);

  std::shared_ptr<models::Network> backbone, projector;
  std::shared_ptr<models::Network> predictor;                          ///< when the loss needs one
  std::shared_ptr<models::Network> target_backbone, target_projector;  ///< when the loss needs a momentum target
  torch::nn::Linear probe{nullptr};
  std::shared_ptr<losses::Loss> loss;
  int in_channels = 3;

  /// 4-D weights of the backbones in channels-last memory format (for channels-last inputs).
  void set_channels_last();
  /// The backbone's (and the momentum target's) weights and buffers from a backbone file or run
  /// folder (models::read_backbone: twins' or torchvision's names). Throws std::invalid_argument
  /// naming model.backbone_init, the file and the first mismatched tensors when the file's
  /// network is not model.backbone's (a ViT of another image size but the same patches is, its
  /// position embedding resampled); a missing or corrupt file throws std::runtime_error.
  void init_backbone(const std::string& path);
  /// Data parallelism: rank 0's parameters and buffers copied to every rank, the loss's batch
  /// statistics taken over all ranks, and with `sync_batchnorm` every BatchNorm (online and
  /// target networks) synchronised.
  void distribute(const std::shared_ptr<distributed::Communicator>& communicator, bool sync_batchnorm);
  /// Rank 0's BatchNorm statistics to every rank (without SyncBatchNorm; DDP's broadcast_buffers).
  void broadcast_buffers(distributed::Communicator& communicator);
  /// Backbone, projector and predictor parameters: what the optimizer updates (not the
  /// momentum target, not the probe).
  std::vector<at::Tensor> online_parameters() const;

  struct Output {
    losses::LossOutput loss;
    at::Tensor features;  ///< backbone features of view 0 (for the online probe)
  };
  /// Forward of all views and the loss: pairs of views (0, j) and (1, j) beyond two views are
  /// averaged (multi-crop); with two views this is the method's loss. loss_of(embed(views)).
  Output forward(const std::vector<at::Tensor>& views);

  struct Embedded {
    std::vector<losses::ViewEmbeddings> views;  ///< in fp32 (or the model's fp64), whatever the autocast
    at::Tensor features;                        ///< backbone features of view 0
  };
  /// The online networks on every view, in view order, then (`with_target`) the momentum target
  /// on every view, without gradients: random ops (stochastic depth) draw in that order, so
  /// the online part draws the same with or without the target.
  Embedded embed(const std::vector<at::Tensor>& views, bool with_target = true);
  /// The loss of embed()'s embeddings (multi-crop pairs averaged), in fp32 under any autocast.
  losses::LossOutput loss_of(const std::vector<losses::ViewEmbeddings>& embeddings) const;
  /// The online networks' buffers (BatchNorm statistics), for a forward that must leave no trace.
  std::vector<at::Tensor> online_buffers() const;
  /// Momentum target <- tau target + (1 - tau) online, parameters and buffers alike.
  void ema_update(double tau);

  /// Every parameter and buffer by name ("backbone.conv1.weight", "target_projector.0.bias").
  models::NamedTensors state() const;
  /// Loads what state() wrote; throws std::runtime_error naming a missing or misshapen entry.
  void load_state(const models::SafeTensorsFile& file);

  /// A deep copy (same recipe, same values).
  std::shared_ptr<torch::nn::Module> clone(const c10::optional<c10::Device>& device = c10::nullopt) const override;

 private:
  Recipe recipe_;
  int64_t num_classes_ = 0;
};

/// The optimizer of a recipe over `model`'s online parameters, from the optimizer registry:
/// group 0 the weights, group 1 the 1-D parameters (biases, norms), with learning rates `lr`
/// and `bias_lr`; with optimizer.fixed_predictor_lr, group 2 the predictor's parameters at `lr`.
std::shared_ptr<torch::optim::Optimizer> make_optimizer(const OptimizerConfig& config, const SSLModel& model, double lr,
                                                        double bias_lr);

/// Sets the learning rate of the scheduled groups: group g gets lrs[g] (groups beyond lrs keep
/// theirs: the fixed-lr predictor).
void set_learning_rates(torch::optim::Optimizer& optimizer, const std::vector<double>& lrs);

}  // namespace twins::train::detail

#pragma once
// LARS (You et al. 2017) as in the official VICReg and Barlow Twins code, in the style of
// LibTorch's optimizers:
//
//   twins::train::LARS opt(model->parameters(),
//                          twins::train::LARSOptions(lr).weight_decay(1e-6).momentum(0.9).eta(0.001));
//   loss.backward(); opt.step();
//
// For each parameter p with gradient g, in the official form (variant official, the default):
//   d = g + weight_decay * p                        (skipped for an excluded p)
//   q = eta * ||p|| / ||d||  if both norms > 0, else 1   (q = 1 for an excluded p)
//   q = min(q / lr, 1)                              (only with clip: LARC clipping; at lr 0, where
//                                                    q / lr is unbounded, the limit: q = 1)
//   mu = momentum * mu + q * d;   p -= lr * mu
// In solo-learn's and lightly's form (variant solo_learn):
//   if ||p|| > 0 and ||g|| > 0 and p is not excluded:
//     q = eta * ||p|| / (||g|| + weight_decay * ||p|| + eps), clipped as above, d = q (g + wd p)
//   else d = g (neither weight decay nor adaptation: the official form still decays such a p)
// Excluded are the 1-D parameters (biases and normalisation weights) with exclude_1d, as the
// official code and solo-learn do, and with exclude_zero_weight_decay the parameters of a group
// whose weight decay is 0, as lightly does.
#include <torch/optim/optimizer.h>
#include <torch/serialize/archive.h>

#include <vector>

namespace twins::train {

/// The trust-ratio form (see above).
enum class LARSVariant { official = 0, solo_learn = 1 };

struct LARSOptions : public torch::optim::OptimizerCloneableOptions<LARSOptions> {
  LARSOptions(double lr = 0.1);  // NOLINT: implicit like torch::optim::SGDOptions
  /// Learning rate.
  TORCH_ARG(double, lr);
  /// L2 weight decay added to the gradient.
  TORCH_ARG(double, weight_decay) = 0.0;
  /// Momentum of the update buffer.
  TORCH_ARG(double, momentum) = 0.9;
  /// Trust coefficient.
  TORCH_ARG(double, eta) = 0.001;
  /// Exclude 1-D parameters (biases, norm weights) from weight decay and adaptation.
  TORCH_ARG(bool, exclude_1d) = true;
  /// Clip the adaptive rate at the learning rate (LARC, as solo-learn's LARS with clip_lr).
  TORCH_ARG(bool, clip) = false;
  /// The trust-ratio form: the official VICReg/Barlow Twins code's, or solo-learn's/lightly's.
  TORCH_ARG(LARSVariant, variant) = LARSVariant::official;
  /// Added to the denominator of the solo_learn trust ratio.
  TORCH_ARG(double, eps) = 1e-8;
  /// Exclude the parameters of groups whose weight decay is 0 (lightly's rule).
  TORCH_ARG(bool, exclude_zero_weight_decay) = false;

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  double get_lr() const override { return lr(); }
  void set_lr(const double value) override { lr(value); }
};

struct LARSParamState : public torch::optim::OptimizerCloneableParamState<LARSParamState> {
  /// The momentum buffer (mu).
  TORCH_ARG(torch::Tensor, momentum_buffer);

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
};

class LARS : public torch::optim::Optimizer {
 public:
  LARS(std::vector<torch::optim::OptimizerParamGroup> param_groups, LARSOptions defaults = {});
  explicit LARS(std::vector<at::Tensor> params, LARSOptions defaults = {});
  at::Tensor step(LossClosure closure = nullptr) override;
  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;
};

}  // namespace twins::train

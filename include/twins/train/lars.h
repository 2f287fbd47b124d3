#pragma once
// LARS (You et al. 2017) as in the official VICReg and Barlow Twins code, in the style of
// LibTorch's optimizers:
//
//   twins::train::LARS opt(model->parameters(),
//                          twins::train::LARSOptions(lr).weight_decay(1e-6).momentum(0.9).eta(0.001));
//   loss.backward(); opt.step();
//
// For each parameter p with gradient g:
//   d = g + weight_decay * p                        (skipped for 1-D p when exclude_1d)
//   q = eta * ||p|| / ||d||  if both norms > 0, else 1   (skipped, q = 1, for 1-D p when exclude_1d)
//   q = min(q / lr, 1)                              (only with clip: solo-learn's LARC clipping)
//   mu = momentum * mu + q * d;   p -= lr * mu
// 1-D parameters are biases and normalisation weights: the official code excludes them from
// both weight decay and the adaptation, as does this option (on by default).
#include <torch/optim/optimizer.h>
#include <torch/serialize/archive.h>

#include <vector>

namespace twins::train {

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

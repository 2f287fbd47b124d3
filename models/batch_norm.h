#pragma once
// The BatchNorm layer of twins' networks (private to models/): LibTorch's BatchNorm1d/2d in
// training and evaluation (same parameter and buffer names: weight, bias, running_mean,
// running_var, num_batches_tracked; at::batch_norm underneath), which becomes SyncBatchNorm when
// given a communicator: in training its statistics then span every rank's batch
// (distributed::sync_batch_norm). See models::set_sync_batchnorm.
#include <ATen/ATen.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/pimpl.h>

#include <memory>
#include <ostream>

#include "twins/distributed/communicator.h"

namespace twins::models::detail {

class BatchNormImpl : public torch::nn::Cloneable<BatchNormImpl> {
 public:
  /// affine false: no weight and bias (BatchNorm1d(affine=False), SimSiam's last projector layer).
  explicit BatchNormImpl(int64_t num_features, double eps = 1e-5, double momentum = 0.1, bool affine = true)
      : num_features_(num_features), eps_(eps), momentum_(momentum), affine_(affine) {
    reset();
  }
  void reset() override {
    if (affine_) {
      weight = register_parameter("weight", at::ones({num_features_}));
      bias = register_parameter("bias", at::zeros({num_features_}));
    }
    running_mean = register_buffer("running_mean", at::zeros({num_features_}));
    running_var = register_buffer("running_var", at::ones({num_features_}));
    num_batches_tracked = register_buffer("num_batches_tracked", at::zeros({}, at::kLong));
  }
  /// x: [N, C] or [N, C, L] (BatchNorm1d), [N, C, H, W] (BatchNorm2d).
  at::Tensor forward(const at::Tensor& x) {
    TORCH_CHECK(x.dim() >= 2 && x.size(1) == num_features_, "BatchNorm(", num_features_, "): expected [N, ",
                num_features_, ", ...], got ", x.sizes());
    if (is_training()) {
      at::NoGradGuard no_grad;
      num_batches_tracked.add_(1);
    }
    if (communicator && is_training())
      return distributed::sync_batch_norm(x, weight, bias, running_mean, running_var, momentum_, eps_, communicator);
    return at::batch_norm(x, weight, bias, running_mean, running_var, is_training(), momentum_, eps_,
                          at::globalContext().userEnabledCuDNN());
  }
  void pretty_print(std::ostream& s) const override {
    s << "twins::BatchNorm(" << num_features_ << ", eps=" << eps_ << ", momentum=" << momentum_
      << (affine_ ? "" : ", affine=false") << (communicator ? ", synchronised" : "") << ")";
  }

  at::Tensor weight, bias, running_mean, running_var, num_batches_tracked;
  /// Set: SyncBatchNorm over the communicator's ranks (in training mode).
  std::shared_ptr<distributed::Communicator> communicator;

 private:
  int64_t num_features_;
  double eps_, momentum_;
  bool affine_;
};
TORCH_MODULE(BatchNorm);

}  // namespace twins::models::detail

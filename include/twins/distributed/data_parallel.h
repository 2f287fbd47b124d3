#pragma once
// Data parallelism without Python's DDP: parameters broadcast from rank 0, gradients averaged
// over ranks by bucketed all-reduces that start during backward, as buckets fill.
//
// Use, per optimizer step:  loss.backward();  reducer.finish();  optimizer.step();
// With gradient accumulation, set_sync(false) before the backwards of all but the last
// micro-batch: their gradients accumulate locally and the last backward reduces the sum.
#include <ATen/core/Tensor.h>

#include <functional>
#include <memory>
#include <vector>

#include "twins/distributed/communicator.h"

namespace torch::nn {
class Module;
}

namespace twins::distributed {

/// Copies rank `root`'s parameters and buffers into every rank's `module` (same architecture).
void broadcast_module(torch::nn::Module& module, Communicator& communicator, int root = 0);
/// Copies rank `root`'s buffers only (BatchNorm statistics without SyncBatchNorm, as DDP's
/// broadcast_buffers).
void broadcast_buffers(torch::nn::Module& module, Communicator& communicator, int root = 0);

struct GradientReducerOptions {
  /// Target bucket size; a parameter larger than this gets a bucket of its own.
  double bucket_mb = 25.0;
};

/// Averages the gradients of `parameters` over ranks. Hooks on the parameters copy each
/// gradient into its bucket's flat buffer as backward produces it; a full bucket's all-reduce
/// starts at once, on the backend's threads, overlapping the rest of backward. Buckets follow
/// the reverse of the parameter order (backward's order, roughly).
class GradientReducer {
 public:
  GradientReducer(std::vector<at::Tensor> parameters, std::shared_ptr<Communicator> communicator,
                  GradientReducerOptions options = {});
  ~GradientReducer();
  GradientReducer(const GradientReducer&) = delete;
  GradientReducer& operator=(const GradientReducer&) = delete;

  /// Parameter indices (into the constructor's list) of each bucket. Every parameter that
  /// requires a gradient is in exactly one bucket.
  const std::vector<std::vector<size_t>>& buckets() const;
  /// false: the next backwards only accumulate (no communication); true (default): reduce.
  void set_sync(bool sync);
  /// Waits for every bucket (starting those backward did not fill: unused parameters count as
  /// zero) and writes the averaged gradients into the parameters' .grad(). Call after each
  /// synchronising backward, before the optimizer step.
  void finish();

 private:
  struct State;
  std::shared_ptr<State> state_;
};

}  // namespace twins::distributed

// Differentiable collectives and SyncBatchNorm as LibTorch autograd functions.
//
// Convention (see communicator.h): each backward returns this rank's share of the gradient of
// sum_r loss_r. Autograd functions keep the communicator's id, not a pointer, so a graph that
// outlives its communicator fails with a message instead of touching freed memory.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include "twins/distributed/communicator.h"

namespace twins::distributed {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// [1, C, 1, ...]: per-channel [C] tensors viewed to broadcast against x [N, C, ...].
std::vector<int64_t> channel_shape(const at::Tensor& x) {
  std::vector<int64_t> shape(static_cast<size_t>(x.dim()), 1);
  shape[1] = x.size(1);
  return shape;
}

// Every dimension of x but the channels: what batch statistics reduce over.
std::vector<int64_t> batch_dims(const at::Tensor& x) {
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < x.dim(); ++d) dims.push_back(d);
  return dims;
}

std::shared_ptr<Communicator> saved_communicator(AutogradContext* ctx) {
  return Communicator::find(ctx->saved_data["communicator"].toInt());
}

struct GatherFunction : torch::autograd::Function<GatherFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t id) {
    ctx->saved_data["communicator"] = id;
    ctx->saved_data["rows"] = x.size(0);
    return Communicator::find(id)->all_gather(x);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto c = saved_communicator(ctx);
    const int64_t rows = ctx->saved_data["rows"].toInt();
    at::Tensor g = grads[0].contiguous().clone();
    c->all_reduce(g);
    return {g.narrow(0, c->rank() * rows, rows), at::Tensor()};
  }
};

struct AllReduceFunction : torch::autograd::Function<AllReduceFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t id, bool exact) {
    ctx->saved_data["communicator"] = id;
    ctx->saved_data["exact"] = exact;
    at::Tensor sum = x.contiguous().clone();
    Communicator::find(id)->all_reduce(sum);
    return sum;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    at::Tensor g = grads[0];
    if (ctx->saved_data["exact"].toBool()) {
      g = g.contiguous().clone();
      saved_communicator(ctx)->all_reduce(g);
    }
    return {g, at::Tensor(), at::Tensor()};
  }
};

// y = (x - mean) invstd weight + bias with mean/invstd over all ranks (computed by the caller,
// without gradient); backward adds the terms through mean and invstd, summed over ranks.
struct SyncBatchNormFunction : torch::autograd::Function<SyncBatchNormFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                            const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& count, int64_t id) {
    const std::vector<int64_t> shape = channel_shape(x);
    const at::Tensor xf = x.to(mean.scalar_type());
    at::Tensor y = (xf - mean.view(shape)) * invstd.view(shape);
    if (weight.defined()) y = y * weight.to(mean.scalar_type()).view(shape);
    if (bias.defined()) y = y + bias.to(mean.scalar_type()).view(shape);
    ctx->save_for_backward({x, weight, mean, invstd, count});
    ctx->saved_data["communicator"] = id;
    ctx->saved_data["has_bias"] = bias.defined();
    return y.to(x.scalar_type());
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &mean = saved[2], &invstd = saved[3], &count = saved[4];
    const std::vector<int64_t> shape = channel_shape(x), dims = batch_dims(x);
    const at::Tensor dy = grads[0].to(mean.scalar_type());
    const at::Tensor xhat = (x.to(mean.scalar_type()) - mean.view(shape)) * invstd.view(shape);
    const at::Tensor sum_dy = dy.sum(dims), sum_dy_xhat = (dy * xhat).sum(dims);
    at::Tensor grad_x;
    if (x.requires_grad()) {
      const int64_t c = x.size(1);
      at::Tensor sums = at::cat({sum_dy, sum_dy_xhat}).contiguous();
      saved_communicator(ctx)->all_reduce(sums);
      const at::Tensor g_dy = sums.narrow(0, 0, c).view(shape), g_dy_xhat = sums.narrow(0, c, c).view(shape);
      at::Tensor scale = invstd.view(shape);
      if (weight.defined()) scale = scale * weight.to(mean.scalar_type()).view(shape);
      grad_x = (scale * (dy - g_dy / count - xhat * (g_dy_xhat / count))).to(x.scalar_type());
    }
    // The affine parameters' gradients stay local sums: data parallelism averages them.
    at::Tensor grad_w = weight.defined() ? sum_dy_xhat.to(weight.scalar_type()) : at::Tensor();
    at::Tensor grad_b = ctx->saved_data["has_bias"].toBool()
                            ? sum_dy.to(weight.defined() ? weight.scalar_type() : x.scalar_type())
                            : at::Tensor();
    return {grad_x, grad_w, grad_b, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor all_gather_with_grad(const at::Tensor& x, const std::shared_ptr<Communicator>& communicator) {
  TORCH_CHECK(communicator, "all_gather_with_grad: no communicator");
  return GatherFunction::apply(x, communicator->id());
}

at::Tensor all_reduce_with_grad(const at::Tensor& x, const std::shared_ptr<Communicator>& communicator) {
  TORCH_CHECK(communicator, "all_reduce_with_grad: no communicator");
  return AllReduceFunction::apply(x, communicator->id(), true);
}

at::Tensor all_reduce_local_grad(const at::Tensor& x, const std::shared_ptr<Communicator>& communicator) {
  TORCH_CHECK(communicator, "all_reduce_local_grad: no communicator");
  return AllReduceFunction::apply(x, communicator->id(), false);
}

at::Tensor sync_batch_norm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                           at::Tensor running_mean, at::Tensor running_var, double momentum, double eps,
                           const std::shared_ptr<Communicator>& communicator) {
  TORCH_CHECK(communicator, "sync_batch_norm: no communicator");
  TORCH_CHECK(x.dim() >= 2, "sync_batch_norm: expected [N, C, ...], got ", x.sizes());
  const int64_t c = x.size(1);
  // Statistics in float32 at least (bf16/fp16 activations under autocast).
  const at::ScalarType st = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor mean, invstd, count;
  {
    at::NoGradGuard no_grad;
    const std::vector<int64_t> shape = channel_shape(x), dims = batch_dims(x);
    const at::Tensor xf = x.detach().to(st);
    const double n = static_cast<double>(x.numel() / std::max<int64_t>(1, c));
    // Each rank's count, mean and sum of squared deviations; combined exactly (Chan et al.),
    // which keeps float32 accurate where sum-of-squares formulas cancel.
    const at::Tensor m = xf.mean(dims);
    const at::Tensor m2 = (xf - m.view(shape)).pow(2).sum(dims);
    const at::Tensor local = at::cat({at::full({1}, n, m.options()), m, m2});
    const at::Tensor all = communicator->all_gather(local.view({1, -1})).view({-1, 2 * c + 1});
    const at::Tensor counts = all.select(1, 0).unsqueeze(1);
    // A rank with an empty batch has a NaN mean: weighed by its count of 0, it must be 0.
    const at::Tensor means = all.narrow(1, 1, c).masked_fill(counts.eq(0), 0), m2s = all.narrow(1, 1 + c, c);
    // The total stays on the device (a host read here would stall the GPU's queue once a layer);
    // only a rank with at most one value of its own asks whether the ranks together have more.
    count = counts.sum();
    if (n <= 1) {
      const double total = count.item<double>();
      TORCH_CHECK(total > 1, "sync_batch_norm: needs more than one value per channel over all ranks, got ", total);
    }
    mean = (counts * means).sum(0) / count;
    const at::Tensor var = (m2s + counts * (means - mean).pow(2)).sum(0) / count;
    invstd = (var + eps).rsqrt();
    if (running_mean.defined()) running_mean.mul_(1 - momentum).add_(mean.to(running_mean.scalar_type()), momentum);
    if (running_var.defined())
      running_var.mul_(1 - momentum).add_((var * (count / (count - 1))).to(running_var.scalar_type()), momentum);
  }
  return SyncBatchNormFunction::apply(x, weight, bias, mean, invstd, count, communicator->id());
}

}  // namespace twins::distributed

#include "twins/train/lars.h"

#include <ATen/ATen.h>
#include <torch/optim/serialize.h>

#include <vector>

#include "core/compat.h"

namespace twins::train {

LARSOptions::LARSOptions(double lr) : lr_(lr) {}

void LARSOptions::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(lr);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(weight_decay);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(momentum);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(eta);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(exclude_1d);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(clip);
  archive.write("variant", c10::IValue(static_cast<int64_t>(variant())));
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(eps);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(exclude_zero_weight_decay);
}

void LARSOptions::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, lr);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, weight_decay);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, momentum);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(double, eta);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, exclude_1d);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, clip);
  // Checkpoints of twins 0.1 have none of the following: the official form.
  c10::IValue v;
  if (archive.try_read("variant", v)) variant(static_cast<LARSVariant>(v.toInt()));
  if (archive.try_read("eps", v)) eps(v.toDouble());
  if (archive.try_read("exclude_zero_weight_decay", v)) exclude_zero_weight_decay(v.toBool());
}

void LARSParamState::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(momentum_buffer);
}

void LARSParamState::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(at::Tensor, momentum_buffer);
}

LARS::LARS(std::vector<torch::optim::OptimizerParamGroup> param_groups, LARSOptions defaults)
    : Optimizer(param_groups, std::make_unique<LARSOptions>(defaults)) {
  compat::keep_group_options(*this, param_groups);  // newer LibTorch replaced them by `defaults`
  TORCH_CHECK(defaults.lr() >= 0, "LARS: invalid learning rate ", defaults.lr());
  TORCH_CHECK(defaults.momentum() >= 0, "LARS: invalid momentum ", defaults.momentum());
  TORCH_CHECK(defaults.weight_decay() >= 0, "LARS: invalid weight_decay ", defaults.weight_decay());
  TORCH_CHECK(defaults.eta() > 0, "LARS: invalid eta ", defaults.eta());
}

LARS::LARS(std::vector<at::Tensor> params, LARSOptions defaults)
    : LARS({torch::optim::OptimizerParamGroup(std::move(params))}, defaults) {}

// Multi-tensor form: per group, the norms of all adapted parameters in one _foreach_norm each,
// the trust ratios as one vector, and momentum and update as _foreach ops: on a GPU a few dozen
// launches per step instead of a dozen per parameter. On the CPU every element sees the same
// operations in the same order as the per-parameter form (tests/train checks it bit for bit).
at::Tensor LARS::step(LossClosure closure) {
  at::NoGradGuard no_grad;
  at::Tensor loss;
  if (closure) {
    at::AutoGradMode enable(true);
    loss = closure();
  }
  for (auto& group : param_groups_) {
    const auto& o = static_cast<const LARSOptions&>(group.options());
    // Parameters with gradients: adapted ones (weight decay and trust ratio) and excluded ones.
    std::vector<at::Tensor> params, grads, buffers, excluded_params, excluded_grads, excluded_buffers;
    for (auto& p : group.params()) {
      if (!p.grad().defined()) continue;
      auto& slot = state_[compat::optimizer_state_key(state_, p)];
      if (!slot) {
        auto s = std::make_unique<LARSParamState>();
        s->momentum_buffer(at::zeros_like(p, at::MemoryFormat::Preserve));
        slot = std::move(s);
      }
      const at::Tensor mu = static_cast<LARSParamState&>(*slot).momentum_buffer();
      const bool excluded =
          (o.exclude_1d() && p.dim() == 1) || (o.exclude_zero_weight_decay() && o.weight_decay() == 0);
      (excluded ? excluded_params : params).push_back(p);
      (excluded ? excluded_grads : grads).push_back(p.grad());
      (excluded ? excluded_buffers : buffers).push_back(mu);
    }
    // LARC clipping: min(q / lr, 1), whose limit at lr 0 is 1 (warm-ups start at lr 0).
    auto clip = [&](const at::Tensor& q) {
      if (!o.clip()) return q;
      return o.lr() > 0 ? at::clamp_max(q / o.lr(), 1.0) : at::ones_like(q);
    };
    // The update d of each adapted parameter.
    std::vector<at::Tensor> updates;
    if (!params.empty()) {
      const at::Tensor param_norm = at::stack(at::_foreach_norm(params));
      if (o.variant() == LARSVariant::official) {
        updates = o.weight_decay() != 0 ? at::_foreach_add(grads, params, o.weight_decay()) : grads;
        const at::Tensor update_norm = at::stack(at::_foreach_norm(updates));
        const at::Tensor one = at::ones_like(param_norm);
        const at::Tensor q =
            clip(at::where(param_norm > 0., at::where(update_norm > 0, o.eta() * param_norm / update_norm, one), one));
        const std::vector<at::Tensor> qs = q.unbind(0);
        for (size_t i = 0; i < updates.size(); ++i) updates[i] = updates[i].mul(qs[i]);
      } else {  // solo-learn / lightly: a parameter with a zero norm or gradient keeps g alone
        const at::Tensor grad_norm = at::stack(at::_foreach_norm(grads));
        const at::Tensor q = clip(o.eta() * param_norm / (grad_norm + o.weight_decay() * param_norm + o.eps()));
        const at::Tensor keep = at::logical_and(param_norm > 0, grad_norm > 0);
        const std::vector<at::Tensor> qs = q.unbind(0), keeps = keep.unbind(0);
        updates = at::_foreach_add(grads, params, o.weight_decay());
        for (size_t i = 0; i < updates.size(); ++i) updates[i] = at::where(keeps[i], updates[i].mul(qs[i]), grads[i]);
      }
    }
    // mu <- momentum mu + d; p <- p - lr mu (excluded parameters: d = g).
    for (auto* set : {&params, &excluded_params}) {
      if (set->empty()) continue;
      const bool adapted = set == &params;
      auto& mus = adapted ? buffers : excluded_buffers;
      at::_foreach_mul_(mus, o.momentum());
      at::_foreach_add_(mus, adapted ? updates : excluded_grads);
      at::_foreach_add_(*set, mus, -o.lr());
    }
  }
  return loss;
}

void LARS::save(torch::serialize::OutputArchive& archive) const {
  torch::optim::serialize<LARSParamState, LARSOptions>(archive, *this);
}

void LARS::load(torch::serialize::InputArchive& archive) {
  torch::optim::serialize<LARSParamState, LARSOptions>(archive, *this);
}

}  // namespace twins::train

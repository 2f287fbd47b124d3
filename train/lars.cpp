#include "twins/train/lars.h"

#include <ATen/ATen.h>
#include <torch/optim/serialize.h>

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
    : Optimizer(std::move(param_groups), std::make_unique<LARSOptions>(defaults)) {
  TORCH_CHECK(defaults.lr() >= 0, "LARS: invalid learning rate ", defaults.lr());
  TORCH_CHECK(defaults.momentum() >= 0, "LARS: invalid momentum ", defaults.momentum());
  TORCH_CHECK(defaults.weight_decay() >= 0, "LARS: invalid weight_decay ", defaults.weight_decay());
  TORCH_CHECK(defaults.eta() > 0, "LARS: invalid eta ", defaults.eta());
}

LARS::LARS(std::vector<at::Tensor> params, LARSOptions defaults)
    : LARS({torch::optim::OptimizerParamGroup(std::move(params))}, defaults) {}

at::Tensor LARS::step(LossClosure closure) {
  at::NoGradGuard no_grad;
  at::Tensor loss;
  if (closure) {
    at::AutoGradMode enable(true);
    loss = closure();
  }
  for (auto& group : param_groups_) {
    const auto& o = static_cast<const LARSOptions&>(group.options());
    // LARC clipping: min(q / lr, 1), whose limit at lr 0 is 1 (warm-ups start at lr 0).
    auto clip = [&](const at::Tensor& q) {
      if (!o.clip()) return q;
      return o.lr() > 0 ? at::clamp_max(q / o.lr(), 1.0) : at::ones_like(q);
    };
    for (auto& p : group.params()) {
      if (!p.grad().defined()) continue;
      const bool excluded =
          (o.exclude_1d() && p.dim() == 1) || (o.exclude_zero_weight_decay() && o.weight_decay() == 0);
      at::Tensor d = p.grad();
      if (excluded) {
        // neither weight decay nor adaptation
      } else if (o.variant() == LARSVariant::official) {
        if (o.weight_decay() != 0) d = d.add(p, o.weight_decay());
        const at::Tensor param_norm = p.norm(), update_norm = d.norm();
        const at::Tensor one = at::ones_like(param_norm);
        const at::Tensor q =
            at::where(param_norm > 0., at::where(update_norm > 0, o.eta() * param_norm / update_norm, one), one);
        d = d.mul(clip(q));
      } else {  // solo-learn / lightly: a parameter with a zero norm or gradient keeps g alone
        const at::Tensor param_norm = p.norm(), grad_norm = d.norm();
        const at::Tensor q = o.eta() * param_norm / (grad_norm + o.weight_decay() * param_norm + o.eps());
        const at::Tensor adapted = d.add(p, o.weight_decay()).mul(clip(q));
        d = at::where(at::logical_and(param_norm > 0, grad_norm > 0), adapted, d);
      }
      auto& slot = state_[compat::optimizer_state_key(state_, p)];
      if (!slot) {
        auto s = std::make_unique<LARSParamState>();
        s->momentum_buffer(at::zeros_like(p, at::MemoryFormat::Preserve));
        slot = std::move(s);
      }
      at::Tensor mu = static_cast<LARSParamState&>(*slot).momentum_buffer();
      mu.mul_(o.momentum()).add_(d);
      p.add_(mu, -o.lr());
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

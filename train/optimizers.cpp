// The optimizer registry (lars, sgd, adamw) and the optimizer of an SSLModel: parameter groups
// built once here, the type's options from OptimizerConfig.
#include <torch/optim/adamw.h>
#include <torch/optim/sgd.h>

#include <ATen/ATen.h>

#include <cmath>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "core/compat.h"
#include "train/multi_tensor_adamw.h"
#include "train/ssl_model.h"
#include "twins/registry.h"
#include "twins/train/lars.h"

namespace twins::train {
namespace detail {
namespace {

// What every optimizer factory gets besides its spec: the groups and their learning rates.
struct ParameterGroups {
  std::vector<at::Tensor> weights, flat, fixed;  // fixed: the fixed-lr predictor
  double lr = 0, bias_lr = 0;
};

// Groups in the order set_learning_rates() expects: weights, 1-D parameters, then the fixed
// predictor group (weights' options, its lr never scheduled). `flat` takes `flat_options`.
template <class Options>
std::vector<torch::optim::OptimizerParamGroup> groups_of(const ParameterGroups& g, const Options& weights,
                                                         const Options& flat) {
  std::vector<torch::optim::OptimizerParamGroup> out;
  out.emplace_back(g.weights, std::make_unique<Options>(weights));
  out.emplace_back(g.flat, std::make_unique<Options>(flat));
  if (!g.fixed.empty()) out.emplace_back(g.fixed, std::make_unique<Options>(weights));
  return out;
}

// A LibTorch optimizer over `groups`, each keeping its own options on every LibTorch version.
template <class Optimizer, class Options>
std::shared_ptr<Optimizer> over_groups(const std::vector<torch::optim::OptimizerParamGroup>& groups,
                                       const Options& defaults) {
  auto optimizer = std::make_shared<Optimizer>(groups, defaults);
  compat::keep_group_options(*optimizer, groups);
  return optimizer;
}

using OptimizerRegistry = Registry<torch::optim::Optimizer, const OptimizerConfig&, const ParameterGroups&>;

const OptimizerRegistry& registry() {
  static const OptimizerRegistry r = [] {
    OptimizerRegistry r("optimizer");
    r.add("lars", [](const nlohmann::json&, const std::string&, const OptimizerConfig& c, const ParameterGroups& g) {
      // LARS excludes parameters from decay and adaptation itself: the 1-D ones (exclude_1d), or
      // lightly's way, the group of biases and norms, given weight decay 0 here.
      const bool by_decay = c.lars_exclude == "zero_weight_decay";
      const auto o = LARSOptions(g.lr)
                         .weight_decay(c.weight_decay)
                         .momentum(c.momentum)
                         .eta(c.eta)
                         .exclude_1d(c.exclude_1d && !by_decay)
                         .exclude_zero_weight_decay(by_decay)
                         .clip(c.clip)
                         .variant(c.lars_variant == "solo_learn" ? LARSVariant::solo_learn : LARSVariant::official)
                         .eps(c.lars_eps);
      // The flat group (1-D parameters, and those a network names, e.g. a ViT's class token) is
      // excluded as a group: weight decay 0 marks it.
      auto flat = LARSOptions(o).lr(g.bias_lr);
      if (c.exclude_1d) flat.weight_decay(0.0).exclude_1d(false).exclude_zero_weight_decay(true);
      return std::make_shared<LARS>(groups_of(g, o, flat), o);  // keeps its groups' options itself
    });
    r.add("sgd", [](const nlohmann::json&, const std::string&, const OptimizerConfig& c, const ParameterGroups& g) {
      const auto o = torch::optim::SGDOptions(g.lr).momentum(c.momentum).weight_decay(c.weight_decay);
      const auto flat = torch::optim::SGDOptions(o).lr(g.bias_lr).weight_decay(c.exclude_1d ? 0.0 : c.weight_decay);
      return over_groups<torch::optim::SGD>(groups_of(g, o, flat), o);
    });
    r.add("adamw", [](const nlohmann::json&, const std::string&, const OptimizerConfig& c, const ParameterGroups& g) {
      const auto o =
          torch::optim::AdamWOptions(g.lr).weight_decay(c.weight_decay).betas({c.betas[0], c.betas[1]}).eps(c.eps);
      const auto flat = torch::optim::AdamWOptions(o).lr(g.bias_lr).weight_decay(c.exclude_1d ? 0.0 : c.weight_decay);
      return over_groups<MultiTensorAdamW>(groups_of(g, o, flat), o);
    });
    return r;
  }();
  return r;
}

}  // namespace

at::Tensor MultiTensorAdamW::step(LossClosure closure) {
  at::NoGradGuard no_grad;
  at::Tensor loss;
  if (closure) {
    at::AutoGradMode enable(true);
    loss = closure();
  }
  for (auto& group : param_groups_) {
    const auto& o = static_cast<const torch::optim::AdamWOptions&>(group.options());
    // Parameters by their step count (one set unless some skipped steps without gradients):
    // the bias corrections are per count.
    struct Set {
      std::vector<at::Tensor> params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq;
    };
    std::map<int64_t, Set> sets;
    for (auto& p : group.params()) {
      if (!p.grad().defined()) continue;
      TORCH_CHECK(!p.grad().is_sparse(), "AdamW does not support sparse gradients");
      auto& slot = state_[compat::optimizer_state_key(state_, p)];
      if (!slot) {
        auto s = std::make_unique<torch::optim::AdamWParamState>();
        s->step(0);
        s->exp_avg(at::zeros_like(p, at::MemoryFormat::Preserve));
        s->exp_avg_sq(at::zeros_like(p, at::MemoryFormat::Preserve));
        if (o.amsgrad()) s->max_exp_avg_sq(at::zeros_like(p, at::MemoryFormat::Preserve));
        slot = std::move(s);
      }
      auto& s = static_cast<torch::optim::AdamWParamState&>(*slot);
      s.step(s.step() + 1);
      Set& set = sets[s.step()];
      set.params.push_back(p), set.grads.push_back(p.grad());
      set.exp_avg.push_back(s.exp_avg()), set.exp_avg_sq.push_back(s.exp_avg_sq());
      if (o.amsgrad()) set.max_exp_avg_sq.push_back(s.max_exp_avg_sq());
    }
    const double beta1 = std::get<0>(o.betas()), beta2 = std::get<1>(o.betas());
    for (auto& [step, set] : sets) {
      if (o.weight_decay() != 0) at::_foreach_mul_(set.params, 1 - o.lr() * o.weight_decay());
      const double correction1 = 1 - std::pow(beta1, step), correction2 = 1 - std::pow(beta2, step);
      at::_foreach_mul_(set.exp_avg, beta1);
      at::_foreach_add_(set.exp_avg, set.grads, 1 - beta1);
      at::_foreach_mul_(set.exp_avg_sq, beta2);
      at::_foreach_addcmul_(set.exp_avg_sq, set.grads, set.grads, 1 - beta2);
      if (o.amsgrad())
        for (size_t i = 0; i < set.max_exp_avg_sq.size(); ++i)
          at::max_out(set.max_exp_avg_sq[i], set.exp_avg_sq[i], set.max_exp_avg_sq[i]);
      std::vector<at::Tensor> denom = at::_foreach_sqrt(o.amsgrad() ? set.max_exp_avg_sq : set.exp_avg_sq);
      at::_foreach_div_(denom, std::sqrt(correction2));
      at::_foreach_add_(denom, o.eps());
      at::_foreach_addcdiv_(set.params, set.exp_avg, denom, -(o.lr() / correction1));
    }
  }
  return loss;
}

std::shared_ptr<torch::optim::Optimizer> make_optimizer(const OptimizerConfig& c, const SSLModel& model, double lr,
                                                        double bias_lr) {
  ParameterGroups g;
  g.lr = lr, g.bias_lr = bias_lr;
  std::vector<at::Tensor> scheduled = model.online_parameters();
  if (c.fixed_predictor_lr && model.predictor) {
    g.fixed = model.predictor->parameters();
    scheduled.clear();
    for (const auto* n : {&model.backbone, &model.projector})
      for (const auto& p : (*n)->parameters()) scheduled.push_back(p);
  }
  std::set<const void*> no_decay;
  for (const auto& p : model.backbone->no_weight_decay()) no_decay.insert(p.unsafeGetTensorImpl());
  for (const auto& p : scheduled)
    (p.dim() > 1 && !no_decay.count(p.unsafeGetTensorImpl()) ? g.weights : g.flat).push_back(p);
  return registry().create(nlohmann::json{{"type", c.type}}, "optimizer", c, g);
}

void set_learning_rates(torch::optim::Optimizer& optimizer, const std::vector<double>& lrs) {
  auto& groups = optimizer.param_groups();
  for (size_t g = 0; g < groups.size() && g < lrs.size(); ++g) groups[g].options().set_lr(lrs[g]);
}

}  // namespace detail

std::vector<std::string> optimizer_names() { return detail::registry().names_in_order(); }

}  // namespace twins::train

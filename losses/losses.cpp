// VICReg, Barlow Twins and BYOL losses, and their registry. The formulas are in
// include/twins/losses.h; comments here give the choices that matter for exactness.
#include "twins/losses.h"

#include <ATen/ATen.h>

#include <sstream>
#include <stdexcept>

#include "losses/checks.h"
#include "twins/config.h"
#include "twins/distributed/communicator.h"

namespace twins::losses {
namespace detail {

std::string shape_of(const at::Tensor& t) {
  if (!t.defined()) return "(undefined)";
  std::ostringstream s;
  s << "[";
  for (int64_t i = 0; i < t.dim(); ++i) s << (i ? ", " : "") << t.size(i);
  s << "]";
  return s.str();
}

void check_pair(const char* loss, const char* name_a, const at::Tensor& a, const char* name_b, const at::Tensor& b,
                int64_t min_batch) {
  const std::string got = std::string("; got ") + name_a + " " + shape_of(a) + " and " + name_b + " " + shape_of(b);
  if (!a.defined() || !b.defined() || a.dim() != 2 || b.dim() != 2)
    throw std::invalid_argument(std::string(loss) + ": expected 2-D embeddings [N, D]" + got);
  if (a.sizes() != b.sizes())
    throw std::invalid_argument(std::string(loss) + ": " + name_a + " and " + name_b + " must have the same shape" +
                                got);
  if (!a.is_floating_point() || !b.is_floating_point())
    throw std::invalid_argument(std::string(loss) + ": expected floating-point embeddings" + got);
  if (a.size(0) < min_batch)
    throw std::invalid_argument(std::string(loss) + ": needs a batch of at least " + std::to_string(min_batch) +
                                " samples (its statistics are over the batch)" + got);
  if (a.size(1) < 1) throw std::invalid_argument(std::string(loss) + ": embeddings have no features" + got);
}

}  // namespace detail

namespace {
using detail::check_pair;

// Whether the statistics span several ranks.
bool distributed(const std::shared_ptr<distributed::Communicator>& c) { return c && c->world_size() > 1; }

// The off-diagonal entries of a square matrix, flattened, as the official code's off_diagonal:
// it avoids sum(c^2) - sum(diag^2), which cancels catastrophically in float32 when the
// off-diagonal entries are small.
at::Tensor off_diagonal(const at::Tensor& c) {
  const int64_t n = c.size(0);
  if (n == 1) return c.new_zeros({0});
  return c.flatten().slice(0, 0, n * n - 1).view({n - 1, n + 1}).slice(1, 1).flatten();
}

}  // namespace

const at::Tensor& LossOutput::term(const std::string& name) const {
  for (const auto& t : terms)
    if (t.first == name) return t.second;
  throw std::out_of_range("LossOutput: no term named " + name);
}

LossOutput vicreg_loss(const at::Tensor& z_a, const at::Tensor& z_b, const VICRegOptions& o) {
  check_pair("vicreg_loss", "z_a", z_a, "z_b", z_b, 2);
  const int64_t d = z_a.size(1);

  // Invariance on this rank's pairs; variance and covariance over the global batch, gathered
  // with gradients flowing back to every rank (the official FullGatherLayer).
  const at::Tensor invariance = at::mse_loss(z_a, z_b);
  const bool global = distributed(o.communicator);
  const at::Tensor ga = global ? distributed::all_gather_with_grad(z_a, o.communicator) : z_a;
  const at::Tensor gb = global ? distributed::all_gather_with_grad(z_b, o.communicator) : z_b;
  const int64_t n = ga.size(0);
  const at::Tensor xa = ga - ga.mean(0), xb = gb - gb.mean(0);
  auto hinge = [&](const at::Tensor& x) {
    return at::relu(1.0 - at::sqrt(x.var(0, /*unbiased=*/true) + o.eps)).mean();
  };
  at::Tensor variance = hinge(xa) + hinge(xb);
  if (o.average_variance_branches) variance = variance / 2;

  auto cov_penalty = [&](const at::Tensor& x) {
    const at::Tensor c = x.t().mm(x) / static_cast<double>(n - 1);
    return off_diagonal(c).pow(2).sum() / static_cast<double>(d);
  };
  const at::Tensor covariance = cov_penalty(xa) + cov_penalty(xb);

  LossOutput out;
  out.total = o.sim_coeff * invariance + o.std_coeff * variance + o.cov_coeff * covariance;
  out.terms = {{"invariance", invariance}, {"variance", variance}, {"covariance", covariance}};
  return out;
}

LossOutput barlow_twins_loss(const at::Tensor& z_a, const at::Tensor& z_b, const BarlowTwinsOptions& o) {
  check_pair("barlow_twins_loss", "z_a", z_a, "z_b", z_b, 2);
  const bool global = distributed(o.communicator) && !o.per_rank;
  const int64_t n = z_a.size(0) * (global ? o.communicator->world_size() : 1);

  // BatchNorm1d(affine=False) in training mode: biased variance over the (global) batch; over
  // several ranks, the official code's SyncBatchNorm: statistics summed with exact gradients.
  auto sum_over_batch = [&](const at::Tensor& x) {
    return global ? distributed::all_reduce_with_grad(x.sum(0), o.communicator) : x.sum(0);
  };
  auto normalise = [&](const at::Tensor& z) {
    const at::Tensor centred = z - sum_over_batch(z) / static_cast<double>(n);
    return centred / at::sqrt(sum_over_batch(centred.pow(2)) / static_cast<double>(n) + o.eps);
  };
  at::Tensor c = normalise(z_a).t().mm(normalise(z_b)) / static_cast<double>(n);
  if (global)  // the exact gradient, or the official plain all_reduce(c) (1/W of it)
    c = o.reference_compatible ? distributed::all_reduce_local_grad(c, o.communicator)
                               : distributed::all_reduce_with_grad(c, o.communicator);
  else if (o.per_rank && distributed(o.communicator))  // solo-learn: all_reduce(c) / W, local gradient
    c = distributed::all_reduce_local_grad(c, o.communicator) / static_cast<double>(o.communicator->world_size());
  const at::Tensor on_diagonal = (c.diagonal() - 1.0).pow(2).sum();
  const at::Tensor off = off_diagonal(c).pow(2).sum();

  LossOutput out;
  out.total = o.scale * (on_diagonal + o.lambda * off);
  out.terms = {{"on_diagonal", on_diagonal}, {"off_diagonal", off}};
  return out;
}

LossOutput byol_loss(const at::Tensor& online_pred_a, const at::Tensor& online_pred_b, const at::Tensor& target_proj_a,
                     const at::Tensor& target_proj_b) {
  check_pair("byol_loss", "online_pred_a", online_pred_a, "target_proj_b", target_proj_b, 1);
  check_pair("byol_loss", "online_pred_b", online_pred_b, "target_proj_a", target_proj_a, 1);
  check_pair("byol_loss", "online_pred_a", online_pred_a, "online_pred_b", online_pred_b, 1);
  // F.normalize semantics: x / max(||x||, 1e-12).
  auto normalise = [](const at::Tensor& x) { return x / x.norm(2, {1}, /*keepdim=*/true).clamp_min(1e-12); };
  auto regression = [&](const at::Tensor& p, const at::Tensor& t) {
    return (2.0 - 2.0 * (normalise(p) * normalise(t.detach())).sum(1)).mean();
  };
  const at::Tensor a = regression(online_pred_a, target_proj_b);
  const at::Tensor b = regression(online_pred_b, target_proj_a);
  LossOutput out;
  out.total = a + b;
  out.terms = {{"view_a", a}, {"view_b", b}};
  return out;
}

// ---- the losses as registered components (see losses/registry.cpp)
// ----------------------------------------------------------------------------

namespace {

class VICRegLoss final : public Loss {
 public:
  LossNeeds needs() const override {
    return {/*predictor=*/false, /*momentum_target=*/false, /*batch_statistics=*/true};
  }
  VICRegLoss(const nlohmann::json& spec, const std::string& path) {
    config::ConfigReader r(spec, path);
    r.allow("type");
    r.get("sim_coeff", o_.sim_coeff);
    r.get("std_coeff", o_.std_coeff);
    r.get("cov_coeff", o_.cov_coeff);
    r.get("eps", o_.eps);
    r.get("average_variance_branches", o_.average_variance_branches);
    r.finish();
    config::require(o_.sim_coeff >= 0 && o_.std_coeff >= 0 && o_.cov_coeff >= 0, path,
                    "vicreg coefficients must be >= 0");
    config::require(o_.eps > 0, r.path_of("eps"), "must be > 0");
  }
  std::string name() const override { return "vicreg"; }
  std::string title() const override { return "VICReg"; }
  void set_communicator(std::shared_ptr<distributed::Communicator> c) override { o_.communicator = std::move(c); }
  LossOutput compute(const ViewEmbeddings& a, const ViewEmbeddings& b) const override {
    return vicreg_loss(a.projection, b.projection, o_);
  }
  nlohmann::json to_json() const override {
    return {{"type", name()},
            {"sim_coeff", o_.sim_coeff},
            {"std_coeff", o_.std_coeff},
            {"cov_coeff", o_.cov_coeff},
            {"eps", o_.eps},
            {"average_variance_branches", o_.average_variance_branches}};
  }

 private:
  VICRegOptions o_;
};

class BarlowTwinsLoss final : public Loss {
 public:
  LossNeeds needs() const override {
    return {/*predictor=*/false, /*momentum_target=*/false, /*batch_statistics=*/true};
  }
  BarlowTwinsLoss(const nlohmann::json& spec, const std::string& path) {
    config::ConfigReader r(spec, path);
    r.allow("type");
    r.get("lambda", o_.lambda);
    r.get("scale", o_.scale);
    r.get("eps", o_.eps);
    r.get("reference_compatible", o_.reference_compatible);
    std::string normalize = o_.per_rank ? "per_rank" : "global";
    r.get("normalize", normalize);
    config::require(normalize == "global" || normalize == "per_rank", r.path_of("normalize"),
                    "must be global or per_rank, got \"" + normalize + "\"");
    o_.per_rank = normalize == "per_rank";
    r.finish();
    config::require(o_.lambda >= 0, r.path_of("lambda"), "must be >= 0");
    config::require(o_.scale > 0, r.path_of("scale"), "must be > 0");
    config::require(o_.eps > 0, r.path_of("eps"), "must be > 0");
  }
  std::string name() const override { return "barlow_twins"; }
  std::string title() const override { return "Barlow Twins"; }
  void set_communicator(std::shared_ptr<distributed::Communicator> c) override { o_.communicator = std::move(c); }
  LossOutput compute(const ViewEmbeddings& a, const ViewEmbeddings& b) const override {
    return barlow_twins_loss(a.projection, b.projection, o_);
  }
  nlohmann::json to_json() const override {
    return {{"type", name()},
            {"lambda", o_.lambda},
            {"scale", o_.scale},
            {"eps", o_.eps},
            {"reference_compatible", o_.reference_compatible},
            {"normalize", o_.per_rank ? "per_rank" : "global"}};
  }

 private:
  BarlowTwinsOptions o_;
};

class BYOLLoss final : public Loss {
 public:
  BYOLLoss(const nlohmann::json& spec, const std::string& path) {
    config::ConfigReader r(spec, path);
    r.allow("type");
    r.finish();
  }
  std::string name() const override { return "byol"; }
  std::string title() const override { return "BYOL"; }
  LossNeeds needs() const override { return {/*predictor=*/true, /*momentum_target=*/true}; }
  LossOutput compute(const ViewEmbeddings& a, const ViewEmbeddings& b) const override {
    if (!a.prediction.defined() || !a.target_projection.defined() || !b.prediction.defined() ||
        !b.target_projection.defined())
      throw std::invalid_argument("byol: needs the predictor outputs and target projections");
    return byol_loss(a.prediction, b.prediction, a.target_projection, b.target_projection);
  }
  nlohmann::json to_json() const override { return {{"type", name()}}; }
};

}  // namespace

std::shared_ptr<Loss> make_vicreg_loss(const nlohmann::json& spec, const std::string& path) {
  return std::make_shared<VICRegLoss>(spec, path);
}
std::shared_ptr<Loss> make_barlow_twins_loss(const nlohmann::json& spec, const std::string& path) {
  return std::make_shared<BarlowTwinsLoss>(spec, path);
}
std::shared_ptr<Loss> make_byol_loss(const nlohmann::json& spec, const std::string& path) {
  return std::make_shared<BYOLLoss>(spec, path);
}

}  // namespace twins::losses

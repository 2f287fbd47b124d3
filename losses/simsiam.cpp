// SimSiam (Chen & He, "Exploring Simple Siamese Representation Learning", CVPR 2021), as in
// facebookresearch/simsiam (main_simsiam.py, simsiam/builder.py, commit a7bc177):
//   D(p, z) = -cos(p, stopgrad(z)),  cos(x, y) = x/|x| . y/|y|  (each |.|^2 clamped to >= eps^2)
//   view_a = mean_n D(p_a, z_b),  view_b = mean_n D(p_b, z_a),  total = (view_a + view_b) / 2
// p: predictor outputs, z: projector outputs of the other view. No momentum target: the
// stop-gradient alone prevents collapse, so the loss asks for a predictor and nothing else.
//
// {"type": "simsiam", "eps": 1e-8}. Terms: "view_a", "view_b" (unweighted, as BYOL's).
#include <ATen/ATen.h>

#include <nlohmann/json.hpp>

#include "losses/checks.h"
#include "twins/config.h"
#include "twins/losses.h"

namespace twins::losses {
namespace {

// nn.CosineSimilarity as PyTorch 1.13 computes it, whatever LibTorch runs this: the squared
// norms are clamped to eps^2 outside autograd, so the gradient passes the clamp unchanged.
at::Tensor cosine(const at::Tensor& x, const at::Tensor& y, double eps) {
  auto inverse_norm = [eps](const at::Tensor& t) {
    const at::Tensor w = t.pow(2).sum(1, /*keepdim=*/true);
    return (w + (w.clamp_min(eps * eps) - w).detach()).rsqrt();
  };
  return ((x * inverse_norm(x)) * (y * inverse_norm(y))).sum(1);
}

class SimSiamLoss final : public Loss {
 public:
  SimSiamLoss(const nlohmann::json& spec, const std::string& path) {
    config::ConfigReader r(spec, path);
    r.allow("type");
    r.get("eps", eps_);
    r.finish();
    config::require(eps_ > 0, r.path_of("eps"), "must be > 0");
  }
  std::string name() const override { return "simsiam"; }
  std::string title() const override { return "SimSiam"; }
  LossNeeds needs() const override { return {/*predictor=*/true, /*momentum_target=*/false}; }
  LossOutput compute(const ViewEmbeddings& a, const ViewEmbeddings& b) const override {
    if (!a.prediction.defined() || !b.prediction.defined())
      throw std::invalid_argument("simsiam: needs the predictor outputs of both views");
    detail::check_pair("simsiam", "prediction_a", a.prediction, "projection_b", b.projection, 1);
    detail::check_pair("simsiam", "prediction_b", b.prediction, "projection_a", a.projection, 1);
    const at::Tensor view_a = -cosine(a.prediction, b.projection.detach(), eps_).mean();
    const at::Tensor view_b = -cosine(b.prediction, a.projection.detach(), eps_).mean();
    LossOutput out;
    out.total = (view_a + view_b) * 0.5;
    out.terms = {{"view_a", view_a}, {"view_b", view_b}};
    return out;
  }
  nlohmann::json to_json() const override { return {{"type", name()}, {"eps", eps_}}; }

 private:
  double eps_ = 1e-8;
};

}  // namespace

std::shared_ptr<Loss> make_simsiam_loss(const nlohmann::json& spec, const std::string& path) {
  return std::make_shared<SimSiamLoss>(spec, path);
}

}  // namespace twins::losses

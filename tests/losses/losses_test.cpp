#include "twins/losses.h"

#include <ATen/ATen.h>

#include <algorithm>

#include "tests/test_util.h"

using namespace twins;
using namespace twins::losses;
using twins::test::check_throws_with;
using twins::test::max_rel_error;
using twins::test::tensor_from_json;

namespace {

// Evaluates the golden case `c` with our implementation on tensors of `dtype`.
LossOutput evaluate(const nlohmann::json& c, std::vector<at::Tensor>& inputs) {
  const std::string name = c["name"];
  const auto& o = c["options"];
  if (name.rfind("vicreg", 0) == 0) {
    VICRegOptions v;
    v.sim_coeff = o.value("sim", 25.0);
    v.std_coeff = o.value("std", 25.0);
    v.cov_coeff = o.value("cov", 1.0);
    v.average_variance_branches = o.value("average", true);
    return vicreg_loss(inputs[0], inputs[1], v);
  }
  if (name.rfind("barlow_twins", 0) == 0) {
    BarlowTwinsOptions b;
    b.lambda = o.value("lambd", 0.0051);
    return barlow_twins_loss(inputs[0], inputs[1], b);
  }
  return byol_loss(inputs[0], inputs[1], inputs[2], inputs[3]);
}

void check_golden(at::ScalarType dtype, double value_tol, double grad_tol) {
  const auto golden = twins::test::read_json(twins::test::reference_path("losses_golden.json"));
  REQUIRE(golden["cases"].size() >= 18);
  double worst_value = 0, worst_grad = 0;
  for (const auto& c : golden["cases"]) {
    CAPTURE(c["name"].get<std::string>());
    std::vector<at::Tensor> inputs;
    for (const auto& in : c["inputs"]) inputs.push_back(tensor_from_json(in).to(dtype).requires_grad_(true));
    const LossOutput out = evaluate(c, inputs);
    const double total = out.total.item<double>();
    const double ref = c["total"];
    worst_value = std::max(worst_value, std::abs(total - ref) / std::abs(ref));
    CHECK(total == doctest::Approx(ref).epsilon(value_tol));
    for (const auto& [name, value] : c["terms"].items()) {
      const double term = out.term(name).item<double>();
      CHECK(term == doctest::Approx(value.get<double>()).epsilon(value_tol).scale(1.0));
    }
    CHECK(out.terms.size() == c["terms"].size());
    out.total.backward();
    for (size_t i = 0; i < inputs.size(); ++i) {
      if (c["grads"][i].is_null()) {
        CHECK_FALSE(inputs[i].grad().defined());  // BYOL's targets: stop-gradient
        continue;
      }
      const at::Tensor ref_grad = tensor_from_json(c["grads"][i]);
      const double scale = ref_grad.abs().max().item<double>();
      const double err = (inputs[i].grad().to(at::kDouble) - ref_grad).abs().max().item<double>() / scale;
      worst_grad = std::max(worst_grad, err);
      CHECK(err < grad_tol);
    }
  }
  MESSAGE("worst relative error: value ", worst_value, ", gradient ", worst_grad);
}

// Central finite differences of f at x, against autograd, for every element of a small x.
void check_finite_differences(const std::function<at::Tensor(const at::Tensor&)>& f, at::Tensor x) {
  x = x.to(at::kDouble).detach().requires_grad_(true);
  f(x).backward();
  const at::Tensor analytic = x.grad().clone();
  const double h = 1e-6;
  at::Tensor numeric = at::zeros_like(analytic);
  at::Tensor flat = x.detach().clone().flatten();
  for (int64_t i = 0; i < flat.numel(); ++i) {
    const double v = flat[i].item<double>();
    flat[i] = v + h;
    const double up = f(flat.view(x.sizes())).item<double>();
    flat[i] = v - h;
    const double down = f(flat.view(x.sizes())).item<double>();
    flat[i] = v;
    numeric.view({-1})[i] = (up - down) / (2 * h);
  }
  const double err = (analytic - numeric).abs().max().item<double>();
  const double scale = std::max(1.0, numeric.abs().max().item<double>());
  CHECK(err / scale < 1e-6);
}

}  // namespace

TEST_CASE("losses: golden values of the official formulas, float64") { check_golden(at::kDouble, 1e-12, 1e-10); }

TEST_CASE("losses: golden values of the official formulas, float32") { check_golden(at::kFloat, 1e-5, 1e-5); }

TEST_CASE("losses: finite-difference gradients in float64") {
  at::manual_seed(7);
  const at::Tensor other = at::randn({6, 4}, at::kDouble);
  SUBCASE("vicreg") {
    check_finite_differences([&](const at::Tensor& z) { return vicreg_loss(z, other).total; }, at::randn({6, 4}) * 0.3);
  }
  SUBCASE("barlow_twins") {
    check_finite_differences([&](const at::Tensor& z) { return barlow_twins_loss(z, other).total; }, at::randn({6, 4}));
  }
  SUBCASE("byol, through the online predictions") {
    const at::Tensor t = at::randn({6, 4}, at::kDouble), p = at::randn({6, 4}, at::kDouble);
    check_finite_differences([&](const at::Tensor& z) { return byol_loss(z, p, t, t * 2).total; }, at::randn({6, 4}));
  }
}

TEST_CASE("losses: invariants") {
  at::manual_seed(3);
  SUBCASE("identical views give zero invariance") {
    const at::Tensor z = at::randn({10, 7});
    const auto out = vicreg_loss(z, z.clone());
    CHECK(out.term("invariance").item<double>() == 0.0);
    CHECK(out.term("variance").item<double>() > 0.0);
  }
  SUBCASE("unit-variance, decorrelated embeddings give no VICReg variance/covariance penalty") {
    // Orthonormal, zero-mean columns scaled to unit (unbiased) variance.
    const int64_t n = 64, d = 8;
    at::Tensor x = at::randn({n, d}, at::kDouble);
    x = x - x.mean(0);
    at::Tensor q = std::get<0>(at::linalg_qr(x)) * std::sqrt(double(n - 1)) * 1.01;
    const auto out = vicreg_loss(q, q);
    CHECK(out.term("variance").item<double>() == doctest::Approx(0.0));
    CHECK(out.term("covariance").item<double>() < 1e-20);
  }
  SUBCASE("standardised, decorrelated embeddings give near-zero Barlow Twins loss") {
    const int64_t n = 64, d = 8;
    at::Tensor x = at::randn({n, d}, at::kDouble);
    x = x - x.mean(0);
    const at::Tensor q = std::get<0>(at::linalg_qr(x)) * std::sqrt(double(n));
    const auto out = barlow_twins_loss(q, q);
    CHECK(out.total.item<double>() < 1e-9);
    CHECK(out.term("off_diagonal").item<double>() < 1e-20);
    // and for unrelated views the loss is far from zero
    CHECK(barlow_twins_loss(q, at::randn({n, d}, at::kDouble)).total.item<double>() > 1.0);
  }
  SUBCASE("BYOL of equal directions is zero, of opposite directions is 8") {
    const at::Tensor p = at::randn({5, 16});
    CHECK(byol_loss(p, p, 3 * p, 0.5 * p).total.item<double>() == doctest::Approx(0.0).epsilon(1e-6));
    CHECK(byol_loss(p, p, -p, -p).total.item<double>() == doctest::Approx(8.0));
  }
  SUBCASE("BYOL's stop-gradient stops it") {
    const at::Tensor p = at::randn({4, 8}).requires_grad_();
    const at::Tensor t = at::randn({4, 8}).requires_grad_();
    byol_loss(p, p, t, t).total.backward();
    CHECK(p.grad().defined());
    CHECK_FALSE(t.grad().defined());
  }
  SUBCASE("solo-learn's variance convention is twice the official one") {
    const at::Tensor a = at::randn({8, 4}) * 0.2, b = at::randn({8, 4}) * 0.2;
    VICRegOptions sum;
    sum.average_variance_branches = false;
    CHECK(vicreg_loss(a, b, sum).term("variance").item<double>() ==
          doctest::Approx(2 * vicreg_loss(a, b).term("variance").item<double>()));
  }
}

TEST_CASE("losses: clear errors on bad shapes") {
  const at::Tensor a = at::randn({4, 8});
  check_throws_with<std::invalid_argument>(
      [&] {
        vicreg_loss(a, at::randn({4, 9}));
      },
      "vicreg_loss: z_a and z_b must have the same shape; "
      "got z_a [4, 8] and z_b [4, 9]");
  check_throws_with<std::invalid_argument>(
      [&] {
        vicreg_loss(at::randn({1, 8}), at::randn({1, 8}));
      },
      "at least 2 samples");
  check_throws_with<std::invalid_argument>(
      [&] {
        barlow_twins_loss(at::randn({4, 8, 2}), at::randn({4, 8, 2}));
      },
      "barlow_twins_loss: expected 2-D embeddings [N, D]; got z_a [4, 8, 2]");
  check_throws_with<std::invalid_argument>([&] { byol_loss(a, a, a, at::randn({3, 8})); }, "byol_loss");
  check_throws_with<std::invalid_argument>(
      [&] {
        vicreg_loss(at::ones({4, 8}, at::kLong), at::ones({4, 8}, at::kLong));
      },
      "floating-point");
}

TEST_CASE("losses: registry") {
  // The three methods of twins 0.1, sorted among any added since.
  const auto names = loss_names();
  CHECK(std::is_sorted(names.begin(), names.end()));
  for (const char* method : {"barlow_twins", "byol", "vicreg"})
    CHECK(std::count(names.begin(), names.end(), method) == 1);
  for (const auto& name : loss_names()) {
    CAPTURE(name);
    auto loss = create_loss({{"type", name}});
    CHECK(loss->name() == name);
    // to_json round trip
    CHECK(create_loss(loss->to_json())->to_json() == loss->to_json());
    CHECK(loss->title().size() > 0);
    ViewEmbeddings a{at::randn({6, 5}), at::randn({6, 5}), at::randn({6, 5})};
    ViewEmbeddings b{at::randn({6, 5}), at::randn({6, 5}), at::randn({6, 5})};
    CHECK(std::isfinite(loss->compute(a, b).total.item<double>()));
  }
  auto v = create_loss({{"type", "vicreg"}, {"sim_coeff", 1.0}, {"std_coeff", 0.0}, {"cov_coeff", 0.0}});
  const at::Tensor x = at::randn({6, 5}), y = at::randn({6, 5});
  CHECK(v->compute(ViewEmbeddings{x, {}, {}}, ViewEmbeddings{y, {}, {}}).total.item<double>() ==
        doctest::Approx(at::mse_loss(x, y).item<double>()));
  check_throws_with<std::invalid_argument>([] { create_loss({{"type", "simclr"}}); }, "valid types: barlow_twins byol");
  check_throws_with<std::invalid_argument>(
      [] {
        create_loss({{"type", "vicreg"}, {"sim_coef", 2}});
      },
      "loss.sim_coef: unknown key; did you mean sim_coeff?");
  check_throws_with<std::invalid_argument>(
      [] {
        create_loss({{"type", "barlow_twins"}, {"lambda", "big"}});
      },
      "loss.lambda: expected a number");
  check_throws_with<std::invalid_argument>(
      [] {
        create_loss({{"type", "barlow_twins"}, {"eps", -1}});
      },
      "loss.eps: must be > 0");
}

// SimSiam against the official formula run in PyTorch (tests/reference/simsiam_reference.py).
#include <ATen/ATen.h>

#include "tests/test_util.h"
#include "twins/losses.h"

using namespace twins::losses;
using twins::test::tensor_from_json;

namespace {

// The golden cases through the registry, as a training step calls the loss.
void check_simsiam_golden(at::ScalarType dtype, double value_tol, double grad_tol) {
  const auto golden = twins::test::read_json(twins::test::reference_path("simsiam_golden.json"));
  REQUIRE(golden["cases"].size() >= 5);
  const auto loss = create_loss({{"type", "simsiam"}});
  CHECK(loss->needs().predictor);
  CHECK_FALSE(loss->needs().momentum_target);
  double worst_value = 0, worst_grad = 0;
  for (const auto& c : golden["cases"]) {
    CAPTURE(c["name"].get<std::string>());
    std::vector<at::Tensor> in;  // p_a, p_b, z_a, z_b
    for (const auto& x : c["inputs"]) in.push_back(tensor_from_json(x).to(dtype).requires_grad_(true));
    const LossOutput out = loss->compute(ViewEmbeddings{in[2], in[0], {}}, ViewEmbeddings{in[3], in[1], {}});
    const double ref = c["total"];
    worst_value = std::max(worst_value, std::abs(out.total.item<double>() - ref) / std::abs(ref));
    CHECK(out.total.item<double>() == doctest::Approx(ref).epsilon(value_tol));
    for (const auto& [name, value] : c["terms"].items())
      CHECK(out.term(name).item<double>() == doctest::Approx(value.get<double>()).epsilon(value_tol));
    out.total.backward();
    for (size_t i = 0; i < in.size(); ++i) {
      if (c["grads"][i].is_null()) {
        CHECK_FALSE(in[i].grad().defined());  // stop-gradient on the projections
        continue;
      }
      const at::Tensor want = tensor_from_json(c["grads"][i]);
      const double err =
          (in[i].grad().to(at::kDouble) - want).abs().max().item<double>() / want.abs().max().item<double>();
      worst_grad = std::max(worst_grad, err);
      CHECK(err < grad_tol);
    }
  }
  MESSAGE("simsiam worst relative error: value ", worst_value, ", gradient ", worst_grad);
}

}  // namespace

TEST_CASE("losses: SimSiam golden values of the official formula, float64") {
  check_simsiam_golden(at::kDouble, 1e-12, 1e-10);
}

TEST_CASE("losses: SimSiam golden values, float32") { check_simsiam_golden(at::kFloat, 1e-5, 1e-4); }

TEST_CASE("losses: SimSiam invariants and errors") {
  at::manual_seed(3);
  const auto loss = create_loss("simsiam");
  const at::Tensor z = at::randn({6, 5});
  // Predictions equal to the other view's projection: cosine 1, the minimum -1.
  CHECK(loss->compute(ViewEmbeddings{z, z, {}}, ViewEmbeddings{z, z, {}}).total.item<double>() ==
        doctest::Approx(-1.0));
  // Scale-invariant in both arguments.
  const at::Tensor p = at::randn({6, 5});
  const double base = loss->compute(ViewEmbeddings{z, p, {}}, ViewEmbeddings{z, p, {}}).total.item<double>();
  CHECK(loss->compute(ViewEmbeddings{z * 3, p * 0.5, {}}, ViewEmbeddings{z * 3, p * 0.5, {}}).total.item<double>() ==
        doctest::Approx(base));
  twins::test::check_throws_with<std::invalid_argument>(
      [&] {
        loss->compute(ViewEmbeddings{z, {}, {}}, ViewEmbeddings{z, {}, {}});
      },
      "simsiam: needs the predictor outputs");
  twins::test::check_throws_with<std::invalid_argument>(
      [] {
        create_loss({{"type", "simsiam"}, {"eps", 0}});
      },
      "loss.eps: must be > 0");
  CHECK(create_loss(loss->to_json())->to_json() == loss->to_json());
}

// Calls the three losses through the installed package; exits non-zero on a wrong value.
#include <ATen/ATen.h>
#include <twins/losses.h>
#include <twins/version.h>

#include <cmath>
#include <iostream>

int main() {
  at::manual_seed(0);
  const at::Tensor a = at::randn({16, 8}), b = a.clone();
  const double vicreg = twins::losses::vicreg_loss(a, b).term("invariance").item<double>();
  const double barlow = twins::losses::barlow_twins_loss(a, b).total.item<double>();
  const double byol = twins::losses::byol_loss(a, b, a, b).total.item<double>();
  std::cout << "twins " << twins::version() << " consumer: vicreg invariance " << vicreg
            << ", barlow_twins " << barlow << ", byol " << byol << "\n";
  const bool ok = vicreg == 0.0 && std::isfinite(barlow) && barlow > 0 && std::abs(byol) < 1e-5;
  return ok ? 0 : 1;
}

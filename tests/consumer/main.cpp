// A downstream program built against the installed package (find_package(twins)): calls the
// three losses, then embeds images with twins::Embedder if given a backbone file.
#include <ATen/ATen.h>
#include <twins/embed.h>
#include <twins/losses.h>
#include <twins/version.h>

#include <cmath>
#include <iostream>

int main(int argc, char** argv) {
  at::manual_seed(0);
  const at::Tensor a = at::randn({16, 8}), b = a.clone();
  const double vicreg = twins::losses::vicreg_loss(a, b).term("invariance").item<double>();
  const double barlow = twins::losses::barlow_twins_loss(a, b).total.item<double>();
  const double byol = twins::losses::byol_loss(a, b, a, b).total.item<double>();
  std::cout << "twins " << twins::version() << " consumer: vicreg invariance " << vicreg << ", barlow_twins " << barlow
            << ", byol " << byol << "\n";
  if (!(vicreg == 0.0 && std::isfinite(barlow) && barlow > 0 && std::abs(byol) < 1e-5)) return 1;
  if (argc > 1) {
    twins::Embedder embedder(argv[1]);
    const at::Tensor images = at::randint(0, 256, {4, 40, 48, 3}, at::kByte);  // uint8 NHWC
    const at::Tensor features = embedder.embed(images);
    std::cout << "embedded " << features.size(0) << " images into " << features.size(1) << " features\n";
    if (features.size(0) != 4 || features.size(1) != embedder.dim()) return 1;
  }
  return 0;
}

#pragma once
// The kNN classifier's settings (DINO's protocol, see <twins/eval/probe.h>), light enough for the
// recipe's header, and their one reader: the eval config's "knn" and the recipe's
// "online_probe.knn" take the same keys with the same checks.
#include <cstdint>
#include <vector>

namespace twins::config {
class ConfigReader;
}

namespace twins::eval {

struct KnnOptions {
  std::vector<int64_t> k{10, 20, 100, 200};
  double temperature = 0.07;
  /// Test samples per similarity block: chunk x N_train floats in memory at once.
  int64_t chunk = 256;
};

/// Reads "variant" ("dino": the defaults in `options`; "lightly": k = 200, T = 0.1), then "k" (a
/// list, or one integer), "temperature" and "chunk" into `options`, and checks them; bad values
/// throw std::invalid_argument naming the key under the reader's path. Other keys are left to the
/// caller (the reader is not finished).
void read_knn_options(config::ConfigReader& reader, KnnOptions& options);

}  // namespace twins::eval

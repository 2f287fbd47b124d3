#include "twins/train/schedule.h"

#include <algorithm>
#include <cmath>

namespace twins::train {

double byol_tau(int64_t step, int64_t total, double tau_base) {
  const double progress = total > 0 ? std::min(1.0, static_cast<double>(step) / static_cast<double>(total)) : 1.0;
  return 1.0 - (1.0 - tau_base) * (std::cos(M_PI * progress) + 1.0) / 2.0;
}

}  // namespace twins::train

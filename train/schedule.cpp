#include "twins/train/schedule.h"

#include <algorithm>
#include <cmath>

namespace twins::train {

double warmup_cosine_lr(int64_t step, int64_t total, int64_t warmup, double base, double final_ratio) {
  if (warmup > 0 && step < warmup) return base * static_cast<double>(step) / static_cast<double>(warmup);
  const int64_t span = std::max<int64_t>(1, total - warmup);
  const double progress = std::min(1.0, static_cast<double>(step - warmup) / static_cast<double>(span));
  const double q = 0.5 * (1.0 + std::cos(M_PI * progress));
  const double end = base * final_ratio;
  return base * q + end * (1.0 - q);
}

double byol_tau(int64_t step, int64_t total, double tau_base) {
  const double progress = total > 0 ? std::min(1.0, static_cast<double>(step) / static_cast<double>(total)) : 1.0;
  return 1.0 - (1.0 - tau_base) * (std::cos(M_PI * progress) + 1.0) / 2.0;
}

}  // namespace twins::train

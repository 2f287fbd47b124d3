#include "twins/schedule.h"

#include <algorithm>
#include <cmath>

namespace twins {

double warmup_cosine_lr(int64_t step, int64_t total, int64_t warmup, double base, double final_ratio, double start) {
  if (warmup > 0 && step < warmup)
    return start + (base - start) * static_cast<double>(step) / static_cast<double>(warmup);
  const int64_t span = std::max<int64_t>(1, total - warmup);
  const double progress = std::min(1.0, static_cast<double>(step - warmup) / static_cast<double>(span));
  const double q = 0.5 * (1.0 + std::cos(M_PI * progress));
  const double end = base * final_ratio;
  return base * q + end * (1.0 - q);
}

}  // namespace twins

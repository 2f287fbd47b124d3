#pragma once
// Schedules of the official recipes, as plain functions of the step.
#include <cstdint>

#include "twins/schedule.h"

namespace twins::train {

using twins::scaled_lr;
using twins::warmup_cosine_lr;

/// BYOL's target decay: tau_k = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2, from tau_base at
/// k = 0 to 1 at k = K.
double byol_tau(int64_t step, int64_t total, double tau_base);

}  // namespace twins::train

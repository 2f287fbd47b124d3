#pragma once
// Learning-rate schedules shared by pretraining and evaluation, as plain functions of the step.
#include <cstdint>

namespace twins {

/// Learning rate at `step` (0-based) of `total` steps: linear warm-up from `start` over `warmup`
/// steps to `base`, then cosine decay to base * final_ratio at `total`. start 0 is the official
/// VICReg and Barlow Twins adjust_learning_rate; solo-learn warms up from 3e-5 and decays to 0
/// (its scheduler reaches `base` one step earlier, at warmup - 1); warmup 0 and final_ratio 0 is
/// the plain cosine of the linear probe.
double warmup_cosine_lr(int64_t step, int64_t total, int64_t warmup, double base, double final_ratio,
                        double start = 0.0);

/// The learning rate of a global batch: base_lr x batch / 256 (the linear scaling rule).
inline double scaled_lr(double base_lr, int64_t global_batch) {
  return base_lr * static_cast<double>(global_batch) / 256.0;
}

}  // namespace twins

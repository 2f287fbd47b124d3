#pragma once
// Process-wide settings of the compute runtime.

namespace twins {

/// Sets LibTorch's intra-op threads: n > 0 as given; 0 = every core of the machine, unless
/// OMP_NUM_THREADS or MKL_NUM_THREADS is set, which then rules. (Some LibTorch builds, Debian's
/// among them, otherwise start with one thread.) Returns the number in effect.
int set_compute_threads(int n);

}  // namespace twins

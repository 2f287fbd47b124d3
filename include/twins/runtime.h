#pragma once
// Process-wide settings of the compute runtime.

namespace twins {

/// Sets LibTorch's intra-op threads: n > 0 as given; 0 = every core of the machine, unless
/// OMP_NUM_THREADS or MKL_NUM_THREADS is set, which then rules. (Some LibTorch builds, Debian's
/// among them, otherwise start with one thread.) Returns the number in effect.
int set_compute_threads(int n);

/// Keeps freed tensor memory in the process for reuse (glibc: no mmap for large blocks, no trim),
/// instead of returning it to the system and page-faulting it back on every allocation: on the CPU
/// this makes a ResNet-18 training step ~1.6x faster. Process-wide, so programs opt in (the twins
/// command does); TWINS_MALLOC=system leaves the allocator as it is. Returns whether it applied.
bool tune_allocator();

}  // namespace twins

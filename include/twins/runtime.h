#pragma once
// Process-wide settings of the compute runtime, and the one way a device name becomes a device.
#include <c10/core/Device.h>

#include <string>

namespace twins {

/// The device named `name`: "auto" (CUDA device 0 when CUDA is available, else the CPU), "cpu",
/// "cuda" (= "cuda:0") or "cuda:N". `what` names the setting in messages ("train.device").
/// Throws std::invalid_argument for a name that is not a device, std::runtime_error for a CUDA
/// device this process cannot use (no CUDA in this LibTorch or machine, or N too large).
c10::Device resolve_device(const std::string& name, const std::string& what = "device");

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

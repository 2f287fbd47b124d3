#include "twins/runtime.h"

#include <ATen/Parallel.h>

#include <cstdlib>
#include <cstring>
#if defined(__GLIBC__)
#include <malloc.h>
#endif
#include <thread>

namespace twins {

int set_compute_threads(int n) {
  if (n <= 0) {
    if (std::getenv("OMP_NUM_THREADS") || std::getenv("MKL_NUM_THREADS")) return at::get_num_threads();
    n = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  }
  at::set_num_threads(n);
  return at::get_num_threads();
}

bool tune_allocator() {
  const char* choice = std::getenv("TWINS_MALLOC");
  if (choice && std::strcmp(choice, "system") == 0) return false;
#if defined(__GLIBC__)
  // Activations above glibc's mmap threshold (32 MB at most) are otherwise mapped and unmapped on
  // every step, each page zero-filled again by the kernel: most of the "sys" time of CPU training.
  return mallopt(M_MMAP_MAX, 0) == 1 && mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1;
#else
  return false;
#endif
}

}  // namespace twins

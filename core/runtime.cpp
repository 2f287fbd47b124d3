#include "twins/runtime.h"

#include <ATen/Parallel.h>

#include <cstdlib>
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

}  // namespace twins

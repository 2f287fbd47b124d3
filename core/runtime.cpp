#include "twins/runtime.h"

#include <ATen/Parallel.h>
#include <torch/cuda.h>

#include <cstdlib>
#include <cstring>
#include <fstream>
#if defined(__GLIBC__)
#include <dlfcn.h>
#include <malloc.h>
#endif
#include <sstream>
#include <stdexcept>
#include <thread>

#include "core/compat.h"

// A CUDA build (CMake found LibTorch's CUDA libraries) can ask the CUDA allocator for its peak.
#ifdef TWINS_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

namespace twins {

c10::Device resolve_device(const std::string& name, const std::string& what) {
  if (name == "auto") return torch::cuda::is_available() ? c10::Device(c10::kCUDA, 0) : c10::Device(c10::kCPU);
  c10::Device d(c10::kCPU);
  try {
    d = c10::Device(name);
  } catch (const std::exception&) {
    throw std::invalid_argument(what + ": \"" + name + "\" is not a device (auto, cpu, cuda, cuda:N)");
  }
  if (d.is_cpu()) return c10::Device(c10::kCPU);
  if (!d.is_cuda())
    throw std::invalid_argument(what + ": \"" + name + "\" is not a device twins runs on (auto, cpu, cuda, cuda:N)");
  const int64_t count = torch::cuda::is_available() ? static_cast<int64_t>(torch::cuda::device_count()) : 0;
  if (count == 0)
    throw std::runtime_error(what + ": " + name + " requested but CUDA is not available (LibTorch " +
                             compat::torch_version_string() + "); use cpu");
  if (!d.has_index()) return c10::Device(c10::kCUDA, 0);
  if (d.index() >= count)
    throw std::runtime_error(what + ": " + name + " requested but this machine has " + std::to_string(count) +
                             " CUDA device(s)");
  return d;
}

namespace {

// OpenBLAS's own thread-count functions when this process has OpenBLAS loaded (Debian's LibTorch
// does its matrix products there), else null. Looked up at run time: twins does not link OpenBLAS.
template <typename Fn>
Fn openblas_function(const char* name) {
#if defined(__GLIBC__)
  return reinterpret_cast<Fn>(dlsym(RTLD_DEFAULT, name));
#else
  (void)name;
  return nullptr;
#endif
}

// One OpenBLAS thread, unless the user set OpenBLAS's own variables. LibTorch's threads do the
// parallel work; OpenBLAS's pthread pool is separate from them (at::set_num_threads does not reach
// it), and after each matrix product its threads busy-wait on the cores LibTorch's next kernel
// needs: the quickstart's training step ran at 329-349 images/s with two and 448-500 with one.
void set_blas_threads() {
  if (std::getenv("OPENBLAS_NUM_THREADS") || std::getenv("GOTO_NUM_THREADS")) return;
  if (auto set = openblas_function<void (*)(int)>("openblas_set_num_threads")) set(1);
}

}  // namespace

int set_compute_threads(int n) {
  set_blas_threads();
  if (n <= 0) {
    if (std::getenv("OMP_NUM_THREADS") || std::getenv("MKL_NUM_THREADS")) return at::get_num_threads();
    n = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  }
  at::set_num_threads(n);
  return at::get_num_threads();
}

int blas_threads() {
  if (auto get = openblas_function<int (*)()>("openblas_get_num_threads")) return get();
  return 0;
}

bool cpu_has_native_bf16() {
  std::ifstream in("/proc/cpuinfo");
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("flags", 0) != 0 && line.rfind("Features", 0) != 0) continue;
    std::istringstream words(line.substr(line.find(':') == std::string::npos ? 0 : line.find(':') + 1));
    for (std::string w; words >> w;)
      if (w == "avx512_bf16" || w == "amx_bf16" || w == "bf16") return true;
    return false;  // every core lists the same flags
  }
  return false;
}

void configure_compute(int threads, bool deterministic, const c10::Device& device) {
  set_compute_threads(threads);
  compat::set_deterministic(deterministic);
  // The autotuner picks by timing, so two runs may pick different kernels: off when deterministic.
  at::globalContext().setBenchmarkCuDNN(device.is_cuda() && !deterministic);
}

int64_t peak_device_memory_bytes(const c10::Device& device) {
#ifdef TWINS_WITH_CUDA
  if (device.is_cuda())
    return c10::cuda::CUDACachingAllocator::getDeviceStats(device.index()).allocated_bytes[0].peak;  // 0: all pools
#endif
  (void)device;
  return 0;
}

void reset_peak_device_memory(const c10::Device& device) {
#ifdef TWINS_WITH_CUDA
  if (device.is_cuda()) c10::cuda::CUDACachingAllocator::resetPeakStats(device.index());
#endif
  (void)device;
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

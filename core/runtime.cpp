#include "twins/runtime.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/cuda.h>

#include <algorithm>
#include <array>
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
#include <vector>
#if defined(__linux__)
#include <sched.h>
#endif
#include <unistd.h>

#include "core/cgroup.h"
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

c10::Device resolve_rank_device(const std::string& name, int local_rank, const std::string& what) {
  const c10::Device device = resolve_device(name, what);
  if (!device.is_cuda()) return device;
  const auto count = static_cast<int>(torch::cuda::device_count());
  if (name != "auto" && name != "cuda") {
    if (local_rank > 0 && count > 1)
      throw std::invalid_argument(
          what + ": \"" + name + "\" would put every rank of this node on one GPU (this is local rank " +
          std::to_string(local_rank) + "); use \"cuda\" or \"auto\": each rank takes the GPU of its local rank");
    return device;
  }
  if (count == 1) return c10::Device(c10::kCUDA, 0);
  if (local_rank >= count)
    throw std::runtime_error(what + ": this is local rank " + std::to_string(local_rank) + ", but the process sees " +
                             std::to_string(count) +
                             " CUDA devices: start at most one rank per GPU on each node (or give each rank its "
                             "own GPU through CUDA_VISIBLE_DEVICES)");
  return c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(local_rank));
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

namespace {

// The machine's CPUs as this process's container sees them: its cgroup's cpuset (docker
// --cpuset-cpus, Kubernetes, a SLURM job's), else the online CPUs.
int machine_cores() {
  const long online = ::sysconf(_SC_NPROCESSORS_ONLN);
  const int cores =
      online > 0 ? static_cast<int>(online) : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const int cpuset = cgroup::this_process_cpu_limits().cpuset_cores;
  return cpuset > 0 ? std::min(cores, cpuset) : cores;
}

// The CPUs this process may run on. The calling thread's affinity, unless OpenMP's binding
// variables are set: OpenMP then binds the main thread to one place of its own at start-up.
int affinity_cores() {
  const char* bind = std::getenv("OMP_PROC_BIND");
  const bool omp_bound = (bind && *bind && std::string(bind) != "false" && std::string(bind) != "FALSE") ||
                         std::getenv("OMP_PLACES") || std::getenv("GOMP_CPU_AFFINITY") || std::getenv("KMP_AFFINITY");
  if (omp_bound) return machine_cores();
#if defined(__linux__)
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) > 0) return CPU_COUNT(&set);
#endif
  return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

int positive_env(const char* name) {
  const char* v = std::getenv(name);
  if (!v || !*v) return 0;
  char* end = nullptr;
  const long n = std::strtol(v, &end, 10);
  return end != v && n > 0 && n < 1000000 ? static_cast<int>(n) : 0;  // SLURM's "4(x2)" reads 4
}

}  // namespace

int usable_cores() {
  int cores = affinity_cores();
  if (const int quota = cgroup::this_process_cpu_limits().quota_cores; quota > 0) cores = std::min(cores, quota);
  return std::max(1, cores);
}

int ranks_sharing_cores() {
  int ranks = positive_env("LOCAL_WORLD_SIZE");
  if (ranks == 0) ranks = positive_env("OMPI_COMM_WORLD_LOCAL_SIZE");
  if (ranks == 0 && positive_env("SLURM_STEP_NUM_TASKS") > 1) ranks = positive_env("SLURM_STEP_TASKS_PER_NODE");
  if (ranks <= 1) return 1;
  // Bound to cores of its own: the affinity is a share of the machine (as the container sees it),
  // not all of it.
  const int machine = machine_cores(), mine = affinity_cores();
  if (mine < machine && int64_t{mine} * ranks <= machine) return 1;
  return ranks;
}

int auto_loader_workers(int cores, bool cuda) {
  cores = std::max(1, cores);
  return cuda ? std::min(kMaxAutoWorkers, std::max(1, cores - 1)) : std::min(2, cores);
}

int loader_workers(int workers, const c10::Device& device) {
  if (workers != kAutoWorkers) return workers;
  return auto_loader_workers(std::max(1, usable_cores() / ranks_sharing_cores()), device.is_cuda());
}

int set_compute_threads(int n) {
  set_blas_threads();
  if (n <= 0) {
    if (std::getenv("OMP_NUM_THREADS") || std::getenv("MKL_NUM_THREADS")) return at::get_num_threads();
    n = usable_cores();
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

CpuConvolutionErrors measure_cpu_convolutions() {
  const compat::NoAutocast no_autocast;
  const at::AutoGradMode grad_mode(true);  // the gradient is measured, whatever the caller's mode
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  // Smooth, sign-changing values without the random generator (a draw would change a run's).
  auto wave = [&](at::IntArrayRef shape, double step) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return at::arange(n, f32).mul(step).sin().reshape(shape);
  };
  auto rel = [](const at::Tensor& a, const at::Tensor& exact) {
    return (a.to(at::kDouble) - exact).norm().item<double>() / std::max(exact.norm().item<double>(), 1e-300);
  };
  CpuConvolutionErrors e;
  // Shapes of a small ResNet's convolutions (3x3, padding 1), where the broken builds go wrong.
  for (const auto& [n, c, size, out] : std::vector<std::array<int64_t, 4>>{{16, 4, 12, 8}, {4, 16, 10, 16}}) {
    const at::Tensor x = wave({n, c, size, size}, 0.37), w = wave({out, c, 3, 3}, 0.91).mul(0.2),
                     upstream = wave({n, out, size, size}, 0.53);
    at::Tensor xf = x.clone().requires_grad_(true), xd = x.to(at::kDouble).requires_grad_(true);
    at::conv2d(xf, w, {}, 1, 1).mul(upstream).sum().backward();
    const at::Tensor exact = at::conv2d(xd, w.to(at::kDouble), {}, 1, 1);
    exact.mul(upstream.to(at::kDouble)).sum().backward();
    e.fp32_input_gradient = std::max(e.fp32_input_gradient, rel(xf.grad(), xd.grad()));
    at::NoGradGuard no_grad;
    const at::Tensor bf16 = at::conv2d(x.to(at::kBFloat16), w.to(at::kBFloat16), {}, 1, 1);
    e.bf16_output = std::max(e.bf16_output, rel(bf16, exact.detach()));
  }
  return e;
}

const std::string& ensure_correct_cpu_convolutions() {
  static const std::string note = [] {
    const CpuConvolutionErrors with = measure_cpu_convolutions();
    if (!with.wrong()) return std::string();
    std::ostringstream s;
    s << "this LibTorch's CPU convolutions are wrong against fp64 (fp32 input gradients off by "
      << with.fp32_input_gradient << ", bf16 outputs by " << with.bf16_output << ")";
    if (!at::globalContext().userEnabledMkldnn()) throw std::runtime_error(s.str() + "; use another LibTorch");
    at::globalContext().setUserEnabledMkldnn(false);
    const CpuConvolutionErrors without = measure_cpu_convolutions();
    if (without.wrong())
      throw std::runtime_error(s.str() + ", with and without oneDNN (" + std::to_string(without.fp32_input_gradient) +
                               ", " + std::to_string(without.bf16_output) + "); use another LibTorch");
    s << " with oneDNN (mkldnn): twins turned oneDNN off for this process (LibTorch's own kernels are right, "
         "and slower); a LibTorch with a working oneDNN trains faster";
    return s.str();
  }();
  return note;
}

void check_float32_matmul_precision(const std::string& name, const std::string& key) {
  if (name != "highest" && name != "high" && name != "medium")
    throw std::invalid_argument(key + ": must be highest, high or medium, got \"" + name + "\"");
}

void configure_compute(int threads, bool deterministic, const c10::Device& device,
                       const std::string& float32_matmul_precision) {
  check_float32_matmul_precision(float32_matmul_precision, "float32_matmul_precision");  // before any change
  set_compute_threads(threads);
  compat::set_deterministic(deterministic);
  // The autotuner picks by timing, so two runs may pick different kernels: off when deterministic.
  at::globalContext().setBenchmarkCuDNN(device.is_cuda() && !deterministic);
  // Set only when it changes (LibTorch 2.9 and later warn that this setter is the older API).
  const auto wanted = float32_matmul_precision == "high"     ? at::Float32MatmulPrecision::HIGH
                      : float32_matmul_precision == "medium" ? at::Float32MatmulPrecision::MEDIUM
                                                             : at::Float32MatmulPrecision::HIGHEST;
  if (at::globalContext().float32MatmulPrecision() != wanted)
    at::globalContext().setFloat32MatmulPrecision(float32_matmul_precision);
}

int64_t peak_device_memory_bytes(const c10::Device& device) {
#ifdef TWINS_WITH_CUDA
  if (device.is_cuda())
    return c10::cuda::CUDACachingAllocator::getDeviceStats(device.index()).allocated_bytes[0].peak;  // 0: all pools
#endif
  (void)device;
  return 0;
}

void synchronize_device(const c10::Device& device) {
  if (device.is_cuda()) torch::cuda::synchronize(device.has_index() ? device.index() : -1);
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
  // And no trimming at all (-1, mallopt(3)): any finite threshold (an int, so under 2 GB) is
  // crossed by a step whose memory swings more than that, which then faults its pages in again
  // (the ViT-S/16 step with an 8192-wide projector: 10.1 s with 1 GB, 8.6 s without trimming).
  return mallopt(M_MMAP_MAX, 0) == 1 && mallopt(M_TRIM_THRESHOLD, -1) == 1;
#else
  return false;
#endif
}

}  // namespace twins

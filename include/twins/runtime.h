#pragma once
// Process-wide settings of the compute runtime, and the one way a device name becomes a device.
#include <c10/core/Device.h>

#include <cstdint>
#include <string>

namespace twins {

/// The device named `name`: "auto" (CUDA device 0 when CUDA is available, else the CPU), "cpu",
/// "cuda" (= "cuda:0") or "cuda:N". `what` names the setting in messages ("train.device").
/// Throws std::invalid_argument for a name that is not a device, std::runtime_error for a CUDA
/// device this process cannot use (no CUDA in this LibTorch or machine, or N too large).
c10::Device resolve_device(const std::string& name, const std::string& what = "device");

/// The device of the rank whose index on its node is `local_rank`: "auto" and "cuda" take GPU
/// `local_rank`, or GPU 0 when the process sees a single one (each rank given its own, as SLURM's
/// --gpus-per-task 1 or a CUDA_VISIBLE_DEVICES per rank do); more local ranks than visible GPUs is
/// an error naming both. "cuda:N" is kept, except on a rank other than its node's first when the
/// process sees several GPUs: every rank of the node would share GPU N (NCCL refuses), an error.
c10::Device resolve_rank_device(const std::string& name, int local_rank, const std::string& what = "device");

/// The cores this process may run on: its CPU affinity (taskset, a launcher's binding, a
/// container's cpuset; the container's cpuset or the machine's CPUs where OpenMP's binding
/// variables, OMP_PROC_BIND, OMP_PLACES, GOMP_CPU_AFFINITY or KMP_AFFINITY, bind the main thread to
/// a place of its own), within its cgroup's CPU quota (a container's --cpus, rounded up); >= 1.
int usable_cores();
/// The ranks of a job on this machine that share usable_cores() with this process: the launcher's
/// local world size (LOCAL_WORLD_SIZE: twins' --nproc-per-node, torchrun; OpenMPI's; an srun
/// step's tasks on this node), or 1 where each rank was bound to cores of its own (its affinity
/// holds at most a local world size's share of the cpuset the container sees).
int ranks_sharing_cores();

/// `"workers": "auto"` in a config (`--workers auto` on the command line); see loader_workers().
inline constexpr int kAutoWorkers = -1;
/// The most loader threads "auto" gives: each holds two batches ahead (in pinned memory on CUDA).
inline constexpr int kMaxAutoWorkers = 32;
/// The loader threads for a `workers` setting: n >= 0 as given; kAutoWorkers: auto_loader_workers
/// of usable_cores() shared among ranks_sharing_cores().
int loader_workers(int workers, const c10::Device& device);
/// "auto" for `cores` cores of a rank's own: for a CUDA device every core but the one of the thread
/// that feeds the GPU (a GPU takes views faster than a few cores make them), at most
/// kMaxAutoWorkers; on the CPU 2 (at most `cores`), as the model's threads need the cores and a CPU
/// step is far slower than its views.
int auto_loader_workers(int cores, bool cuda);

/// Sets LibTorch's intra-op threads: n > 0 as given; 0 = usable_cores(), unless
/// OMP_NUM_THREADS or MKL_NUM_THREADS is set, which then rules. (Some LibTorch builds, Debian's
/// among them, otherwise start with one thread.) Also gives OpenBLAS, when the process has it
/// (Debian's LibTorch multiplies matrices there), one thread of its own unless OPENBLAS_NUM_THREADS
/// or GOTO_NUM_THREADS is set: its thread pool is not LibTorch's, and two pools on the same cores
/// slow training (1.4x on the quickstart's step). Returns LibTorch's thread count in effect.
int set_compute_threads(int n);
/// OpenBLAS's own thread count when this process has OpenBLAS loaded, else 0.
int blas_threads();

/// Whether this CPU multiplies bf16 natively (x86 AVX512-BF16 or AMX-BF16, Arm BF16), read from
/// /proc/cpuinfo; false where that cannot be read. Without it bf16 autocast on the CPU is emulated
/// and may be slower than fp32.
bool cpu_has_native_bf16();
/// How far this LibTorch's CPU convolutions are from an fp64 reference, with its settings as they
/// are, on small fixed cases (relative errors in norm; about 1e-7 and 0.005 where they are right):
/// the fp32 gradient with respect to the input, and the bf16 output. Draws no random numbers.
struct CpuConvolutionErrors {
  double fp32_input_gradient = 0;
  double bf16_output = 0;
  bool wrong() const { return fp32_input_gradient > 1e-4 || bf16_output > 0.05; }
};
CpuConvolutionErrors measure_cpu_convolutions();
/// Makes sure the CPU convolutions a training run uses compute what they should. Some LibTorch
/// builds do not: Debian 13's 2.6, built on the system's oneDNN 3.7, returns input gradients off
/// by 40-200% and bf16 outputs off by 30-75% on an AMD EPYC with AVX512-BF16, so training there
/// would silently learn from noise.
/// When measure_cpu_convolutions() finds them wrong, oneDNN (mkldnn) is turned off for the process
/// (LibTorch's own kernels: right, slower) and a warning is returned; empty when all is well.
/// Throws std::runtime_error when they are still wrong without oneDNN. Checked once per process;
/// the Trainer calls it for CPU runs.
const std::string& ensure_correct_cpu_convolutions();

/// The compute settings of a training run, applied alike by `twins pretrain` and `twins bench
/// step` so that the benchmark times the step a run takes: LibTorch's threads (as
/// set_compute_threads), deterministic algorithms on or off as asked, and cuDNN's autotuner on
/// CUDA unless deterministic (the shapes of a run are fixed, so each convolution is tuned once),
/// and the float32 matmul precision ("highest", "high" or "medium", as
/// torch.set_float32_matmul_precision). Process-wide: the last run configured rules.
void configure_compute(int threads, bool deterministic, const c10::Device& device,
                       const std::string& float32_matmul_precision = "highest");
/// Throws std::invalid_argument naming `key` unless `name` is highest, high or medium.
void check_float32_matmul_precision(const std::string& name, const std::string& key);
/// The most bytes of tensors the CUDA caching allocator held on `device` since the last
/// reset_peak_device_memory() (torch.cuda.max_memory_allocated); 0 for the CPU, and in a build
/// without CUDA.
int64_t peak_device_memory_bytes(const c10::Device& device);
void reset_peak_device_memory(const c10::Device& device);
/// Waits until the work queued on `device` is done (torch.cuda.synchronize); nothing on the CPU.
void synchronize_device(const c10::Device& device);
/// Keeps freed tensor memory in the process for reuse (glibc: no mmap for large blocks, no trim),
/// instead of returning it to the system and page-faulting it back on every allocation: on the CPU
/// this makes a ResNet-18 training step ~1.6x faster. Process-wide, so programs opt in (the twins
/// command does); TWINS_MALLOC=system leaves the allocator as it is. Returns whether it applied.
bool tune_allocator();

}  // namespace twins

// The process-wide compute settings: LibTorch's threads, OpenBLAS's own pool, device names.
#include "twins/runtime.h"
#include "twins/version.h"

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <torch/cuda.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <regex>
#include <string>
#include <utility>
#include <vector>

#include <sched.h>
#include <unistd.h>

#include "core/cgroup.h"
#include "tests/test_util.h"

using twins::test::check_throws_with;

TEST_CASE("runtime: set_compute_threads sets LibTorch's threads and leaves OpenBLAS one of its own") {
  const int before = at::get_num_threads();
  CHECK(twins::set_compute_threads(2) == 2);
  CHECK(at::get_num_threads() == 2);
  // 0 where the process has no OpenBLAS (another BLAS, or MKL); the user's variable rules.
  const int blas = twins::blas_threads();
  if (std::getenv("OPENBLAS_NUM_THREADS") == nullptr && std::getenv("GOTO_NUM_THREADS") == nullptr)
    CHECK((blas == 0 || blas == 1));
  MESSAGE("OpenBLAS threads: " << blas);
  CHECK(twins::set_compute_threads(1) == 1);
  at::set_num_threads(before);
}

namespace {
// Restores this thread's CPU affinity and LOCAL_WORLD_SIZE however the test case ends.
struct AffinityAndRanksKept {
  cpu_set_t affinity;
  bool had_ranks = false;
  std::string ranks;
  AffinityAndRanksKept() {
    CPU_ZERO(&affinity);
    REQUIRE(sched_getaffinity(0, sizeof affinity, &affinity) == 0);
    if (const char* v = std::getenv("LOCAL_WORLD_SIZE")) had_ranks = true, ranks = v;
  }
  ~AffinityAndRanksKept() {
    sched_setaffinity(0, sizeof affinity, &affinity);
    if (had_ranks)
      ::setenv("LOCAL_WORLD_SIZE", ranks.c_str(), 1);
    else
      ::unsetenv("LOCAL_WORLD_SIZE");
  }
};
}  // namespace

TEST_CASE("runtime: auto loader workers from the cores a rank may use") {
  using twins::auto_loader_workers;
  CHECK(auto_loader_workers(16, true) == 15);  // a GPU: every core but the feeding thread's
  CHECK(auto_loader_workers(2, true) == 1);
  CHECK(auto_loader_workers(1, true) == 1);
  CHECK(auto_loader_workers(0, true) == 1);
  CHECK(auto_loader_workers(33, true) == 32);
  CHECK(auto_loader_workers(1000, true) == twins::kMaxAutoWorkers);
  CHECK(auto_loader_workers(16, false) == 2);  // the CPU: the model's threads need the cores
  CHECK(auto_loader_workers(1, false) == 1);
  const c10::Device cpu("cpu"), cuda(c10::kCUDA, 0);  // (a device name: no GPU needed)
  CHECK(twins::loader_workers(5, cuda) == 5);
  CHECK(twins::loader_workers(0, cpu) == 0);
  const int cores = twins::usable_cores();
  CHECK(cores >= 1);
  MESSAGE("usable cores " << cores << ", ranks sharing them " << twins::ranks_sharing_cores());
  for (const char* v : {"OMP_PROC_BIND", "OMP_PLACES", "GOMP_CPU_AFFINITY", "KMP_AFFINITY"})
    if (std::getenv(v)) {
      MESSAGE("skipping the binding cases: " << v << " is set (OpenMP's places rule)");
      return;
    }

  // Bound to one core (taskset -c 0), a process uses one; and it shares that core with no other
  // rank. The binding is this thread's, restored with LOCAL_WORLD_SIZE at the end.
  const AffinityAndRanksKept kept;
  const int allowed = CPU_COUNT(&kept.affinity);
  ::setenv("LOCAL_WORLD_SIZE", "2", 1);
  if (allowed == static_cast<int>(sysconf(_SC_NPROCESSORS_ONLN)) && allowed >= 2) {  // not bound already
    // Two ranks of a launcher that binds nothing share the cores.
    CHECK(twins::ranks_sharing_cores() == 2);
    CHECK(twins::loader_workers(twins::kAutoWorkers, cuda) == auto_loader_workers(cores / 2, true));
  }
  cpu_set_t one;
  CPU_ZERO(&one);
  for (int i = 0; i < CPU_SETSIZE; ++i)
    if (CPU_ISSET(i, &kept.affinity)) {
      CPU_SET(i, &one);
      break;
    }
  REQUIRE(sched_setaffinity(0, sizeof one, &one) == 0);
  CHECK(twins::usable_cores() == 1);
  if (allowed >= 2) CHECK(twins::ranks_sharing_cores() == 1);  // bound to a core of its own
  CHECK(twins::loader_workers(twins::kAutoWorkers, cuda) == 1);
  CHECK(twins::loader_workers(twins::kAutoWorkers, cpu) == 1);
  ::setenv("LOCAL_WORLD_SIZE", "1", 1);
  CHECK(twins::ranks_sharing_cores() == 1);
  REQUIRE(sched_setaffinity(0, sizeof kept.affinity, &kept.affinity) == 0);
  CHECK(twins::usable_cores() == cores);
}

TEST_CASE("runtime: CPU limits from cgroup v2 and v1 files, as containers and job schedulers set them") {
  namespace fs = std::filesystem;
  using twins::cgroup::read_cpu_limits;
  const fs::path root = fs::temp_directory_path() / ("twins-cgroup-test-" + std::to_string(::getpid()));
  const std::string r = root.string();
  auto put = [&root](const std::string& file, const std::string& text) {
    fs::create_directories((root / file).parent_path());
    std::ofstream(root / file) << text << "\n";
  };
  // The limits read for a process whose /proc/self/cgroup says `membership`: quota, cpuset.
  auto expect = [&r](const std::string& membership, int quota, int cpuset) {
    CAPTURE(membership);
    const auto limits = read_cpu_limits(membership, r);
    CHECK(limits.quota_cores == quota);
    CHECK(limits.cpuset_cores == cpuset);
  };
  fs::remove_all(root);
  // v2 in a container that sees its own group as the root (docker --cpus 1.5 --cpuset-cpus 0-3,8).
  put("cpu.max", "150000 100000");
  put("cpuset.cpus.effective", "0-3,8");
  expect("0::/\n", 2, 5);
  // v2 nested groups (a systemd slice, a Kubernetes pod): the tightest quota of the group and its
  // parents; the group's own cpuset.
  put("a/b/cpu.max", "max 100000");
  put("a/cpu.max", "50000 100000");
  put("a/b/cpuset.cpus.effective", "6-7");
  expect("0::/a/b\n", 1, 2);
  // A group without limits of its own: its parents'.
  put("a/cpuset.cpus.effective", "4-5");
  expect("0::/a/c\n", 1, 2);
  // A group the mount does not hold (a container named as the host names it): the root's.
  expect("0::/system.slice/docker-1.scope\n", 2, 5);

  // v1 with v2's empty hierarchy beside it (a hybrid host): a SLURM job's groups, cpu co-mounted
  // with cpuacct; the limits are the job's, not the host's.
  fs::remove_all(root);
  put("cpu,cpuacct/cpu.cfs_quota_us", "-1");
  put("cpu,cpuacct/cpu.cfs_period_us", "100000");
  put("cpu,cpuacct/slurm/job_7/cpu.cfs_quota_us", "300000");
  put("cpu,cpuacct/slurm/job_7/cpu.cfs_period_us", "100000");
  put("cpuset/cpuset.cpus", "0-15");
  put("cpuset/slurm/job_7/cpuset.cpus", "2-5");
  const std::string job = "12:cpuset:/slurm/job_7\n4:cpu,cpuacct:/slurm/job_7\n1:name=systemd:/\n0::/\n";
  expect(job, 3, 4);
  // v1 in a container on such a host (its groups named as the host names them, the mounts its own).
  put("cpu,cpuacct/cpu.cfs_quota_us", "250000");
  expect("12:cpuset:/docker/abc\n4:cpu,cpuacct:/docker/abc\n", 3, 16);
  // The controller's own name where the hierarchy is mounted so.
  fs::rename(root / "cpu,cpuacct", root / "cpu");
  expect("4:cpu,cpuacct:/slurm/job_7\n", 3, 0);

  // Nothing that reads as a limit, and no groups at all.
  fs::remove_all(root);
  put("cpu.max", "nonsense");
  put("cpuset.cpus.effective", "all of them");
  expect("0::/\n", 0, 0);
  expect("", 0, 0);
  fs::remove_all(root);
  // (no structured bindings: clang 14 cannot capture them in the lambdas CHECK_MESSAGE makes)
  for (const auto& list : std::vector<std::pair<std::string, int>>{
           {"0-3,8-11", 8}, {"5", 1}, {"0-3\n", 4}, {"", 0}, {"abc", 0}, {"3-1", 0}, {"0-", 0}, {"1x", 0}})
    CHECK_MESSAGE(twins::cgroup::cpu_list_count(list.first) == list.second, list.first);
  const auto mine = twins::cgroup::this_process_cpu_limits();
  MESSAGE("this process: quota " << mine.quota_cores << " cores, cpuset " << mine.cpuset_cores);
}

TEST_CASE("runtime: configure_compute sets the float32 matmul precision as torch.set_float32_matmul_precision") {
  const int threads = at::get_num_threads();
  auto& context = at::globalContext();
  twins::configure_compute(threads, false, c10::Device("cpu"), "high");
  CHECK(context.float32MatmulPrecision() == at::Float32MatmulPrecision::HIGH);
  twins::configure_compute(threads, false, c10::Device("cpu"), "medium");
  CHECK(context.float32MatmulPrecision() == at::Float32MatmulPrecision::MEDIUM);
  check_throws_with<std::invalid_argument>(
      [&] { twins::configure_compute(threads + 1, true, c10::Device("cpu"), "tf32"); },
      "float32_matmul_precision: must be highest, high or medium, got \"tf32\"");
  CHECK(at::get_num_threads() == threads);  // refused before anything changed
  CHECK_FALSE(context.deterministicAlgorithms());
  CHECK(context.float32MatmulPrecision() == at::Float32MatmulPrecision::MEDIUM);
  twins::configure_compute(threads, false, c10::Device("cpu"));
  CHECK(context.float32MatmulPrecision() == at::Float32MatmulPrecision::HIGHEST);
  at::set_num_threads(threads);
}

TEST_CASE("runtime: device names") {
  CHECK(twins::resolve_device("cpu").is_cpu());
  CHECK(twins::resolve_device("auto").type() == (twins::cuda_available() ? c10::kCUDA : c10::kCPU));
  check_throws_with<std::invalid_argument>([] { twins::resolve_device("tpu", "train.device"); },
                                           "train.device: \"tpu\" is not a device");
  // A rank's device: the CPU stays the CPU; with CUDA, "auto" takes the local rank's GPU, or the
  // only one the process sees.
  CHECK(twins::resolve_rank_device("cpu", 3).is_cpu());
  if (!twins::cuda_available()) {
    CHECK(twins::resolve_rank_device("auto", 3).is_cpu());
    return;
  }
  const auto gpus = static_cast<int>(torch::cuda::device_count());
  CHECK(twins::resolve_rank_device("auto", 0) == c10::Device(c10::kCUDA, 0));
  if (gpus == 1) {  // one GPU per rank (SLURM's --gpus-per-task 1): every local rank takes it
    CHECK(twins::resolve_rank_device("cuda", 5) == c10::Device(c10::kCUDA, 0));
    CHECK(twins::resolve_rank_device("cuda:0", 5) == c10::Device(c10::kCUDA, 0));
  } else {
    CHECK(twins::resolve_rank_device("cuda", 1) == c10::Device(c10::kCUDA, 1));
    check_throws_with<std::runtime_error>([&] { twins::resolve_rank_device("auto", gpus); }, "but the process sees");
    check_throws_with<std::invalid_argument>([] { twins::resolve_rank_device("cuda:0", 1); },
                                             "would put every rank of this node on one GPU");
  }
}

TEST_CASE("runtime: native bf16 is what /proc/cpuinfo's flags say") {
  // An independent reading: the whole file as one string, the flag as a whole word.
  std::ifstream in("/proc/cpuinfo");
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const bool expected = std::regex_search(text, std::regex(R"((^|\s)(avx512_bf16|amx_bf16|bf16)(\s|$))"));
  MESSAGE("native bf16: ", expected);
  CHECK(twins::cpu_has_native_bf16() == expected);
}

TEST_CASE("runtime: the CPU convolution check measures against fp64, draws no random numbers, and leaves them right") {
  at::manual_seed(11);
  const at::Tensor before = at::rand({4});
  at::manual_seed(11);
  // (tests/main.cpp made the check already: measure as LibTorch was found, oneDNN on.)
  const std::string note = twins::ensure_correct_cpu_convolutions();
  const bool turned_off = !note.empty();
  if (turned_off) at::globalContext().setUserEnabledMkldnn(true);
  const twins::CpuConvolutionErrors measured = twins::measure_cpu_convolutions();
  if (turned_off) at::globalContext().setUserEnabledMkldnn(false);
  CHECK(at::equal(at::rand({4}), before));
  MESSAGE("this LibTorch's CPU convolutions against fp64: fp32 input gradient "
          << measured.fp32_input_gradient << ", bf16 output " << measured.bf16_output);
  CHECK(std::isfinite(measured.fp32_input_gradient));
  CHECK(measured.bf16_output > 1e-4);  // bf16 rounds: never exact on these cases
  // Right as found (no note), or oneDNN turned off and right since (the note says so).
  CHECK(turned_off == measured.wrong());
  if (turned_off) MESSAGE(note);
  const twins::CpuConvolutionErrors now = twins::measure_cpu_convolutions();
  CHECK_FALSE(now.wrong());
  CHECK(now.fp32_input_gradient < 1e-5);
  CHECK(now.bf16_output < 0.02);
}

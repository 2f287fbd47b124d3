// The process-wide compute settings: LibTorch's threads, OpenBLAS's own pool, device names.
#include "twins/runtime.h"
#include "twins/version.h"

#include <ATen/Parallel.h>

#include <cstdlib>
#include <fstream>
#include <iterator>
#include <regex>
#include <string>

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

TEST_CASE("runtime: device names") {
  CHECK(twins::resolve_device("cpu").is_cpu());
  CHECK(twins::resolve_device("auto").type() == (twins::cuda_available() ? c10::kCUDA : c10::kCPU));
  check_throws_with<std::invalid_argument>([] { twins::resolve_device("tpu", "train.device"); },
                                           "train.device: \"tpu\" is not a device");
}

TEST_CASE("runtime: native bf16 is what /proc/cpuinfo's flags say") {
  // An independent reading: the whole file as one string, the flag as a whole word.
  std::ifstream in("/proc/cpuinfo");
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const bool expected = std::regex_search(text, std::regex(R"((^|\s)(avx512_bf16|amx_bf16|bf16)(\s|$))"));
  MESSAGE("native bf16: ", expected);
  CHECK(twins::cpu_has_native_bf16() == expected);
}

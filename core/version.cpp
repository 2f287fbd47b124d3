#include "twins/version.h"

#include <ATen/detail/CUDAHooksInterface.h>
#include <torch/cuda.h>

#include "core/compat.h"

// A CUDA build (CMake found LibTorch's CUDA libraries) can ask the CUDA runtime and NCCL too.
#ifdef TWINS_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <torch/csrc/cuda/nccl.h>
#endif

namespace twins {

std::string torch_version() { return compat::torch_version_string(); }

bool cuda_available() { return torch::cuda::is_available(); }

std::string cuda_summary() {
  if (!cuda_available()) return "";
  const auto& hooks = at::detail::getCUDAHooks();
  const long rt = hooks.versionCUDART();  // 13000 for 13.0
  std::string s = "runtime " + std::to_string(rt / 1000) + "." + std::to_string(rt % 1000 / 10);
  if (hooks.hasCuDNN()) {
    const long v = hooks.versionCuDNN();  // 90102 for 9.1.2 (cuDNN >= 9), 8902 for 8.9.2
    s += v >= 90000 ? ", cuDNN " + std::to_string(v / 10000) + "." + std::to_string(v / 100 % 100) + "." +
                          std::to_string(v % 100)
                    : ", cuDNN " + std::to_string(v / 1000) + "." + std::to_string(v / 100 % 10) + "." +
                          std::to_string(v % 100);
  }
  const int64_t gpus = static_cast<int64_t>(torch::cuda::device_count());
#ifdef TWINS_WITH_CUDA
  // major << 32 | minor << 16 | patch (torch/csrc/cuda/nccl.cpp, as torch.cuda.nccl.version()
  // decodes it); 0 in a LibTorch built without NCCL.
  const std::uint64_t nccl = torch::cuda::nccl::version();
  s += nccl == 0 ? ", no NCCL"
                 : ", NCCL " + std::to_string(nccl >> 32) + "." + std::to_string((nccl >> 16) & 0xFFFF) + "." +
                       std::to_string(nccl & 0xFFFF);
  s += "; " + std::to_string(gpus) + " GPU" + (gpus == 1 ? "" : "s") + ":";
  for (int64_t i = 0; i < gpus; ++i) s += std::string(i ? "," : "") + " " + at::cuda::getDeviceProperties(i)->name;
#else
  s += "; " + std::to_string(gpus) + " GPU" + (gpus == 1 ? "" : "s");
#endif
  return s;
}

}  // namespace twins

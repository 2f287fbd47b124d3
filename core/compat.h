#pragma once
// The one place where differences between LibTorch 1.13 (Debian, CPU; what CI builds) and
// LibTorch 2.x (the CUDA machines) are resolved. Code elsewhere calls these and never tests
// TORCH_VERSION_* itself.
#include <torch/version.h>

#include <string>

#define TWINS_TORCH_AT_LEAST(major, minor) \
  (TORCH_VERSION_MAJOR > (major) ||        \
   (TORCH_VERSION_MAJOR == (major) && TORCH_VERSION_MINOR >= (minor)))

namespace twins::compat {

/// "major.minor.patch" of the LibTorch headers twins was compiled with.
inline std::string torch_version_string() {
  return std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
         std::to_string(TORCH_VERSION_PATCH);
}

}  // namespace twins::compat

#include "twins/version.h"

#include <torch/cuda.h>

#include "core/compat.h"

namespace twins {

std::string torch_version() { return compat::torch_version_string(); }

bool cuda_available() { return torch::cuda::is_available(); }

}  // namespace twins

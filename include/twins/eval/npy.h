#pragma once
// NumPy's .npy format (version 1.0), as numpy.load reads it.
#include <ATen/core/Tensor.h>

#include <string>

namespace twins::eval {

/// Writes a float32, float64, int64, int32 or uint8 tensor of any shape, C order, atomically.
void write_npy(const std::string& path, const at::Tensor& tensor);

}  // namespace twins::eval

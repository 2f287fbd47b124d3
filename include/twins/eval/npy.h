#pragma once
// NumPy's .npy format (version 1.0), as numpy.load reads it.
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

namespace twins::eval {

/// Writes a float32, float64, int64, int32 or uint8 tensor of any shape, C order, atomically.
void write_npy(const std::string& path, const at::Tensor& tensor);

/// The bytes before the data of such a file holding `shape` of `dtype` (a multiple of 64 long),
/// for writing the data after it piece by piece.
std::string npy_header(at::ScalarType dtype, const std::vector<int64_t>& shape);

}  // namespace twins::eval

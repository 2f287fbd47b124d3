#pragma once
// Input checks shared by the loss files (private to losses/).
#include <ATen/core/Tensor.h>

#include <string>

namespace twins::losses::detail {

/// "[8, 16]" or "(undefined)".
std::string shape_of(const at::Tensor& t);

/// Two [N, D] floating-point tensors of the same shape with N >= min_batch and D >= 1; throws
/// std::invalid_argument naming the loss, the arguments and their shapes.
void check_pair(const char* loss, const char* name_a, const at::Tensor& a, const char* name_b, const at::Tensor& b,
                int64_t min_batch);

}  // namespace twins::losses::detail

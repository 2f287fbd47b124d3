#pragma once
// Image files <-> uint8 tensors [H, W, C] (C = 1 for grey files, 3 for colour, RGB order).
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

namespace twins::data {

/// Decodes an image file (JPEG, PNG, BMP, PNM, ... through OpenCV). Grey files give 1 channel,
/// colour files 3 (alpha dropped). Throws std::runtime_error naming the file if it cannot be
/// read or decoded.
at::Tensor read_image(const std::string& path);
/// Decodes an encoded image held in memory; `name` is used in messages.
at::Tensor decode_image(const std::vector<uint8_t>& bytes, const std::string& name);
/// Writes a uint8 [H, W, 1 or 3] image; the format follows the extension (.png, .jpg, ...).
void write_image(const std::string& path, const at::Tensor& image);

}  // namespace twins::data

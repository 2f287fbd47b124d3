#pragma once
// Image files <-> uint8 tensors [H, W, C] (C = 1 for grey files, 3 for colour, RGB order).
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace twins::data {

/// PIL's decompression-bomb threshold (Image.MAX_IMAGE_PIXELS): about 89.5 million pixels.
inline constexpr int64_t kDefaultMaxImagePixels = 89478485;

/// Whether a file extension ("jpg", ".JPG", "tiff", ...) is one of the image formats twins
/// decodes: JPEG, PNG, WebP, BMP, PPM/PGM/PNM, TIFF.
bool is_image_extension(std::string extension);

/// Width and height as an image file's header declares them, for the formats twins decodes
/// (JPEG, PNG, BMP, PPM/PGM/PBM, WebP, TIFF); {0, 0} when the bytes are none of them or the
/// header is cut short.
std::pair<int64_t, int64_t> image_header_size(const uint8_t* bytes, size_t size);

/// Decodes an image file (JPEG through libjpeg with PIL's settings; PNG, BMP, PNM, WebP, TIFF
/// through OpenCV). Grey files give 1 channel, colour files 3 (alpha dropped). The size is read
/// from the header first: more than `max_pixels` pixels is refused before any decoding (PIL
/// refuses such decompression bombs too). Throws std::runtime_error naming the file if it
/// cannot be read, is of another format, is too large, or is corrupt or truncated.
at::Tensor read_image(const std::string& path, int64_t max_pixels = kDefaultMaxImagePixels);
/// Decodes an encoded image held in memory; `name` is used in messages.
at::Tensor decode_image(const std::vector<uint8_t>& bytes, const std::string& name,
                        int64_t max_pixels = kDefaultMaxImagePixels);
/// Writes a uint8 [H, W, 1 or 3] image; the format follows the extension (.png, .jpg, ...).
void write_image(const std::string& path, const at::Tensor& image);

}  // namespace twins::data

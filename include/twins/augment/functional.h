#pragma once
// Image operations with explicit parameters, like torchvision.transforms.functional.
//
// Images are uint8 CPU tensors [H, W, C] (C = 1 or 3, RGB order), contiguous or not; results
// are new contiguous tensors of the same layout. The semantics are those of torchvision 0.14 on
// PIL images, which is what the official VICReg, Barlow Twins and BYOL recipes ran:
// - blends (brightness, contrast, saturation) truncate toward zero like PIL's ImagingBlend;
// - grey is PIL's convert("L"): (19595 R + 38470 G + 7471 B + 2^15) >> 16;
// - hue goes through PIL's 8-bit HSV (as torchvision's adjust_hue on PIL does);
// - resized_crop resamples like PIL's resize: antialiased when shrinking (the filter support
//   widens with the scale), bicubic a = -0.5, 22-bit fixed-point coefficients, horizontal pass
//   then vertical pass with rounding to uint8 in between.
// gaussian_blur follows torchvision's tensor kernel (float32, reflect padding, rounded result).
#include <ATen/core/Tensor.h>

#include <string>

namespace twins::augment {

/// Resampling filter of resizes: PIL's BILINEAR or BICUBIC (a = -0.5), antialiased.
enum class Interpolation { bilinear, bicubic };
/// "bilinear" or "bicubic"; anything else throws std::invalid_argument naming `path`.
Interpolation parse_interpolation(const std::string& name, const std::string& path);
const char* to_string(Interpolation interpolation);

}  // namespace twins::augment

namespace twins::augment::functional {

/// Blend with black: trunc(factor x), clipped to [0, 255]. factor >= 0.
at::Tensor adjust_brightness(const at::Tensor& img, double factor);
/// Blend with the rounded mean of the grey image. factor >= 0.
at::Tensor adjust_contrast(const at::Tensor& img, double factor);
/// Blend with the grey image (RGB only; grey images are returned unchanged). factor >= 0.
at::Tensor adjust_saturation(const at::Tensor& img, double factor);
/// Shift the hue by hue_factor turns in [-0.5, 0.5] (RGB only; grey images unchanged).
at::Tensor adjust_hue(const at::Tensor& img, double hue_factor);
/// Grey image with 1 or 3 (replicated) channels.
at::Tensor to_grayscale(const at::Tensor& img, int out_channels);
/// Inverts every value >= threshold (PIL's ImageOps.solarize).
at::Tensor solarize(const at::Tensor& img, int threshold);
/// Histogram equalisation of each channel (PIL's ImageOps.equalize, which solo-learn's
/// equalization and torchvision's equalize on PIL images run).
at::Tensor equalize(const at::Tensor& img);
/// Mirrors left-right.
at::Tensor hflip(const at::Tensor& img);
/// Mirrors top-bottom.
at::Tensor vflip(const at::Tensor& img);
/// Rotates counter-clockwise by `degrees` about the centre, keeping the size, nearest neighbour,
/// black where nothing maps (PIL's Image.rotate(degrees), which torchvision's rotate and
/// RandomRotation run on PIL images): a square's quarter turns and any half turn move pixels whole.
at::Tensor rotate(const at::Tensor& img, double degrees);
/// Gaussian blur with an odd kernel_size and sigma > 0.
at::Tensor gaussian_blur(const at::Tensor& img, int kernel_size, double sigma);
/// Crops rows [top, top+height) and columns [left, left+width) (inside the image) and resizes
/// the crop to out_h x out_w.
at::Tensor resized_crop(const at::Tensor& img, int top, int left, int height, int width, int out_h, int out_w,
                        Interpolation interpolation);
/// The same with the filter by name ("bilinear" or "bicubic").
at::Tensor resized_crop(const at::Tensor& img, int top, int left, int height, int width, int out_h, int out_w,
                        const std::string& interpolation);
/// Resizes the whole image (resized_crop of the full image).
at::Tensor resize(const at::Tensor& img, int out_h, int out_w, Interpolation interpolation);
at::Tensor resize(const at::Tensor& img, int out_h, int out_w, const std::string& interpolation);
/// Crops [top, top+height) x [left, left+width); parts outside the image are filled with 0,
/// as torchvision's center_crop pads.
at::Tensor crop(const at::Tensor& img, int top, int left, int height, int width);
/// Converts between 1 and 3 channels (grey replicated, or RGB to PIL's grey); a no-op if equal.
at::Tensor to_channels(const at::Tensor& img, int channels);

}  // namespace twins::augment::functional

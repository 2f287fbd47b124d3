#pragma once
// Views: lists of augmentation ops built by name from JSON, applied to uint8 HWC images.
//
// A view is a JSON list of ops, or {"ops": [...], "repeat": n} for n views with the same ops
// (multi-crop: {"repeat": 2, ...224 px...} then {"repeat": 6, ...96 px...}). A method's
// "views" is a list of views. Example op: {"type": "random_resized_crop", "size": 224,
// "scale": [0.08, 1.0], "interpolation": "bicubic"}. `twins list augmentations` names them all.
#include <ATen/core/Tensor.h>
#include <nlohmann/json_fwd.hpp>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "twins/augment/random.h"

namespace twins::augment {

/// Contract for an augmentation op.
/// Represents: one step of a view, like a torchvision transform.
/// Requires: a uint8 CPU image [H, W, C], C = 1 or 3.
/// Ensures: returns a uint8 image [H', W', C] (same C); all randomness comes from `rng`, drawn
/// in a fixed order, so the same stream gives the same output.
class Op {
 public:
  virtual ~Op() = default;
  virtual at::Tensor apply(const at::Tensor& img, Rng& rng) const = 0;
  /// The op as JSON that create_op() accepts.
  virtual nlohmann::json to_json() const = 0;
  /// Output size {h, w} if the op fixes it regardless of its input, else {0, 0}.
  virtual std::pair<int, int> output_size() const { return {0, 0}; }
};

/// A crop rectangle in pixels.
struct CropBox {
  int top = 0, left = 0, height = 0, width = 0;
};

/// torchvision's RandomResizedCrop.get_params: area fraction ~ U(scale), log aspect ratio ~
/// U(log ratio), 10 tries, then the central crop with the ratio clamped into range.
CropBox random_resized_crop_box(int height, int width, std::pair<double, double> scale, std::pair<double, double> ratio,
                                Rng& rng);

/// Builds an op from {"type": ..., ...}; `path` names it in error messages.
std::shared_ptr<Op> create_op(const nlohmann::json& spec, const std::string& path = "op");
/// The registered op names, sorted.
std::vector<std::string> op_names();

/// The image side assumed where a view's output size depends on its input (ImageNet's 224).
inline constexpr int kDefaultImageSize = 224;

/// Mean and standard deviation per channel, in [0, 1] units, applied after the float
/// conversion on the training device (see normalize_batch).
struct Normalization {
  std::vector<double> mean{0.0, 0.0, 0.0};
  std::vector<double> std{1.0, 1.0, 1.0};
};

/// One view: ops applied in order, then the image is converted to float and normalised.
struct View {
  std::vector<std::shared_ptr<Op>> ops;
  Normalization normalization;
  /// Output size {h, w} fixed by the last size-setting op, or {0, 0} (input-dependent).
  std::pair<int, int> size{0, 0};
  /// The side the model sees (the output height), or `fallback` when it depends on the input.
  int output_side(int fallback = kDefaultImageSize) const;
  /// Applies the ops to `img` (already with the model's channels).
  at::Tensor apply(const at::Tensor& img, Rng rng) const;
  nlohmann::json to_json() const;
};

/// Parses a method's "views" (a list of views; each a list of ops or {"ops", "repeat"}).
std::vector<View> parse_views(const nlohmann::json& views, const std::string& path = "views");

/// uint8 [N, C, H, W] (any device) -> float [N, C, H, W] on `device` with (x/255 - mean) / std,
/// in one fused step on the device (the copy is of uint8, 4x smaller than float).
at::Tensor normalize_batch(const at::Tensor& batch, const Normalization& n, const at::Device& device,
                           at::ScalarType dtype);
/// normalize_batch as an affine map of the float image x: x * scale + shift, per channel
/// ({scale, shift}, float64 [1, C, 1, 1] on the CPU), for callers that keep them on the device.
std::pair<at::Tensor, at::Tensor> normalization_affine(const Normalization& n, int64_t channels);

}  // namespace twins::augment

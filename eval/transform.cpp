#include "twins/eval/transform.h"

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>
#include <stdexcept>

namespace twins::eval {

augment::View random_crop_flip_view(int size, const std::vector<double>& scale,
                                    const augment::Normalization& normalization) {
  augment::View view;
  view.ops.push_back(augment::create_op(
      {{"type", "random_resized_crop"}, {"size", size}, {"scale", scale}, {"interpolation", "bilinear"}},
      "random_crop_flip_view"));
  view.ops.push_back(augment::create_op({{"type", "random_horizontal_flip"}}, "random_crop_flip_view"));
  view.size = {size, size};
  view.normalization = normalization;
  return view;
}

EvalTransform EvalTransform::standard(int image_size, const augment::Normalization& normalization) {
  if (image_size < 1)
    throw std::invalid_argument("EvalTransform: image_size must be >= 1, got " + std::to_string(image_size));
  EvalTransform t;
  t.image_size = image_size;
  t.resize = static_cast<int>(std::lround(image_size * 256.0 / 224.0));
  t.normalization = normalization;
  return t;
}

EvalTransform EvalTransform::for_fixed_size(int height, int width, int image_size,
                                            const augment::Normalization& normalization) {
  EvalTransform t = standard(image_size, normalization);
  if (std::min(height, width) == image_size) t.resize = 0;
  return t;
}

EvalTransform EvalTransform::for_dataset(const data::Dataset& dataset, int image_size,
                                         const augment::Normalization& normalization) {
  const auto [h, w] = dataset.image_size();
  if (h > 0 && w > 0) return for_fixed_size(h, w, image_size, normalization);
  return standard(image_size, normalization);
}

augment::View EvalTransform::view() const {
  augment::View v;
  if (resize > 0)
    v.ops.push_back(augment::create_op(
        {{"type", "resize"}, {"size", resize}, {"interpolation", augment::to_string(interpolation)}}, "eval.resize"));
  v.ops.push_back(augment::create_op({{"type", "center_crop"}, {"size", image_size}}, "eval.center_crop"));
  v.size = {image_size, image_size};
  v.normalization = normalization;
  return v;
}

}  // namespace twins::eval

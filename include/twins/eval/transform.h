#pragma once
// The evaluation transform: one typed, deterministic view used by every caller that turns
// images into features with a frozen backbone (linear probe, kNN, the online probe's eval data,
// the Embedder, `twins embed`), so that the same image gives the same features everywhere.
//
// It is the official protocol's resize + centre crop (torchvision's Resize(size x 256/224) then
// CenterCrop(size), bilinear with PIL's antialiasing), then the training normalisation. The
// decision to resize is made once per source, never per image: image files (folders, lists) are
// always resized, whatever their size; datasets whose format fixes one image size (CIFAR, STL-10,
// MNIST, a uint8 batch tensor) are only centre-cropped when that size already equals the
// evaluation size, as solo-learn's and the official CIFAR evaluations do.
#include <ATen/core/Tensor.h>

#include "twins/augment/functional.h"
#include "twins/augment/pipeline.h"
#include "twins/data/dataset.h"

namespace twins::eval {

struct EvalTransform {
  /// Side of the square crop the backbone sees.
  int image_size = augment::kDefaultImageSize;
  /// Shorter side after resizing, before the crop; 0: no resize (only the centre crop).
  int resize = 0;
  augment::Interpolation interpolation = augment::Interpolation::bilinear;
  augment::Normalization normalization;

  /// The standard transform for images of any size: shorter side to round(size x 256/224).
  static EvalTransform standard(int image_size, const augment::Normalization& normalization);
  /// For a source whose images are all height x width: crop only when the shorter side is
  /// image_size, else the standard transform.
  static EvalTransform for_fixed_size(int height, int width, int image_size,
                                      const augment::Normalization& normalization);
  /// For a dataset: for_fixed_size when its format fixes the image size, else standard.
  static EvalTransform for_dataset(const data::Dataset& dataset, int image_size,
                                   const augment::Normalization& normalization);

  /// The transform as a view for the loader (uint8 [H, W, C] -> uint8 [size, size, C]);
  /// normalisation is left to augment::normalize_batch with `normalization`.
  augment::View view() const;
};

/// The training view of the published evaluation protocols (the official evaluate.py,
/// solo-learn): torchvision's RandomResizedCrop(size, scale, bilinear) then RandomHorizontalFlip;
/// `normalization` is left to augment::normalize_batch.
augment::View random_crop_flip_view(int size, const std::vector<double>& scale,
                                    const augment::Normalization& normalization);

}  // namespace twins::eval

#pragma once
// Frozen-backbone features for evaluation: the official protocol's deterministic view (resize
// + centre crop, then the training normalisation), batched through the parallel loader.
#include <ATen/core/Tensor.h>

#include <memory>
#include <string>

#include "twins/augment/pipeline.h"
#include "twins/data/dataset.h"
#include "twins/models/network.h"

namespace twins::eval {

/// EvalTransform::for_dataset(dataset, size, normalization).view() (see <twins/eval/transform.h>):
/// datasets of one fixed image size equal to `size` (CIFAR, MNIST) are only centre-cropped;
/// everything else, image files of any size among them, is resized so the shorter side is
/// size x 256/224 (bilinear, as torchvision's Resize), then centre-cropped (ImageNet: 256 -> 224).
augment::View eval_view(const data::Dataset& dataset, int size, const augment::Normalization& normalization);

struct Features {
  at::Tensor features;  ///< float32 [N, D], CPU
  at::Tensor labels;    ///< int64 [N] (-1: unlabeled)
};

struct ExtractOptions {
  int64_t batch_size = 256;
  int workers = 2;
  int channels = 3;
  bool progress = true;  ///< a line every few seconds on stderr
  std::string what = "features";
};

/// Runs the backbone (in eval mode, no gradients) over the whole dataset in order.
Features extract_features(models::Network& backbone, std::shared_ptr<const data::Dataset> dataset,
                          const augment::View& view, const at::Device& device, const ExtractOptions& options);

}  // namespace twins::eval

#pragma once
// Frozen-backbone features for evaluation: the official protocol's deterministic view (resize
// + centre crop, then the training normalisation), batched through the parallel loader.
#include <ATen/core/Tensor.h>

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "twins/augment/pipeline.h"
#include "twins/data/dataset.h"
#include "twins/models/network.h"

namespace twins::distributed {
class Communicator;
}

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
  /// Loader threads (twins::kAutoWorkers: twins::loader_workers' choice for the device).
  int workers = 2;
  int channels = 3;
  bool progress = true;  ///< a line every few seconds on stderr
  std::string what = "features";
  /// extract_features_shared: the most bytes of features one collective gathers.
  int64_t gather_bytes = int64_t{64} << 20;
  /// extract_features: start at this sample (a multiple of batch_size, or the dataset's size:
  /// nothing left), as a run that stopped there continues.
  int64_t first = 0;
  /// extract_features: each batch's features (float32 [B, D], CPU) and labels with the index of
  /// its first sample, in order, handed here instead of being kept (the result is then empty).
  std::function<void(int64_t first, const Features& batch)> sink;
  /// extract_features: checked after each batch; once true, it returns what it has so far.
  const std::atomic<bool>* stop = nullptr;
  /// extract_features: called after each batch (the keep-alive of distributed::on_rank0_long).
  std::function<void()> after_batch;
};

/// What the feature cache's key (and `twins embed`'s unfinished output) knows of a dataset, as a
/// CRC-32: every sample's id, the size and modification time of every local file the samples
/// come from (Dataset::source_files) and, but for tar shards (streams), every label and the
/// sizes and pixels of up to 16 evenly spaced samples. Files replaced by others, as many, edited
/// in place or relabelled give another value. (A stat per file: about 2.5 s per million local
/// files the system has cached.)
uint32_t data_fingerprint(const data::Dataset& dataset);

/// Runs the backbone (in eval mode, no gradients) over the whole dataset in order (from
/// options.first, until options.stop).
Features extract_features(models::Network& backbone, std::shared_ptr<const data::Dataset> dataset,
                          const augment::View& view, const at::Device& device, const ExtractOptions& options);

/// Rank `rank`'s share of `n` samples over `world` ranks in extract_features_shared: samples
/// rank, rank + world, rank + 2 world, ...
std::vector<int64_t> rank_share(int64_t n, int64_t rank, int64_t world);

/// extract_features_shared's gather: every rank passes the features of its rank_share (in that
/// order; [share, dim]) and rank 0 gets all `n` samples' in dataset order (in chunks of
/// options.gather_bytes), the other ranks empty Features. Every rank must call it.
Features gather_shares(const Features& share, int64_t n, int64_t dim, const ExtractOptions& options,
                       distributed::Communicator& communicator);

/// The same over the ranks of `communicator`: rank r runs samples r, r + W, r + 2W, ... and rank
/// 0 gets every sample's features in dataset order (gathered in chunks of options.gather_bytes); the
/// other ranks get empty Features. A streaming dataset (tar shards, read in its own order) is
/// run by rank 0 alone. Every rank must call it.
Features extract_features_shared(models::Network& backbone, std::shared_ptr<const data::Dataset> dataset,
                                 const augment::View& view, const at::Device& device, const ExtractOptions& options,
                                 distributed::Communicator& communicator);

}  // namespace twins::eval

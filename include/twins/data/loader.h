#pragma once
// The parallel loader: worker threads read, decode and augment samples straight into
// preallocated uint8 batch tensors [B, C, H, W] (one per view), with a bounded prefetch queue.
//
// Order: each epoch shuffles the dataset with a permutation drawn from (seed, epoch); with
// world_size R, rank r takes every R-th index of it, padded like PyTorch's DistributedSampler so
// every rank gets the same number. Views of dataset index i in epoch e come from the stream
// Rng(seed, e, i, view), so a batch's content depends neither on the number of workers nor on
// the number of ranks.
#include <ATen/core/Tensor.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "twins/augment/pipeline.h"
#include "twins/data/dataset.h"

namespace twins::data {

/// The most worker threads a loader starts (more is a configuration error, not a speed-up).
inline constexpr int kMaxWorkers = 256;

struct LoaderOptions {
  /// Samples per batch (per rank).
  int64_t batch_size = 256;
  /// Worker threads; 0 builds batches in the calling thread.
  int workers = 2;
  /// Batches prepared ahead of the consumer, per worker.
  int prefetch = 2;
  /// Shuffle every epoch (false: dataset order, e.g. for evaluation).
  bool shuffle = true;
  /// Drop the last incomplete batch.
  bool drop_last = true;
  /// Seed of the shuffles and of the views.
  uint64_t seed = 0;
  /// Distributed sharding.
  int64_t rank = 0, world_size = 1;
  /// Channels the model takes (grey images are replicated to 3, RGB turned grey for 1).
  int channels = 3;
  /// Allocate batches in pinned memory (for asynchronous copies to CUDA).
  bool pin_memory = false;
};

struct Batch {
  /// One uint8 tensor [B, C, H, W] per view.
  std::vector<at::Tensor> views;
  /// int64 [B]: labels (-1 when unlabeled) and dataset indices.
  at::Tensor labels, indices;
  int64_t epoch = 0;
  /// Position of the batch in its epoch.
  int64_t index = 0;
};

class Loader {
 public:
  Loader(std::shared_ptr<const Dataset> dataset, std::vector<augment::View> views, LoaderOptions options);
  ~Loader();
  Loader(const Loader&) = delete;
  Loader& operator=(const Loader&) = delete;

  /// Batches in one epoch of this rank.
  int64_t batches_per_epoch() const;
  /// Starts epoch `epoch` at batch `first` (0, or where a resumed run stopped).
  void start_epoch(int64_t epoch, int64_t first = 0);
  /// The next batch of the epoch, in order; nullopt at the end of the epoch. A failure in a
  /// worker is rethrown here, naming the sample index and its file.
  std::optional<Batch> next();
  /// Bad samples replaced so far (on_bad_sample "skip").
  int64_t skipped() const;
  /// This rank's dataset indices of an epoch, in order (before batching).
  std::vector<int64_t> epoch_indices(int64_t epoch) const;

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace twins::data

#pragma once
// Embedding images with a pretrained backbone, from any C++ program:
//
//   #include <twins/embed.h>
//   twins::Embedder embedder("runs/quickstart/backbone.safetensors");
//   at::Tensor e = embedder.embed_files({"a.jpg", "b.png"});   // [2, D] float32, CPU
//
// Every input goes through the evaluation transform of <twins/eval/transform.h>: image files
// are always resized (shorter side to image_size x 256/224) and centre-cropped; a uint8 batch or
// a dataset of one fixed image size equal to image_size is only centre-cropped. So a folder gives
// the same features here, in `twins embed` and in `twins linear-probe`.
//
// Light on purpose: this header needs only the tensor type.
#include <ATen/core/Tensor.h>

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace twins {

namespace data {
class Dataset;
}

struct EmbedderOptions {
  /// auto, cpu, cuda, cuda:N.
  std::string device = "auto";
  /// Side of the square the backbone sees; 0: what the backbone was trained on (its file's
  /// metadata), else 224.
  int image_size = 0;
  /// Normalisation in [0, 1] units; empty: the training recipe's (metadata), else ImageNet's.
  std::vector<double> mean, std;
  /// Images per forward pass.
  int64_t batch_size = 64;
  /// Image files with more pixels than this are refused before decoding (PIL's limit).
  int64_t max_image_pixels = 89478485;
};

struct EmbedDatasetOptions {
  /// Loader threads that decode and transform images while the backbone runs (twins::kAutoWorkers,
  /// -1, as `twins embed` has by default: as many as the device wants, see twins::loader_workers).
  int workers = 2;
  /// A line every few seconds on stderr.
  bool progress = false;
  /// Start at this image (a multiple of EmbedderOptions::batch_size, or N: nothing left): a
  /// stopped run continuing.
  int64_t first = 0;
  /// Each batch's features [B, D] (float32, CPU) with the index of its first image, in order,
  /// handed here instead of being kept: embed_dataset then returns an empty tensor, and a
  /// dataset of any size embeds in the memory of one batch.
  std::function<void(int64_t first, const at::Tensor& features)> sink;
  /// Checked after each batch: once true, embed_dataset returns (with what it has so far).
  const std::atomic<bool>* stop = nullptr;
};

/// A frozen backbone that maps images to feature vectors.
/// Thread safety: embed() and embed_files() may be called from several threads at once.
class Embedder {
 public:
  /// Loads backbone.safetensors, a run folder, or a torchvision ResNet in safetensors.
  explicit Embedder(const std::string& backbone, EmbedderOptions options = {});
  ~Embedder();
  Embedder(Embedder&&) noexcept;
  Embedder& operator=(Embedder&&) noexcept;

  /// Images as uint8 [N, H, W, C] or [N, C, H, W] (resized and centre-cropped as in evaluation,
  /// then normalised), or float [N, C, image_size, image_size] already normalised. -> [N, D]
  at::Tensor embed(const at::Tensor& images) const;
  /// Image files (JPEG, PNG, ...) -> [N, D]. Throws std::runtime_error naming an unreadable file.
  at::Tensor embed_files(const std::vector<std::string>& paths) const;
  /// Every image of a dataset, in order, batched through the parallel loader -> [N, D] (from
  /// options.first: [N - first, D]; until options.stop; with options.sink: [0, D], the rows
  /// handed there).
  at::Tensor embed_dataset(std::shared_ptr<const data::Dataset> dataset, const EmbedDatasetOptions& options = {}) const;
  /// D, the feature size.
  int64_t dim() const;
  int image_size() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace twins

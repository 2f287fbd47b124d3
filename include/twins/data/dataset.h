#pragma once
// Datasets, created by name from JSON: {"type": "cifar10", "root": "...", "split": "train"}.
//
// Types: cifar10, cifar100 (official binary versions), stl10 (binary; splits train, test,
// unlabeled, train+unlabeled), mnist and fashion_mnist (IDX, gzipped or not), image_folder
// (root/<class>/**/*.jpg|png|..., classes from sorted folder names; a flat folder is unlabeled)
// and csv (RFC 4180 rows "path[,label]", paths relative to the CSV file's folder unless
// absolute). Image files larger than "max_image_pixels" (default: PIL's limit, ~89.5 Mpx) are
// refused from their header, before decoding: a bad sample (see on_bad_sample). shards: tar
// shards read as streams (twins/data/shards.h).
#include <ATen/core/Tensor.h>
#include <nlohmann/json_fwd.hpp>

#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace twins::data {

/// A sample that cannot be read or decoded (a corrupt image file). The loader either stops
/// with it (on_bad_sample "error") or replaces the sample and counts it ("skip").
class BadSample : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

enum class OnBadSample { error, skip };

/// More classes than any dataset has (ImageNet-21k: 21,841): a larger label is a corrupt file.
inline constexpr int64_t kMaxClasses = 1000000;

/// Which part of an epoch a rank reads from a streaming dataset (see Dataset::streaming).
struct StreamPlan {
  uint64_t seed = 0;
  int64_t epoch = 0, rank = 0, world_size = 1;
  bool shuffle = true;
  /// The first position taken (0, or where a resumed run stopped).
  int64_t first = 0;
  /// How many positions past the highest one asked for may be read ahead.
  int64_t read_ahead = 256;
};

/// One rank's epoch of a streaming dataset, read in the background from the moment it exists.
class EpochStream {
 public:
  struct Sample {
    at::Tensor image;  ///< uint8 [H, W, C]
    int64_t label = -1, index = -1;
  };
  virtual ~EpochStream() = default;
  /// The sample at `position` of this rank's epoch order, decoded in the calling thread; blocks
  /// until its bytes are read. Any thread; each position at most once. Throws BadSample naming
  /// the source and member (a corrupt or lost member, an undecodable image, no label) and
  /// std::runtime_error once cancel() was called.
  virtual Sample take(int64_t position) = 0;
  /// Wakes every take() (which then throws) and stops reading.
  virtual void cancel() = 0;
};

/// Contract for a dataset.
/// Represents: a fixed, indexed list of images with optional integer labels.
/// Requires: 0 <= index < size().
/// Ensures: image() returns a new uint8 CPU tensor [H, W, C], C = 1 or 3, RGB order, and is
/// safe to call from several threads at once; a bad sample throws BadSample naming the file;
/// label() is in [0, num_classes()) or -1 for unlabeled samples.
class Dataset {
 public:
  virtual ~Dataset() = default;
  virtual int64_t size() const = 0;
  virtual at::Tensor image(int64_t index) const = 0;
  virtual int64_t label(int64_t index) const = 0;
  /// A stable id for messages and `twins embed`: the file path, or "<file>#<record>".
  virtual std::string id(int64_t index) const = 0;
  /// Number of classes; 0 for unlabeled data.
  virtual int64_t num_classes() const = 0;
  /// The local files the samples are read from (image files, a binary dataset's files,
  /// tar shards but those read through `pipe:` commands); empty where there are none. Their sizes
  /// and modification times tell the feature cache that the data changed.
  virtual std::vector<std::string> source_files() const { return {}; }
  /// Whether images are held decoded (binary formats): no decode cost per sample.
  virtual bool in_memory() const { return false; }
  /// {height, width} of every image when the format fixes one size (CIFAR, STL-10, MNIST),
  /// {0, 0} when images may differ (files).
  virtual std::pair<int, int> image_size() const { return {0, 0}; }
  /// Whether samples can only be read as a stream, in an order the dataset decides (tar shards):
  /// then image() and label() are not available and the loader reads through open_epoch().
  virtual bool streaming() const { return false; }
  /// A streaming dataset's epoch order for one rank: the dataset indices, ceil(size() /
  /// world_size) of them (plan.first is ignored).
  virtual std::vector<int64_t> stream_order(const StreamPlan&) const {
    throw std::logic_error("stream_order: not a streaming dataset");
  }
  /// Starts reading a rank's epoch from position plan.first.
  virtual std::unique_ptr<EpochStream> open_epoch(const StreamPlan&) const {
    throw std::logic_error("open_epoch: not a streaming dataset");
  }
  /// What to do with a sample whose image() throws BadSample.
  OnBadSample on_bad_sample = OnBadSample::error;
};

/// Builds a dataset from its JSON object; `path` names it in messages ("data", "eval.test").
/// Throws std::invalid_argument for bad keys and std::runtime_error for missing or malformed
/// files, naming the file and, for binary formats, the expected size.
std::shared_ptr<Dataset> create_dataset(const nlohmann::json& spec, const std::string& path = "data");
std::vector<std::string> dataset_names();

/// The samples `indices` of `dataset`, in that order, as a dataset of their own (images and labels
/// read from `dataset`; its ids, classes and bad-sample policy). Throws std::invalid_argument for
/// an index outside [0, dataset->size()) and for a streaming dataset (tar shards are read in their
/// own order; a subset needs indexed access).
std::shared_ptr<Dataset> subset(std::shared_ptr<const Dataset> dataset, std::vector<int64_t> indices);

/// Images given by one path, as `twins embed --input` takes them: an image folder (classes
/// from subfolders, if any), a dataset JSON file, or a list file (CSV: path[,label] per line).
/// `path` names the input in messages.
std::shared_ptr<Dataset> open_images(const std::string& input, const std::string& path = "input");

}  // namespace twins::data

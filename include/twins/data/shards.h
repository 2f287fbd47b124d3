#pragma once
// Sharded tar datasets (the WebDataset convention): each sample is consecutive tar members that
// share a key (`n01440764_10026.jpg`, `n01440764_10026.cls`), read in order from local files or
// from the standard output of a `pipe:` command (`pipe:aws s3 cp s3://bucket/train-000001.tar -`),
// so twins never needs to know the store. Tars are read through libarchive: plain or compressed
// (.tar.gz) shards work alike.
//
// As a dataset ({"type": "shards", "urls": "train-{000000..000127}.tar", "index": "..."}) the
// shards stream through the loader: every epoch the shard order is a permutation drawn from
// (seed, epoch); shard k of it goes to rank k % world_size; each rank reads `shards_in_flight`
// of its shards at once, interleaved sample by sample, through a shuffle buffer. All of it is a
// function of (seed, epoch, rank) and of the sample counts in the shard index, never of timing
// or of the number of loader workers, so each rank's epoch order is known before a byte is read:
// every rank takes ceil(samples / world_size) samples per epoch (a rank whose shards hold fewer
// reads its shards again), and a resumed run reads the epoch again from its start, keeping only
// the samples not yet trained on, and so gives the same batches as a run never stopped.
#include <nlohmann/json_fwd.hpp>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "twins/data/dataset.h"

namespace twins::data {

/// Expands brace patterns as WebDataset does: `a-{000..012}.tar` (zero-padded as the first
/// bound is written), `{train,val}.tar`, several braces in one pattern; strings starting with
/// `pipe:` are expanded too. Throws std::invalid_argument naming the pattern on a bad range or
/// more than 10 million names.
std::vector<std::string> expand_urls(const std::vector<std::string>& patterns);

/// What labels a sample: the text of its `cls` member ("cls"), or an integer under a key of its
/// `json` member ("json:<key>").
struct LabelSource {
  std::string json_key;  ///< empty: the `cls` member
  static LabelSource parse(const std::string& text, const std::string& path);
  std::string str() const { return json_key.empty() ? "cls" : "json:" + json_key; }
};

/// The shard index: the shards in order with their sample counts, read or built once (`twins
/// shards index`) so every rank can plan its epoch without reading data.
struct ShardIndex {
  struct Shard {
    std::string url;
    int64_t samples = 0;
    /// Size in bytes of a local shard when indexed (-1 for pipe: sources): a shard whose size
    /// changed since makes the index stale.
    int64_t bytes = -1;
  };
  std::vector<Shard> shards;
  int64_t samples = 0;
  /// 1 + the largest label seen; 0 when no sample has a label (unlabeled data).
  int64_t num_classes = 0;
  std::string label = "cls";

  nlohmann::json to_json() const;
  static ShardIndex from_json(const nlohmann::json& j, const std::string& path);
};

struct IndexOptions {
  LabelSource label;
  /// Seconds without a byte from a source before it counts as dead.
  double read_timeout = 120;
  /// Shards read at once.
  int threads = 4;
  /// Called after each shard with (shards done, shards in all, samples so far).
  std::function<void(int64_t, int64_t, int64_t)> progress;
};

/// Reads every shard once (members only, no decoding) and counts its samples. Throws
/// std::runtime_error naming the shard and member for a corrupt or truncated tar, a sample
/// without an image, a bad label, or a failing `pipe:` command.
ShardIndex build_shard_index(const std::vector<std::string>& urls, const IndexOptions& options);
/// Reads an index file written by write_shard_index; throws naming the file.
ShardIndex read_shard_index(const std::string& path);
/// Writes the index atomically as JSON.
void write_shard_index(const std::string& path, const ShardIndex& index);

/// Opens a "shards" dataset from its JSON object (registered as data type "shards").
std::shared_ptr<Dataset> open_shards(const nlohmann::json& spec, const std::string& path);

struct CreateShardsOptions {
  /// printf pattern of the shard files, with one integer conversion: "out/train-%06d.tar".
  std::string pattern;
  /// A shard is closed before it would pass this many bytes (or this many samples); a sample
  /// larger than max_bytes gets a shard of its own.
  int64_t max_bytes = int64_t{1} << 30, max_count = 0;
  /// Write samples in a random order (seed): shards then mix classes, as a shuffle buffer needs.
  bool shuffle = true;
  uint64_t seed = 0;
  /// Where the index goes; empty: beside the shards, `<pattern up to the number>index.json`.
  std::string index_path;
  /// Called now and then with (samples written, samples in all).
  std::function<void(int64_t, int64_t)> progress;
};

struct CreatedShards {
  std::vector<std::string> files;
  std::string index_path;
  /// A brace pattern naming all the files, for data.urls.
  std::string urls;
  ShardIndex index;
};

/// Writes `dataset` as tar shards: per sample `<key>.<ext>` (an image file's own bytes and
/// extension; PNG for in-memory formats such as CIFAR or MNIST) and `<key>.cls` (its label, if
/// it has one); the key is the sample's index in `dataset`, zero-padded. Each shard is written
/// to a temporary and renamed when complete; the index is written last.
CreatedShards create_shards(const Dataset& dataset, const CreateShardsOptions& options);

/// "1GB", "500MB", "64KiB", "1e9", "4096" -> bytes (KB = 1000, KiB = 1024); throws
/// std::invalid_argument naming `what`.
int64_t parse_byte_size(const std::string& text, const std::string& what);

}  // namespace twins::data

#include "twins/eval/evaluate.h"

#include <ATen/ATen.h>
#include <zlib.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <tuple>
#include <vector>

#include "eval/progress.h"
#include "twins/config.h"
#include "twins/data/dataset.h"
#include "twins/data/loader.h"
#include "twins/distributed/communicator.h"
#include "twins/eval/transform.h"
#include "twins/io.h"
#include "twins/models/safetensors.h"
#include "twins/models/weights.h"
#include "twins/runtime.h"

namespace twins::eval {
namespace fs = std::filesystem;
using nlohmann::json;

EvalConfig EvalConfig::parse(const json& root) {
  EvalConfig c;
  config::ConfigReader r(root, "");
  for (const auto& item : root.items())
    if (!item.key().empty() && item.key()[0] == '_') r.allow(item.key());
  for (const char* key : {"train_data", "test_data"}) {
    r.allow(key);
    config::require(root.contains(key), key, "required");
  }
  c.train_data = root["train_data"], c.test_data = root["test_data"];
  r.get("image_size", c.image_size);
  config::require(c.image_size > 0 && c.image_size <= 4096, "image_size", "must be in [1, 4096]");
  r.allow("normalize");
  if (root.contains("normalize")) {
    config::ConfigReader n(root["normalize"], "normalize");
    n.get("mean", c.normalization.mean);
    n.get("std", c.normalization.std);
    n.finish();
  }
  r.allow("probe");
  if (root.contains("probe")) {
    config::ConfigReader p(root["probe"], "probe");
    p.get("epochs", c.probe.epochs);
    p.get("batch_size", c.probe.batch_size);
    p.get("lr", c.probe.lr);
    p.get("weight_decay", c.probe.weight_decay);
    p.get("momentum", c.probe.momentum);
    p.get("seed", c.probe.seed);
    p.get("augment", c.probe.augment);
    p.get("crop_scale", c.probe.crop_scale);
    p.get("checkpoint_every_steps", c.probe.checkpoint_every_steps);
    p.finish();
    config::require(c.probe.crop_scale.size() == 2 && c.probe.crop_scale[0] > 0 &&
                        c.probe.crop_scale[0] <= c.probe.crop_scale[1] && c.probe.crop_scale[1] <= 1,
                    "probe.crop_scale", "expected [min, max] with 0 < min <= max <= 1");
    config::require(c.probe.epochs >= 1 && c.probe.epochs <= 100000, "probe.epochs", "must be in [1, 10^5]");
    config::require(c.probe.batch_size >= 1 && c.probe.batch_size <= (1 << 20), "probe.batch_size",
                    "must be in [1, 2^20]");
    config::require(c.probe.lr > 0, "probe.lr", "must be > 0");
    config::require(c.probe.checkpoint_every_steps >= 0, "probe.checkpoint_every_steps",
                    "must be >= 0 (0: after each epoch only)");
  }
  r.allow("knn");
  if (root.contains("knn")) {
    config::ConfigReader k(root["knn"], "knn");
    read_knn_options(k, c.knn);
    k.finish();
  }
  r.allow("finetune");
  if (root.contains("finetune")) {
    config::ConfigReader f(root["finetune"], "finetune");
    auto& o = c.finetune;
    f.get("epochs", o.epochs);
    f.get("batch_size", o.batch_size);
    f.get("lr_backbone", o.lr_backbone);
    f.get("lr_head", o.lr_head);
    f.get("weight_decay", o.weight_decay);
    f.get("momentum", o.momentum);
    f.get("train_percent", o.train_percent);
    f.get("subset", o.subset);
    f.get("crop_scale", o.crop_scale);
    f.get("precision", o.precision);
    f.get("seed", o.seed);
    f.get("eval_every_epochs", o.eval_every_epochs);
    f.get("checkpoint_every_steps", o.checkpoint_every_steps);
    f.finish();
    config::require(o.epochs >= 1 && o.epochs <= 100000, "finetune.epochs", "must be in [1, 10^5]");
    config::require(o.eval_every_epochs >= 0 && o.eval_every_epochs <= 100000, "finetune.eval_every_epochs",
                    "must be in [0, 10^5] (0: after the last epoch only)");
    config::require(o.checkpoint_every_steps >= 0, "finetune.checkpoint_every_steps",
                    "must be >= 0 (0: after each epoch only)");
    config::require(o.batch_size >= 1 && o.batch_size <= (1 << 20), "finetune.batch_size", "must be in [1, 2^20]");
    config::require(o.lr_backbone >= 0 && o.lr_backbone <= 1e3, "finetune.lr_backbone",
                    "must be in [0, 1000] (0 freezes the backbone)");
    config::require(o.lr_head > 0 && o.lr_head <= 1e3, "finetune.lr_head", "must be in (0, 1000]");
    config::require(o.weight_decay >= 0 && o.weight_decay <= 1, "finetune.weight_decay", "must be in [0, 1]");
    config::require(o.momentum >= 0 && o.momentum < 1, "finetune.momentum", "must be in [0, 1)");
    config::require(o.train_percent > 0 && o.train_percent <= 100, "finetune.train_percent", "must be in (0, 100]");
    config::require(
        o.crop_scale.size() == 2 && o.crop_scale[0] > 0 && o.crop_scale[0] <= o.crop_scale[1] && o.crop_scale[1] <= 1,
        "finetune.crop_scale", "expected [min, max] with 0 < min <= max <= 1");
    config::require(o.precision == "auto" || o.precision == "fp32" || o.precision == "bf16", "finetune.precision",
                    "must be auto, fp32 or bf16");
    config::require(o.subset.empty() || o.train_percent == 100, "finetune.subset",
                    "names the samples itself; give it or finetune.train_percent (--train-percent), not both");
  }
  r.get("batch_size", c.batch_size);
  r.get_or_auto("workers", c.workers, kAutoWorkers, 0, 256);
  r.get("device", c.device);
  r.get("dist_backend", c.dist_backend);
  r.get("dist_timeout_s", c.dist_timeout_s);
  r.get("dist_heartbeat_timeout_s", c.dist_heartbeat_timeout_s);
  r.get("features_save_every_s", c.features_save_every_s);
  r.finish();
  config::require(c.features_save_every_s >= 0 && c.features_save_every_s <= 1e6, "features_save_every_s",
                  "must be in [0, 10^6] seconds (0: after every batch)");
  config::require(c.dist_backend == "auto" || c.dist_backend == "gloo" || c.dist_backend == "nccl", "dist_backend",
                  "must be auto, gloo or nccl");
  config::require(c.dist_timeout_s > 0 && c.dist_timeout_s <= 1e6, "dist_timeout_s", "must be in (0, 10^6] seconds");
  config::require(
      c.dist_heartbeat_timeout_s == 0 || (c.dist_heartbeat_timeout_s >= 5 && c.dist_heartbeat_timeout_s <= 1e6),
      "dist_heartbeat_timeout_s", "must be 0 (off) or in [5, 10^6] seconds (heartbeats come every 2 s)");
  config::require(c.batch_size >= 1 && c.batch_size <= (1 << 20), "batch_size", "must be in [1, 2^20]");
  config::require(c.workers == kAutoWorkers || (c.workers >= 0 && c.workers <= 256), "workers",
                  "must be in [0, 256] or \"auto\"");
  return c;
}

at::Device resolve_eval_device(const std::string& name) { return resolve_device(name, "device"); }

using io::crc32_update;

uint32_t backbone_checksum(const models::Network& net) {
  uLong crc = crc32(0L, Z_NULL, 0);
  for (const auto& [name, t] : models::backbone_state(net)) {
    const at::Tensor cpu = t.to(at::kCPU).contiguous();
    crc = crc32_update(crc, name);
    crc = crc32_update(crc, cpu.data_ptr(), static_cast<size_t>(cpu.numel()) * cpu.element_size());
  }
  return static_cast<uint32_t>(crc);
}

std::shared_ptr<models::Network> open_backbone(const std::string& backbone) {
  if (backbone.rfind("random:", 0) == 0) {
    // random:<backbone JSON> or random:<recipe file> (its model.backbone)
    const std::string rest = backbone.substr(7);
    json spec;
    if (!rest.empty() && rest[0] == '{')
      spec = json::parse(rest, nullptr, /*allow_exceptions=*/false);
    else if (fs::exists(rest))
      spec = config::load_config(rest).value("model", json::object()).value("backbone", json());
    if (!spec.is_object() && !spec.is_string())
      throw std::invalid_argument("backbone \"" + backbone +
                                  "\": expected random:<backbone JSON> or random:<recipe file with model.backbone>");
    at::manual_seed(0);
    auto net = models::create_backbone(spec);
    net->eval();
    return net;
  }
  return models::load_backbone(backbone);
}

namespace {

// Saves the feature cache; one that cannot be written costs time, not the result.
bool write_cache(const fs::path& cache, const Features& f) {
  try {
    fs::create_directories(cache.parent_path());
    models::save_safetensors(cache.string(), {{"features", f.features}, {"labels", f.labels}});
    return true;
  } catch (const std::exception& e) {
    std::cerr << "warning: cannot write the feature cache " << cache.string() << ": " << e.what() << "\n";
    return false;
  }
}

// Once `cache` is written (or found): removes the partial files other runs left for it (killed,
// then run again with another number of ranks, or killed after the cache was written) and no
// process holds.
void remove_stale(const fs::path& cache) {
  io::remove_unheld_rows(cache.parent_path().string(), cache.filename().string());
}

// extract_features, keeping the rows on disk as they come, so as to survive a crash: each row (D
// float32 features, then the int64 label) goes to `partial`, an io::RowFile whose state is saved
// every `save_every_s` seconds; a run that finds them continues there. (The partial file's name
// holds the cache's, which is its key, so the rows are of these images, this backbone and this
// transform.) Another process extracting into the same file (its lock held), or a folder that
// cannot be written, leaves this one extracting in memory, as without the partial file. Then
// `done` gets every row (it writes the cache); when it says the rows are kept elsewhere, the
// partial files go (the lock's last, while held). Its messages go out in one write each: every
// rank of a job may be saying one at once.
Features extract_kept(models::Network& net, const std::shared_ptr<const data::Dataset>& dataset,
                      const augment::View& view, const at::Device& device, ExtractOptions o, const std::string& partial,
                      double save_every_s, const std::function<bool(const Features&)>& done) {
  const int64_t n = dataset->size(), dim = net.output_dim();
  const auto feature_bytes = static_cast<size_t>(dim) * sizeof(float), row_bytes = feature_bytes + sizeof(int64_t);
  std::optional<io::FileLock> lock;
  std::optional<io::RowFile> rows;
  std::vector<at::Tensor> features, labels;
  try {
    fs::create_directories(fs::path(partial).parent_path());
    lock.emplace(partial + ".lock");
    if (lock->held()) {
      rows.emplace(partial, "", row_bytes, std::to_string(n) + " images, " + std::to_string(dim) + " features", n,
                   o.batch_size);
      if (rows->opened() == io::RowFile::Opened::continued)
        std::cerr << "  " + o.what + ": continuing " + partial + " at image " + std::to_string(rows->rows()) + " of " +
                         std::to_string(n) + "\n";
      else if (rows->opened() == io::RowFile::Opened::started_over)
        std::cerr << "  " + o.what + ": starting over (" + partial + " is unreadable or incomplete)\n";
      // The rows on disk, read back in chunks of about 64 MB.
      at::Tensor f = at::empty({rows->rows(), dim}, at::kFloat), l = at::empty({rows->rows()}, at::kLong);
      const int64_t chunk = std::max<int64_t>(1, (int64_t{64} << 20) / static_cast<int64_t>(row_bytes));
      std::string bytes;
      for (int64_t first = 0; first < rows->rows(); first += chunk) {
        const int64_t count = std::min(chunk, rows->rows() - first);
        bytes.resize(static_cast<size_t>(count) * row_bytes);
        rows->read(first, count, bytes.data());
        for (int64_t i = 0; i < count; ++i) {
          const char* row = bytes.data() + static_cast<size_t>(i) * row_bytes;
          std::memcpy(f.data_ptr<float>() + (first + i) * dim, row, feature_bytes);
          std::memcpy(l.data_ptr<int64_t>() + first + i, row + feature_bytes, sizeof(int64_t));
        }
      }
      features.push_back(f), labels.push_back(l);
    } else {
      std::cerr << "  " + o.what + ": another process is extracting into " + partial + "; extracting in memory\n";
    }
  } catch (const std::exception& e) {  // (only the files: nothing is extracted yet)
    std::cerr << "warning: " + o.what + ": cannot keep them on disk as they come (" + e.what() +
                     "); extracting in memory\n";
    rows.reset(), features.clear(), labels.clear();
  }
  if (features.empty()) features.push_back(at::empty({0, dim})), labels.push_back(at::empty({0}, at::kLong));
  std::string bytes;
  int64_t batches = 0, extracted = rows ? rows->rows() : 0;
  o.first = extracted;
  o.sink = [&](int64_t first, const Features& batch) {
    const at::Tensor f = batch.features.to(at::kFloat).contiguous(), l = batch.labels.to(at::kLong).contiguous();
    if (first != extracted)
      throw std::logic_error(o.what + ": a batch at image " + std::to_string(first) + " where " +
                             std::to_string(extracted) + " were extracted");
    if (f.dim() != 2 || f.size(1) != dim || l.numel() != f.size(0))
      throw std::runtime_error(o.what + ": the backbone gave features of shape " + c10::str(f.sizes()) + " for " +
                               std::to_string(l.numel()) + " images, where its output_dim is " + std::to_string(dim));
    features.push_back(f), labels.push_back(l);
    extracted += f.size(0);
    if (rows) try {  // a disk that fails costs the resume, not the features
        bytes.resize(static_cast<size_t>(f.size(0)) * row_bytes);
        for (int64_t i = 0; i < f.size(0); ++i) {
          char* row = bytes.data() + static_cast<size_t>(i) * row_bytes;
          std::memcpy(row, f.data_ptr<float>() + i * dim, feature_bytes);
          std::memcpy(row + feature_bytes, l.data_ptr<int64_t>() + i, sizeof(int64_t));
        }
        rows->append(bytes, f.size(0));
        rows->save_every(save_every_s);
      } catch (const std::exception& e) {
        std::cerr << "warning: " + o.what + ": cannot keep them on disk as they come (" + e.what() +
                         "); going on in memory\n";
        rows.reset();
      }
    io::fault_point("features_batch", o.what + ", batch " + std::to_string(++batches));
  };
  extract_features(net, dataset, view, device, o);
  if (extracted != n)
    throw std::runtime_error(o.what + ": extracted " + std::to_string(extracted) + " of " + std::to_string(n) +
                             " images");
  if (rows) try {  // all of it, should the cache not be written
      rows->save();
    } catch (const std::exception&) {  // (as the cache write will say, if it fails too)
    }
  Features f{at::cat(features), at::cat(labels)};
  if (done(f) && lock && lock->held()) {
    rows.reset();
    std::error_code ec;
    for (const std::string& file : {io::RowFile::state_path_for(partial), partial, partial + ".lock"})
      fs::remove(file, ec);
  }
  return f;
}

}  // namespace

std::pair<Features, Features> eval_features(const std::string& backbone, const EvalConfig& c,
                                            const std::string& cache_dir, int64_t* num_classes,
                                            const std::shared_ptr<distributed::Communicator>& comm) {
  auto net = open_backbone(backbone);
  return eval_features(*net, c, cache_dir, num_classes, comm);
}

namespace {

// eval_features, with the train dataset already open when `train_set` is given (the augmented
// probe's: a folder of a million images is listed once).
std::pair<Features, Features> features_of(models::Network& net, const EvalConfig& c, const std::string& cache_dir,
                                          int64_t* num_classes, const std::shared_ptr<distributed::Communicator>& comm,
                                          std::shared_ptr<const data::Dataset> train_set) {
  const bool main_rank = !comm || comm->rank() == 0;  // looks for and writes the cache, speaks
  set_compute_threads(0);
  const at::Device device = resolve_eval_device(c.device);
  net.to(device);
  const int channels = static_cast<int>(net.to_json().value("in_channels", 3));
  // Cache key: the backbone's weights, the data (its settings, ids and labels, its files' sizes
  // and times, a few samples' pixels) and the evaluation transform.
  const uLong crc = backbone_checksum(net);
  auto extract = [&](const json& spec, const std::string& split, std::shared_ptr<const data::Dataset> opened) {
    auto dataset =
        opened ? std::move(opened) : data::create_dataset(spec, split == "train" ? "train_data" : "test_data");
    if (num_classes) *num_classes = std::max(*num_classes, dataset->num_classes());
    const auto view = eval_view(*dataset, c.image_size, c.normalization);
    // The cache's key: rank 0's (it alone reads and writes the cache), which the other ranks
    // name their partial files after; -1: no cache.
    const bool shared = comm && comm->world_size() > 1;
    int64_t key = -1;
    if (!cache_dir.empty() && main_rank) try {
        const std::string settings = spec.dump() + view.to_json().dump();
        const uint32_t data = data_fingerprint(*dataset);
        key = static_cast<int64_t>(crc32_update(crc32_update(crc, settings), &data, sizeof data));
      } catch (const std::exception& e) {  // (the extraction says more, if it fails too)
        std::cerr << "warning: no feature cache for the " << split << " data: " << e.what() << "\n";
      }
    if (shared) {
      at::Tensor k = at::full({1}, key, at::kLong).to(comm->device());
      comm->broadcast(k, 0);
      key = k.cpu().item<int64_t>();
    }
    fs::path cache;
    if (key >= 0 && !cache_dir.empty())
      cache = fs::path(cache_dir) / ("features-" + split + "-" + std::to_string(key) + ".safetensors");
    std::optional<Features> cached;
    std::error_code missing;
    if (!cache.empty() && main_rank && fs::exists(cache, missing)) {
      try {
        const auto f = models::load_safetensors(cache.string());
        if (f.at("features").size(0) != dataset->size()) throw std::runtime_error("another number of samples");
        std::cerr << "  " << split << " features from " << cache.string() << "\n";
        cached = Features{f.at("features"), f.at("labels")};
        remove_stale(cache);
      } catch (const std::exception& e) {
        std::cerr << "warning: ignoring feature cache " << cache.string() << ": " << e.what() << "\n";
      }
    }
    if (comm ? comm->any(cached.has_value()) : cached.has_value()) return cached.value_or(Features{});
    ExtractOptions o;
    o.batch_size = c.batch_size, o.workers = c.workers, o.channels = channels, o.what = split + " features";
    if (main_rank)
      std::cerr << "  extracting " << split << " features (" << dataset->size() << " images"
                << (!shared                ? ""
                    : dataset->streaming() ? " on rank 0 alone, a stream of shards read in its own order"
                                           : ", " + std::to_string(comm->world_size()) + " ranks")
                << ")\n";
    if (cache.empty())
      return comm ? extract_features_shared(net, dataset, view, device, o, *comm)
                  : extract_features(net, dataset, view, device, o);
    // Kept on disk as they come: by one process, by rank 0 alone (a stream of shards, read in its
    // own order), or by every rank its share (each its own partial file).
    const auto written = [&](const Features& f) {
      if (!main_rank || !write_cache(cache, f)) return false;
      remove_stale(cache);
      return true;
    };
    if (!shared)
      return extract_kept(net, dataset, view, device, o, cache.string() + ".partial", c.features_save_every_s, written);
    if (dataset->streaming()) {  // rank 0 alone, however long it takes, the others waiting
      Features out;
      distributed::on_rank0_long(
          &*comm,
          [&](const std::function<void()>& keep_alive) {
            o.what += " (rank 0 alone: a stream of shards)";
            o.after_batch = keep_alive;
            out = extract_kept(net, dataset, view, device, o, cache.string() + ".partial", c.features_save_every_s,
                               written);
          },
          "extract " + split + " features");
      return out;
    }
    const int64_t n = dataset->size(), dim = net.output_dim(), rank = comm->rank(), world = comm->world_size();
    std::vector<int64_t> share = rank_share(n, rank, world);
    Features all;
    const auto gathered = [&](const Features& part) {
      all = gather_shares(part, n, dim, o, *comm);
      return comm->any(written(all));
    };
    if (share.empty()) {
      gathered(Features{at::empty({0, dim}), at::empty({0}, at::kLong)});
    } else {
      ExtractOptions mine = o;
      mine.progress = main_rank;
      mine.what += " (rank " + std::to_string(rank) + " of " + std::to_string(world) + ")";
      extract_kept(net, data::subset(dataset, std::move(share)), view, device, mine,
                   io::rank_rows_path(cache.string(), rank, world), c.features_save_every_s, gathered);
    }
    return all;
  };
  Features train = extract(c.train_data, "train", std::move(train_set));
  Features test = extract(c.test_data, "test", nullptr);
  return {train, test};
}

}  // namespace

std::pair<Features, Features> eval_features(models::Network& net, const EvalConfig& c, const std::string& cache_dir,
                                            int64_t* num_classes,
                                            const std::shared_ptr<distributed::Communicator>& comm) {
  return features_of(net, c, cache_dir, num_classes, comm, nullptr);
}

// probe.augment's checkpoint metadata keys.
constexpr const char* kProbeSettingsKey = "twins_probe_settings";
constexpr const char* kProbeEpochsKey = "twins_probe_epochs_done";
constexpr const char* kProbeWorldKey = "twins_probe_world_size";
constexpr const char* kProbeSecondsKey = "twins_probe_seconds";       // spent by the calls before
constexpr const char* kProbeBatchesKey = "twins_probe_batches_done";  // of the next epoch; absent: 0

LinearProbeRun run_linear_probe(const std::string& backbone, const EvalConfig& c, const std::string& cache_dir,
                                const std::shared_ptr<distributed::Communicator>& comm,
                                const LinearProbeControl& control) {
  const auto& o = c.probe;
  const int world = comm ? comm->world_size() : 1;
  // Rank 0 trains and scores the probe on the gathered features; with probe.augment, every rank
  // takes part in the backbone forwards, except over tar shards (read in their own order by
  // rank 0 alone, as their features).
  auto dataset = o.augment ? data::create_dataset(c.train_data, "train_data") : nullptr;
  const bool shared = comm && world > 1 && dataset && !dataset->streaming();
  if (shared && o.batch_size % world != 0)  // before the features' time is spent
    throw std::invalid_argument("probe.batch_size: " + std::to_string(o.batch_size) +
                                " is the global batch; it must divide evenly over the " + std::to_string(world) +
                                " ranks");
  auto net = open_backbone(backbone);
  LinearProbeRun run;
  const auto features_start = std::chrono::steady_clock::now();
  std::tie(run.train, run.test) = features_of(*net, c, cache_dir, &run.num_classes, comm, dataset);
  run.feature_seconds = detail::seconds_since(features_start);
  run.main_rank = !comm || comm->rank() == 0;
  if (!run.main_rank && !shared) return run;
  const at::Device device = resolve_eval_device(c.device);
  if (!o.augment) {
    run.protocol = "cached centre-crop features, " + std::to_string(o.epochs) + " epochs";
    run.result = linear_probe(run.train, run.test, run.num_classes, o, device);
    return run;
  }
  // The published protocol: a random resized crop and flip of every training image each epoch,
  // through the frozen backbone (BatchNorm in evaluation mode), into the classifier. With several
  // ranks, each embeds its share of every batch (probe.batch_size / ranks, the loader's
  // DistributedSampler order) and rank 0 steps the classifier on the whole batch, gathered.
  const auto start = std::chrono::steady_clock::now();
  const int ranks = shared ? world : 1;
  const augment::View view = random_crop_flip_view(c.image_size, o.crop_scale, c.normalization);
  data::LoaderOptions lo;
  lo.batch_size = o.batch_size / ranks, lo.seed = o.seed, lo.drop_last = false;
  lo.workers = loader_workers(c.workers, device);
  lo.channels = static_cast<int>(net->to_json().value("in_channels", 3));
  lo.rank = shared ? comm->rank() : 0, lo.world_size = ranks;
  lo.pin_memory = device.is_cuda();
  data::Loader loader(dataset, {view}, lo);
  const int64_t batches = loader.batches_per_epoch();
  std::unique_ptr<ProbeHead> head;
  if (run.main_rank) {
    const Features labelled_train{run.train.features.index({run.train.labels.ge(0)}), {}};
    head = std::make_unique<ProbeHead>(labelled_train.features.mean(0), labelled_train.features.std(0), run.num_classes,
                                       o, batches * o.epochs, device);
  }
  net->eval();

  // Resumed from where the checkpoint was written (after an epoch, or within one): rank 0 reads
  // it, the other ranks take its place.
  const nlohmann::json settings = {{"backbone", backbone},
                                   {"weights_crc32", backbone_checksum(*net)},
                                   {"train_data", c.train_data},
                                   {"train_samples", dataset->size()},  // a folder that gained or lost images
                                   {"num_classes", run.num_classes},
                                   {"image_size", c.image_size},
                                   {"normalize", {{"mean", c.normalization.mean}, {"std", c.normalization.std}}},
                                   {"probe",
                                    {{"epochs", o.epochs},
                                     {"batch_size", o.batch_size},
                                     {"lr", o.lr},
                                     {"weight_decay", o.weight_decay},
                                     {"momentum", o.momentum},
                                     {"seed", o.seed},
                                     {"crop_scale", o.crop_scale}}}};
  const std::string& checkpoint = control.checkpoint;
  // Rank 0 reads and writes the checkpoint; its failure stops every rank at once.
  const std::shared_ptr<distributed::Communicator> job = shared ? comm : nullptr;
  int64_t first_epoch = 0, first_batch = 0;
  double earlier_seconds = 0;  // (rank 0's)
  if (!checkpoint.empty())
    distributed::on_rank0(
        job,
        [&] {
          if (!fs::exists(checkpoint)) return;
          const models::SafeTensorsFile file = models::load_safetensors(checkpoint);  // its checksum checked
          const auto it = file.metadata.find(kProbeSettingsKey);
          if (it == file.metadata.end() || nlohmann::json::parse(it->second, nullptr, false) != settings)
            throw std::runtime_error("linear probe: " + checkpoint +
                                     " was written for another backbone or other settings; remove it to start over, "
                                     "or write to another folder (--out)");
          const auto done = file.metadata.find(kProbeEpochsKey);
          const nlohmann::json epochs =
              done == file.metadata.end() ? nlohmann::json() : nlohmann::json::parse(done->second, nullptr, false);
          const auto within = file.metadata.find(kProbeBatchesKey);  // absent: written after an epoch
          const nlohmann::json in_epoch =
              within == file.metadata.end() ? nlohmann::json(0) : nlohmann::json::parse(within->second, nullptr, false);
          if (!in_epoch.is_number_integer() || in_epoch.get<int64_t>() < 0)
            throw std::runtime_error("linear probe: " + checkpoint + ": malformed " + kProbeBatchesKey);
          const bool mid_epoch = in_epoch.get<int64_t>() > 0;
          if (!epochs.is_number_integer() || epochs.get<int64_t>() < (mid_epoch ? 0 : 1) ||
              epochs.get<int64_t>() > (mid_epoch ? o.epochs - 1 : o.epochs))
            throw std::runtime_error("linear probe: " + checkpoint + ": malformed " + kProbeEpochsKey);
          try {
            head->load_state(file.tensors);
          } catch (const std::exception& e) {
            throw std::runtime_error("linear probe: " + checkpoint + ": " + e.what());
          }
          first_epoch = epochs.get<int64_t>();
          // Batch k is the same global batch over any number of ranks (DistributedSampler's order).
          first_batch = in_epoch.get<int64_t>();  // as many batches an epoch over any number of ranks
          if (first_batch >= batches)
            throw std::runtime_error("linear probe: " + checkpoint + ": malformed " + kProbeBatchesKey + " (batch " +
                                     std::to_string(first_batch) + " of an epoch of " + std::to_string(batches) +
                                     ": did train_data change?)");
          if (const auto spent = file.metadata.find(kProbeSecondsKey); spent != file.metadata.end()) {
            const nlohmann::json v = nlohmann::json::parse(spent->second, nullptr, false);
            if (v.is_number() && v.get<double>() >= 0) earlier_seconds = v.get<double>();
          }
          if (first_batch == 0)
            std::cerr << "  resuming from " << checkpoint << " after epoch " << first_epoch << " of " << o.epochs
                      << "\n";
          else
            std::cerr << "  resuming from " << checkpoint << " at batch " << first_batch << " of " << batches
                      << " in epoch " << first_epoch + 1 << " of " << o.epochs << "\n";
        },
        "read " + checkpoint);
  if (shared) {
    at::Tensor place = at::tensor(std::vector<int64_t>{first_epoch, first_batch}, at::kLong).to(comm->device());
    comm->broadcast(place, 0);
    place = place.cpu();
    first_epoch = place[0].item<int64_t>(), first_batch = place[1].item<int64_t>();
  }
  run.start_epoch = first_epoch, run.start_batch = first_batch;
  auto save_checkpoint = [&](int64_t epochs_done, int64_t batches_done) {
    distributed::on_rank0(
        job,
        [&] {
          if (const fs::path parent = fs::path(checkpoint).parent_path(); !parent.empty())
            fs::create_directories(parent);
          std::map<std::string, std::string> metadata = {
              {kProbeSettingsKey, settings.dump()},
              {kProbeEpochsKey, std::to_string(epochs_done)},
              {kProbeWorldKey, std::to_string(ranks)},
              {kProbeSecondsKey, nlohmann::json(earlier_seconds + detail::seconds_since(start)).dump()}};
          if (batches_done > 0) metadata[kProbeBatchesKey] = std::to_string(batches_done);
          models::save_safetensors(checkpoint, head->state(), metadata);
        },
        "write " + checkpoint);
  };
  detail::AfterBatch after_batch(control.stop, job.get(), device.is_cuda(), batches, o.checkpoint_every_steps,
                                 "probe_batch");

  std::optional<detail::EpochProgress> progress;
  if (run.main_rank) progress.emplace("augmented probe", first_epoch, o.epochs, batches, first_batch);
  for (int64_t epoch = first_epoch; epoch < o.epochs; ++epoch) {
    if ((control.stop_after_epochs > 0 && epoch - first_epoch == control.stop_after_epochs) ||
        after_batch.stop_after_epoch()) {
      if (run.main_rank)
        std::cerr << "  linear probe: stopped after epoch " << epoch << " of " << o.epochs
                  << (checkpoint.empty() ? std::string() : ", state in " + checkpoint) << "\n";
      run.finished = false;
      run.epochs_done = epoch;
      return run;
    }
    const bool resumed_here = epoch == first_epoch && first_batch > 0;
    loader.start_epoch(epoch, resumed_here ? first_batch : 0);
    int64_t done = resumed_here ? first_batch : 0;
    while (auto batch = loader.next()) {
      at::Tensor features, labels = batch->labels;
      {
        at::NoGradGuard no_grad;
        features = net->forward(augment::normalize_batch(batch->views[0], view.normalization, device, at::kFloat))
                       .to(at::kFloat);
      }
      if (shared) {  // rows padded to the per-rank batch (label -1: left out) for the gather
        const int64_t b = lo.batch_size, pad = b - features.size(0), d = features.size(1);
        if (pad > 0) {
          features = at::cat({features, at::zeros({pad, d}, features.options())});
          labels = at::cat({labels, at::full({pad}, -1, labels.options())});
        }
        features = comm->all_gather(features.to(comm->device()));
        labels = comm->all_gather(labels.to(comm->device())).cpu();
        // Rank r's row j is sample (index * b + j) * W + r of the epoch's padded order: rows
        // into one process's order, and the sampler's repeats (past the dataset's end) left out.
        features = features.view({ranks, b, d}).transpose(0, 1).reshape({ranks * b, d});
        labels = labels.view({ranks, b}).transpose(0, 1).reshape({ranks * b}).clone();
        const int64_t first = batch->index * b * ranks;
        labels.masked_fill_(at::arange(first, first + ranks * b, labels.options()).ge(dataset->size()), -1);
      }
      if (head) head->step(features, labels);
      ++done;
      if (progress) progress->batch_done(epoch, done);
      const detail::AfterBatch::Next next = after_batch(epoch, done);
      if (!next.checkpoint) continue;
      if (!checkpoint.empty()) save_checkpoint(epoch, done);
      if (next.stop) {
        if (run.main_rank)
          std::cerr << "  linear probe: stopped at batch " << done << " of " << batches << " in epoch " << epoch + 1
                    << " of " << o.epochs << (checkpoint.empty() ? std::string() : ", state in " + checkpoint) << "\n";
        run.finished = false;
        run.epochs_done = epoch, run.stopped_at_batch = done;
        return run;
      }
    }
    if (!checkpoint.empty() && epoch + 1 < o.epochs) save_checkpoint(epoch + 1, 0);
  }
  run.epochs_done = o.epochs;
  if (!run.main_rank) return run;
  run.result.num_classes = run.num_classes;
  std::tie(run.head_weight, run.head_bias) = head->parameters();
  run.result.train = head->score(run.train);
  run.result.test = head->score(run.test);
  run.result.seconds = earlier_seconds + detail::seconds_since(start);  // the whole probe's, over resumes
  std::ostringstream p;
  p << "augmented: random resized crop [" << o.crop_scale[0] << ", " << o.crop_scale[1]
    << "] + flip through the frozen backbone, " << o.epochs << " epochs"
    << (shared ? ", " + std::to_string(world) + " ranks" : "");
  run.protocol = p.str();
  return run;
}

void read_knn_options(config::ConfigReader& k, KnnOptions& options) {
  std::string variant = "dino";
  k.get("variant", variant);
  config::require(variant == "dino" || variant == "lightly", k.path_of("variant"), "must be dino or lightly");
  if (variant == "lightly") options.k = {200}, options.temperature = 0.1;
  nlohmann::json given_k;
  k.get("k", given_k);
  if (given_k.is_number()) {  // one k
    int64_t one = 0;
    k.get("k", one);
    options.k = {one};
  } else if (!given_k.is_null()) {
    k.get("k", options.k);
  }
  k.get("temperature", options.temperature);
  k.get("chunk", options.chunk);
  config::require(!options.k.empty() && options.k.size() <= 64, k.path_of("k"), "needs 1 to 64 values");
  for (int64_t v : options.k) config::require(v >= 1 && v <= 1000000, k.path_of("k"), "values must be in [1, 10^6]");
  config::require(options.temperature > 0, k.path_of("temperature"), "must be > 0");
  config::require(options.chunk >= 1 && options.chunk <= (1 << 20), k.path_of("chunk"), "must be in [1, 2^20]");
}

}  // namespace twins::eval

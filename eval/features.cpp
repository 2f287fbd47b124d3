#include "twins/eval/features.h"

#include <ATen/ATen.h>
#include <sys/stat.h>
#include <torch/nn/module.h>
#include <zlib.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <iostream>
#include <nlohmann/json.hpp>
#include <vector>

#include "twins/data/loader.h"
#include "twins/distributed/communicator.h"
#include "twins/eval/transform.h"
#include "twins/io.h"
#include "twins/runtime.h"

namespace twins::eval {

augment::View eval_view(const data::Dataset& dataset, int size, const augment::Normalization& normalization) {
  return EvalTransform::for_dataset(dataset, size, normalization).view();
}

using io::crc32_update;

uint32_t data_fingerprint(const data::Dataset& d) {
  uLong crc = crc32(0L, Z_NULL, 0);
  const int64_t n = d.size();
  for (int64_t i = 0; i < n; ++i) {
    crc = crc32_update(crc, d.id(i) + "\n");
    if (!d.streaming()) crc = crc32_update(crc, std::to_string(d.label(i)) + "\n");
  }
  for (const std::string& file : d.source_files()) {
    struct stat s {};
    if (::stat(file.c_str(), &s) != 0) {
      crc = crc32_update(crc, "missing\n");  // (reading it will say more)
      continue;
    }
    const int64_t stamp[3] = {static_cast<int64_t>(s.st_size), static_cast<int64_t>(s.st_mtim.tv_sec),
                              static_cast<int64_t>(s.st_mtim.tv_nsec)};
    crc = crc32_update(crc, stamp, sizeof stamp);
  }
  if (d.streaming()) return static_cast<uint32_t>(crc);
  const int64_t probes = std::min<int64_t>(16, n);
  for (int64_t k = 0; k < probes; ++k) {
    const int64_t i = k * n / probes;
    try {
      const at::Tensor pixels = d.image(i).contiguous();
      const std::vector<int64_t> sizes = pixels.sizes().vec();
      crc = crc32_update(crc, sizes.data(), sizes.size() * sizeof(int64_t));
      crc = crc32_update(crc, pixels.data_ptr(), static_cast<size_t>(pixels.numel()) * pixels.element_size());
    } catch (const data::BadSample&) {  // undecodable (skipped or refused later, as the settings say)
      crc = crc32_update(crc, "bad sample\n");
    }
  }
  return static_cast<uint32_t>(crc);
}

Features extract_features(models::Network& backbone, std::shared_ptr<const data::Dataset> dataset,
                          const augment::View& view, const at::Device& device, const ExtractOptions& options) {
  data::LoaderOptions lo;
  lo.batch_size = options.batch_size, lo.shuffle = false, lo.drop_last = false;
  lo.workers = loader_workers(options.workers, device);
  lo.channels = options.channels;
  const int64_t n = dataset->size();
  if (options.batch_size < 1)
    throw std::invalid_argument(options.what + ": batch_size must be >= 1, got " + std::to_string(options.batch_size));
  if (options.first < 0 || options.first > n || (options.first % options.batch_size != 0 && options.first != n))
    throw std::invalid_argument(options.what + ": cannot start at sample " + std::to_string(options.first) + " of " +
                                std::to_string(n) + " (a multiple of the batch size " +
                                std::to_string(options.batch_size) + ")");
  if (n > 0 && options.first == n) {  // all done already
    if (options.sink) return {};
    return {at::empty({0, backbone.output_dim()}), at::empty({0}, at::kLong)};
  }
  data::Loader loader(dataset, {view}, lo);
  const bool was_training = backbone.is_training();
  backbone.eval();
  at::NoGradGuard no_grad;
  Features out;
  std::vector<at::Tensor> features, labels;
  loader.start_epoch(0, options.first / options.batch_size);
  int64_t done = options.first;
  auto last = std::chrono::steady_clock::now();
  while (done < n) {
    auto batch = loader.next();
    if (!batch) break;
    const at::Tensor x = augment::normalize_batch(batch->views[0], view.normalization, device, at::kFloat);
    Features part{backbone.forward(x).to(at::kCPU, at::kFloat), batch->labels};
    if (options.sink) {
      options.sink(done, part);
    } else {
      features.push_back(std::move(part.features));
      labels.push_back(std::move(part.labels));
    }
    done += batch->labels.size(0);
    const auto now = std::chrono::steady_clock::now();
    if (options.progress && std::chrono::duration<double>(now - last).count() > 5) {
      std::cerr << "  " << options.what << ": " << done << "/" << n << "\n";
      last = now;
    }
    if (options.after_batch) options.after_batch();
    if (options.stop && options.stop->load()) break;
  }
  backbone.train(was_training);
  if (options.sink) return out;
  out.features = features.empty() ? at::empty({0, backbone.output_dim()}) : at::cat(features);
  out.labels = labels.empty() ? at::empty({0}, at::kLong) : at::cat(labels);
  return out;
}

Features extract_features_shared(models::Network& backbone, std::shared_ptr<const data::Dataset> dataset,
                                 const augment::View& view, const at::Device& device, const ExtractOptions& options,
                                 distributed::Communicator& communicator) {
  const int64_t world = communicator.world_size(), rank = communicator.rank(), n = dataset->size();
  if (options.first != 0 || options.sink || options.stop)
    throw std::invalid_argument(options.what + ": first, sink and stop are extract_features' alone");
  ExtractOptions mine = options;
  mine.progress = options.progress && rank == 0;
  if (world == 1 || n == 0) return extract_features(backbone, std::move(dataset), view, device, mine);
  if (dataset->streaming()) {  // rank 0 alone, however long it takes, the others waiting
    Features out;
    distributed::on_rank0_long(
        &communicator,
        [&](const std::function<void()>& keep_alive) {
          mine.what += " (rank 0 alone: a stream of shards)";
          mine.after_batch = keep_alive;
          out = extract_features(backbone, std::move(dataset), view, device, mine);
        },
        "extract " + options.what);
    return out;
  }
  std::vector<int64_t> share = rank_share(n, rank, world);
  const int64_t dim = backbone.output_dim();
  Features part{at::empty({0, dim}), at::empty({0}, at::kLong)};
  if (!share.empty()) part = extract_features(backbone, data::subset(dataset, std::move(share)), view, device, mine);
  return gather_shares(part, n, dim, options, communicator);
}

std::vector<int64_t> rank_share(int64_t n, int64_t rank, int64_t world) {
  std::vector<int64_t> share;
  for (int64_t i = rank; i < n; i += world) share.push_back(i);
  return share;
}

Features gather_shares(const Features& share, int64_t n, int64_t dim, const ExtractOptions& options,
                       distributed::Communicator& communicator) {
  const int64_t world = communicator.world_size(), rank = communicator.rank();
  const auto count = static_cast<int64_t>(rank_share(n, rank, world).size());
  if (share.features.dim() != 2 || share.features.size(0) != count || share.features.size(1) != dim ||
      share.labels.numel() != count)
    throw std::runtime_error(options.what + ": the backbone gave features of shape " +
                             c10::str(share.features.sizes()) + " for " + std::to_string(count) +
                             " images, where its output_dim is " + std::to_string(dim));
  // Rank r's row j is sample j x W + r; every rank pads its share to `rows` (the padding maps to
  // sample numbers >= n, cut off at the end).
  const int64_t rows = (n + world - 1) / world;
  at::Tensor features = at::zeros({rows, dim}, at::kFloat), labels = at::full({rows}, -1, at::kLong);
  if (count > 0) {
    features.narrow(0, 0, count).copy_(share.features);
    labels.narrow(0, 0, count).copy_(share.labels);
  }
  const at::Device on = communicator.device();
  const int64_t chunk = std::max<int64_t>(1, options.gather_bytes / (4 * dim * world));
  std::vector<at::Tensor> all_features, all_labels;
  for (int64_t first = 0; first < rows; first += chunk) {
    const int64_t len = std::min(chunk, rows - first);
    const at::Tensor f = communicator.all_gather(features.narrow(0, first, len).to(on));  // [W x len, D]
    const at::Tensor l = communicator.all_gather(labels.narrow(0, first, len).to(on));
    if (rank != 0) continue;
    // Rank-major to sample order: row (r, j) is sample (first + j) x W + r.
    all_features.push_back(f.view({world, len, dim}).transpose(0, 1).reshape({len * world, dim}).cpu());
    all_labels.push_back(l.view({world, len}).t().reshape({len * world}).cpu());
  }
  if (rank != 0) return {};
  if (rows == 0) return {at::empty({0, dim}), at::empty({0}, at::kLong)};
  return {at::cat(all_features).narrow(0, 0, n), at::cat(all_labels).narrow(0, 0, n)};
}

}  // namespace twins::eval

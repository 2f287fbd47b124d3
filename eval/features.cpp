#include "twins/eval/features.h"

#include <ATen/ATen.h>
#include <torch/nn/module.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <iostream>
#include <nlohmann/json.hpp>
#include <vector>

#include "twins/data/loader.h"
#include "twins/distributed/communicator.h"
#include "twins/eval/transform.h"

namespace twins::eval {

augment::View eval_view(const data::Dataset& dataset, int size, const augment::Normalization& normalization) {
  return EvalTransform::for_dataset(dataset, size, normalization).view();
}

Features extract_features(models::Network& backbone, std::shared_ptr<const data::Dataset> dataset,
                          const augment::View& view, const at::Device& device, const ExtractOptions& options) {
  data::LoaderOptions lo;
  lo.batch_size = options.batch_size, lo.workers = options.workers, lo.shuffle = false, lo.drop_last = false;
  lo.channels = options.channels;
  const int64_t n = dataset->size();
  data::Loader loader(dataset, {view}, lo);
  const bool was_training = backbone.is_training();
  backbone.eval();
  at::NoGradGuard no_grad;
  Features out;
  std::vector<at::Tensor> features, labels;
  loader.start_epoch(0);
  int64_t done = 0;
  auto last = std::chrono::steady_clock::now();
  while (auto batch = loader.next()) {
    const at::Tensor x = augment::normalize_batch(batch->views[0], view.normalization, device, at::kFloat);
    features.push_back(backbone.forward(x).to(at::kCPU, at::kFloat));
    labels.push_back(batch->labels);
    done += batch->labels.size(0);
    const auto now = std::chrono::steady_clock::now();
    if (options.progress && std::chrono::duration<double>(now - last).count() > 5) {
      std::cerr << "  " << options.what << ": " << done << "/" << n << "\n";
      last = now;
    }
  }
  backbone.train(was_training);
  out.features = at::cat(features);
  out.labels = at::cat(labels);
  return out;
}

Features extract_features_shared(models::Network& backbone, std::shared_ptr<const data::Dataset> dataset,
                                 const augment::View& view, const at::Device& device, const ExtractOptions& options,
                                 distributed::Communicator& communicator) {
  const int64_t world = communicator.world_size(), rank = communicator.rank(), n = dataset->size();
  ExtractOptions mine = options;
  mine.progress = options.progress && rank == 0;
  if (world == 1 || n == 0) return extract_features(backbone, std::move(dataset), view, device, mine);
  if (dataset->streaming()) {
    if (rank != 0) return {};
    mine.what += " (rank 0 alone: a stream of shards)";
    return extract_features(backbone, std::move(dataset), view, device, mine);
  }
  // Rank r's row j is sample j x W + r; every rank pads its share to `rows` (the padding maps to
  // sample numbers >= n, cut off at the end).
  std::vector<int64_t> share;
  for (int64_t i = rank; i < n; i += world) share.push_back(i);
  const int64_t rows = (n + world - 1) / world, dim = backbone.output_dim();
  at::Tensor features = at::zeros({rows, dim}, at::kFloat), labels = at::full({rows}, -1, at::kLong);
  if (!share.empty()) {
    const auto count = static_cast<int64_t>(share.size());
    const Features part = extract_features(backbone, data::subset(dataset, std::move(share)), view, device, mine);
    if (part.features.dim() != 2 || part.features.size(0) != count || part.features.size(1) != dim)
      throw std::runtime_error(options.what + ": the backbone gave features of shape " +
                               c10::str(part.features.sizes()) + " for " + std::to_string(count) +
                               " images, where its output_dim is " + std::to_string(dim));
    features.narrow(0, 0, count).copy_(part.features);
    labels.narrow(0, 0, count).copy_(part.labels);
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
  return {at::cat(all_features).narrow(0, 0, n), at::cat(all_labels).narrow(0, 0, n)};
}

}  // namespace twins::eval

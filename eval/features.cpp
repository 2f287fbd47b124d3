#include "twins/eval/features.h"

#include <ATen/ATen.h>
#include <torch/nn/module.h>

#include <chrono>
#include <cmath>
#include <iostream>
#include <nlohmann/json.hpp>

#include "twins/data/loader.h"
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

}  // namespace twins::eval

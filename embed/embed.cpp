// The Embedder: a backbone file read once (network + BackboneInfo), and the evaluation
// transform of <twins/eval/transform.h> for every input, so its features equal those of
// `twins linear-probe`, `twins knn` and `twins embed` for the same image.
#include "twins/embed.h"

#include <ATen/ATen.h>
#include <torch/nn/module.h>

#include <nlohmann/json.hpp>
#include <stdexcept>

#include "twins/augment/functional.h"
#include "twins/augment/random.h"
#include "twins/data/image_io.h"
#include "twins/eval/features.h"
#include "twins/eval/transform.h"
#include "twins/models/weights.h"
#include "twins/runtime.h"

namespace twins {

struct Embedder::Impl {
  std::shared_ptr<models::Network> backbone;
  at::Device device{at::kCPU};
  EmbedderOptions options;
  augment::Normalization normalization;
  int channels = 3;

  eval::EvalTransform standard() const { return eval::EvalTransform::standard(options.image_size, normalization); }

  // uint8 HWC images -> the transform's crops, uint8 [N, C, size, size].
  at::Tensor prepare(const std::vector<at::Tensor>& hwc, const eval::EvalTransform& transform) const {
    const augment::View view = transform.view();
    std::vector<at::Tensor> crops;
    for (const auto& img : hwc)
      crops.push_back(
          view.apply(augment::functional::to_channels(img.contiguous(), channels), augment::Rng(0)).permute({2, 0, 1}));
    return at::stack(crops);
  }

  // uint8 [N, C, H, W] (normalised here, on the device) or float already normalised -> [N, D] CPU.
  at::Tensor forward(const at::Tensor& batch) const {
    at::NoGradGuard no_grad;
    const at::Tensor x = batch.scalar_type() == at::kByte
                             ? augment::normalize_batch(batch, normalization, device, at::kFloat)
                             : batch.to(device, at::kFloat);
    return backbone->forward(x).to(at::kCPU, at::kFloat);
  }
};

Embedder::Embedder(const std::string& path, EmbedderOptions options) : impl_(new Impl) {
  auto& m = *impl_;
  models::LoadedBackbone loaded = models::read_backbone(path);
  m.backbone = loaded.network;
  m.device = resolve_device(options.device, "EmbedderOptions::device");
  m.backbone->to(m.device);
  m.channels = static_cast<int>(m.backbone->to_json().value("in_channels", 3));
  // Defaults from the file (what the recipe trained on), else ImageNet's.
  if (options.image_size <= 0)
    options.image_size = loaded.info.image_size > 0 ? loaded.info.image_size : augment::kDefaultImageSize;
  if (options.mean.empty() || options.std.empty()) {
    if (!loaded.info.mean.empty())
      options.mean = loaded.info.mean, options.std = loaded.info.std;
    else
      options.mean = {0.485, 0.456, 0.406}, options.std = {0.229, 0.224, 0.225};
  }
  if (options.mean.size() != options.std.size() || (options.mean.size() != 1 && options.mean.size() != 3))
    throw std::invalid_argument("EmbedderOptions: mean and std need 1 or 3 values each");
  if (options.batch_size < 1) throw std::invalid_argument("EmbedderOptions::batch_size must be >= 1");
  m.normalization.mean = options.mean, m.normalization.std = options.std;
  m.options = options;
}

Embedder::~Embedder() = default;
Embedder::Embedder(Embedder&&) noexcept = default;
Embedder& Embedder::operator=(Embedder&&) noexcept = default;

int64_t Embedder::dim() const { return impl_->backbone->output_dim(); }
int Embedder::image_size() const { return impl_->options.image_size; }

at::Tensor Embedder::embed(const at::Tensor& images) const {
  const auto& m = *impl_;
  if (!images.defined() || images.dim() != 4)
    throw std::invalid_argument("Embedder::embed: expected a batch [N, H, W, C] or [N, C, H, W]");
  const int64_t n = images.size(0), step = m.options.batch_size;
  std::vector<at::Tensor> out;
  if (images.is_floating_point()) {
    if (images.size(1) != m.channels)
      throw std::invalid_argument("Embedder::embed: float input must be [N, " + std::to_string(m.channels) +
                                  ", H, W], normalised");
    for (int64_t s = 0; s < n; s += step) out.push_back(m.forward(images.slice(0, s, std::min(n, s + step))));
    return out.empty() ? at::empty({0, dim()}) : at::cat(out);
  }
  if (images.scalar_type() != at::kByte) throw std::invalid_argument("Embedder::embed: expected uint8 or float images");
  // Channels last if the last dimension looks like channels and the second does not.
  const bool nhwc = (images.size(3) == 1 || images.size(3) == 3) && !(images.size(1) == 1 || images.size(1) == 3);
  const at::Tensor hwc = nhwc ? images.cpu() : images.cpu().permute({0, 2, 3, 1});
  // A batch is a source of one fixed size, like an in-memory dataset.
  const auto transform = eval::EvalTransform::for_fixed_size(
      static_cast<int>(hwc.size(1)), static_cast<int>(hwc.size(2)), m.options.image_size, m.normalization);
  for (int64_t s = 0; s < n; s += step) {
    std::vector<at::Tensor> batch;
    for (int64_t i = s; i < std::min(n, s + step); ++i) batch.push_back(hwc[i]);
    out.push_back(m.forward(m.prepare(batch, transform)));
  }
  return out.empty() ? at::empty({0, dim()}) : at::cat(out);
}

at::Tensor Embedder::embed_files(const std::vector<std::string>& paths) const {
  const auto& m = *impl_;
  const auto transform = m.standard();  // files: every image resized, whatever its size
  std::vector<at::Tensor> out;
  const size_t step = static_cast<size_t>(m.options.batch_size);
  for (size_t s = 0; s < paths.size(); s += step) {
    std::vector<at::Tensor> batch;
    for (size_t i = s; i < std::min(paths.size(), s + step); ++i)
      batch.push_back(data::read_image(paths[i], m.options.max_image_pixels));
    out.push_back(m.forward(m.prepare(batch, transform)));
  }
  return out.empty() ? at::empty({0, dim()}) : at::cat(out);
}

at::Tensor Embedder::embed_dataset(std::shared_ptr<const data::Dataset> dataset,
                                   const EmbedDatasetOptions& options) const {
  const auto& m = *impl_;
  if (!dataset) throw std::invalid_argument("Embedder::embed_dataset: no dataset");
  const auto transform = eval::EvalTransform::for_dataset(*dataset, m.options.image_size, m.normalization);
  eval::ExtractOptions o;
  o.batch_size = m.options.batch_size, o.workers = options.workers, o.channels = m.channels;
  o.progress = options.progress, o.what = "embedded";
  o.first = options.first, o.stop = options.stop;
  if (options.sink) o.sink = [&](int64_t first, const eval::Features& batch) { options.sink(first, batch.features); };
  at::Tensor features = eval::extract_features(*m.backbone, std::move(dataset), transform.view(), m.device, o).features;
  return features.defined() ? features : at::empty({0, dim()});
}

}  // namespace twins

#include "twins/embed.h"

#include <ATen/ATen.h>
#include <torch/nn/module.h>

#include <nlohmann/json.hpp>
#include <filesystem>
#include <stdexcept>

#include "twins/augment/functional.h"
#include "twins/data/image_io.h"
#include "twins/eval/evaluate.h"
#include "twins/models/safetensors.h"
#include "twins/models/weights.h"

namespace twins {

struct Embedder::Impl {
  std::shared_ptr<models::Network> backbone;
  at::Device device{at::kCPU};
  EmbedderOptions options;
  int channels = 3;
  at::Tensor scale, shift;  // [1, C, 1, 1] on the device: x * scale + shift == (x/255 - mean) / std

  // One uint8 HWC image -> the evaluation crop, uint8 CHW.
  at::Tensor prepare(const at::Tensor& hwc) const {
    at::Tensor img = augment::functional::to_channels(hwc.contiguous(), channels);
    const int s = options.image_size;
    const int shorter = static_cast<int>(std::min(img.size(0), img.size(1)));
    if (shorter != s) {
      const int target = static_cast<int>(std::lround(s * 256.0 / 224.0));
      const int h = static_cast<int>(img.size(0)), w = static_cast<int>(img.size(1));
      img = h <= w ? augment::functional::resize(img, target, static_cast<int>(int64_t(target) * w / h), "bilinear")
                   : augment::functional::resize(img, static_cast<int>(int64_t(target) * h / w), target, "bilinear");
    }
    const int top = static_cast<int>(std::nearbyint((img.size(0) - s) / 2.0));
    const int left = static_cast<int>(std::nearbyint((img.size(1) - s) / 2.0));
    return augment::functional::crop(img, top, left, s, s).permute({2, 0, 1});
  }

  at::Tensor forward(const at::Tensor& batch_uint8_or_float) const {
    at::NoGradGuard no_grad;
    at::Tensor x = batch_uint8_or_float.to(device);
    if (x.scalar_type() == at::kByte) x = at::addcmul(shift, x.to(at::kFloat), scale);
    return backbone->forward(x).to(at::kCPU, at::kFloat);
  }
};

Embedder::Embedder(const std::string& path, EmbedderOptions options) : impl_(new Impl) {
  auto& m = *impl_;
  m.backbone = models::load_backbone(path);
  m.backbone->eval();
  m.device = eval::resolve_eval_device(options.device);
  m.backbone->to(m.device);
  m.channels = static_cast<int>(m.backbone->to_json().value("in_channels", 3));
  // Defaults from the file's metadata (what the recipe trained on), else ImageNet's.
  std::string file = path;
  if (std::filesystem::is_directory(path)) file = (std::filesystem::path(path) / "backbone.safetensors").string();
  const auto meta = models::load_safetensors(file).metadata;
  if (options.image_size <= 0)
    options.image_size = meta.count("twins_image_size") ? std::stoi(meta.at("twins_image_size")) : 224;
  if (options.mean.empty() || options.std.empty()) {
    if (meta.count("twins_normalize")) {
      const auto n = nlohmann::json::parse(meta.at("twins_normalize"));
      options.mean = n.at("mean").get<std::vector<double>>(), options.std = n.at("std").get<std::vector<double>>();
    } else {
      options.mean = {0.485, 0.456, 0.406}, options.std = {0.229, 0.224, 0.225};
    }
  }
  if (options.mean.size() != options.std.size() || options.mean.empty())
    throw std::invalid_argument("Embedder: mean and std need the same number of values");
  if (options.batch_size < 1) throw std::invalid_argument("Embedder: batch_size must be >= 1");
  m.options = options;
  std::vector<double> scale(static_cast<size_t>(m.channels)), shift(static_cast<size_t>(m.channels));
  for (int c = 0; c < m.channels; ++c) {
    double mean = options.mean[static_cast<size_t>(c) % options.mean.size()], std = options.std[static_cast<size_t>(c) % options.std.size()];
    if (m.channels == 1 && options.mean.size() == 3) {
      mean = (options.mean[0] + options.mean[1] + options.mean[2]) / 3, std = (options.std[0] + options.std[1] + options.std[2]) / 3;
    }
    scale[static_cast<size_t>(c)] = 1.0 / (255.0 * std), shift[static_cast<size_t>(c)] = -mean / std;
  }
  m.scale = at::tensor(scale, at::kFloat).view({1, m.channels, 1, 1}).to(m.device);
  m.shift = at::tensor(shift, at::kFloat).view({1, m.channels, 1, 1}).to(m.device);
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
  if (images.is_floating_point()) {
    if (images.size(1) != m.channels)
      throw std::invalid_argument("Embedder::embed: float input must be [N, " + std::to_string(m.channels) + ", H, W], normalised");
    std::vector<at::Tensor> out;
    for (int64_t s = 0; s < images.size(0); s += m.options.batch_size)
      out.push_back(m.forward(images.slice(0, s, std::min(images.size(0), s + m.options.batch_size)).to(at::kFloat)));
    return out.empty() ? at::empty({0, dim()}) : at::cat(out);
  }
  if (images.scalar_type() != at::kByte) throw std::invalid_argument("Embedder::embed: expected uint8 or float images");
  // Channels last if the last dimension looks like channels and the second does not.
  const bool nhwc = (images.size(3) == 1 || images.size(3) == 3) && !(images.size(1) == 1 || images.size(1) == 3);
  const at::Tensor hwc = nhwc ? images.cpu() : images.cpu().permute({0, 2, 3, 1});
  std::vector<at::Tensor> out;
  for (int64_t s = 0; s < hwc.size(0); s += m.options.batch_size) {
    std::vector<at::Tensor> batch;
    for (int64_t i = s; i < std::min(hwc.size(0), s + m.options.batch_size); ++i) batch.push_back(m.prepare(hwc[i]));
    out.push_back(m.forward(at::stack(batch)));
  }
  return out.empty() ? at::empty({0, dim()}) : at::cat(out);
}

at::Tensor Embedder::embed_files(const std::vector<std::string>& paths) const {
  const auto& m = *impl_;
  std::vector<at::Tensor> out;
  for (size_t s = 0; s < paths.size(); s += static_cast<size_t>(m.options.batch_size)) {
    std::vector<at::Tensor> batch;
    for (size_t i = s; i < std::min(paths.size(), s + static_cast<size_t>(m.options.batch_size)); ++i)
      batch.push_back(m.prepare(data::read_image(paths[i])));
    out.push_back(m.forward(at::stack(batch)));
  }
  return out.empty() ? at::empty({0, dim()}) : at::cat(out);
}

}  // namespace twins

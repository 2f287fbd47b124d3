#pragma once
// ResNet-18/34/50 with torchvision's architecture (v1.5: stride on the 3x3 conv of the
// bottleneck) and exactly torchvision's parameter and buffer names.
#include <vector>

#include "twins/models/network.h"

namespace twins::models {

struct ResNetOptions {
  /// Blocks per stage: {2,2,2,2} (18), {3,4,6,3} (34, 50).
  std::vector<int64_t> layers{2, 2, 2, 2};
  /// Bottleneck blocks (ResNet-50) instead of basic blocks (18, 34).
  bool bottleneck = false;
  /// Input channels: 3 for RGB, 1 for grey datasets.
  int64_t in_channels = 3;
  /// Channels of the first stage (64 in torchvision); the others double from it.
  int64_t width = 64;
  /// CIFAR stem: 3x3 conv, stride 1, no max-pool (solo-learn, lightly) for ~32 px images.
  bool cifar_stem = false;
  /// Padding of the stem convolution; -1: kernel / 2 (torchvision, lightly). solo-learn's CIFAR
  /// stem pads 2 (34 x 34 maps from 32 x 32 images).
  int64_t stem_padding = -1;
  /// Zero the last BatchNorm weight of each residual block (torchvision's option).
  bool zero_init_residual = false;
  /// > 0 adds torchvision's `fc` classifier; 0 (the SSL backbone) outputs pooled features.
  int64_t num_classes = 0;
};

/// A torchvision-compatible ResNet. forward: [N, in_channels, H, W] -> [N, output_dim()].
class ResNet : public Network {
 public:
  explicit ResNet(ResNetOptions options);
  at::Tensor forward(const at::Tensor& x) override;
  /// Pooled features without `fc`, whatever num_classes is.
  at::Tensor features(const at::Tensor& x);
  int64_t output_dim() const override;
  /// Size of the pooled features (512 x width/64 for basic blocks, 2048 x width/64 bottleneck).
  int64_t feature_dim() const { return feature_dim_; }
  std::shared_ptr<Network> copy() const override;
  nlohmann::json to_json() const override;
  const ResNetOptions& options() const { return options_; }
  /// Elements of the parameters and buffers of a ResNet with `options`, computed without
  /// building it (to refuse a file whose metadata describes a network its tensors cannot fill).
  static int64_t state_elements(const ResNetOptions& options);

 private:
  struct Layers;
  ResNetOptions options_;
  int64_t feature_dim_ = 0;
  std::shared_ptr<Layers> layers_;
};

/// ResNetOptions of torchvision's resnet18/34/50.
ResNetOptions resnet_options(const std::string& name);

}  // namespace twins::models

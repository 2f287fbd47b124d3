// torchvision's ResNet (torchvision/models/resnet.py), module for module, so that parameter and
// buffer names and initialisation match: conv weights kaiming_normal_(fan_out, relu), BatchNorm
// weight 1 and bias 0, and optionally the last BatchNorm of each block zeroed.
#include "twins/models/resnet.h"

#include <torch/nn/init.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/pooling.h>

#include <nlohmann/json.hpp>
#include <stdexcept>

#include "models/batch_norm.h"

namespace twins::models {
namespace nn = torch::nn;

namespace {

nn::Conv2d conv(int64_t in, int64_t out, int64_t kernel, int64_t stride, int64_t padding = -1) {
  return nn::Conv2d(
      nn::Conv2dOptions(in, out, kernel).stride(stride).padding(padding >= 0 ? padding : kernel / 2).bias(false));
}

// Both block kinds: conv1/bn1, conv2/bn2 (and conv3/bn3 for bottlenecks), downsample.
class BlockImpl : public nn::Module {
 public:
  BlockImpl(int64_t in, int64_t planes, int64_t stride, bool bottleneck) : bottleneck_(bottleneck) {
    const int64_t expansion = bottleneck ? 4 : 1;
    const int64_t out = planes * expansion;
    if (bottleneck) {
      conv1_ = register_module("conv1", conv(in, planes, 1, 1));
      bn1_ = register_module("bn1", detail::BatchNorm(planes));
      conv2_ = register_module("conv2", conv(planes, planes, 3, stride));
      bn2_ = register_module("bn2", detail::BatchNorm(planes));
      conv3_ = register_module("conv3", conv(planes, out, 1, 1));
      bn3_ = register_module("bn3", detail::BatchNorm(out));
    } else {
      conv1_ = register_module("conv1", conv(in, planes, 3, stride));
      bn1_ = register_module("bn1", detail::BatchNorm(planes));
      conv2_ = register_module("conv2", conv(planes, planes, 3, 1));
      bn2_ = register_module("bn2", detail::BatchNorm(planes));
    }
    if (stride != 1 || in != out) {
      downsample_ = register_module("downsample", nn::Sequential(conv(in, out, 1, stride), detail::BatchNorm(out)));
    }
  }

  at::Tensor forward(const at::Tensor& x) {
    at::Tensor y = bn1_->forward(conv1_->forward(x)).relu_();
    if (bottleneck_) {
      y = bn2_->forward(conv2_->forward(y)).relu_();
      y = bn3_->forward(conv3_->forward(y));
    } else {
      y = bn2_->forward(conv2_->forward(y));
    }
    const at::Tensor identity = downsample_ ? downsample_->forward(x) : x;
    return (y + identity).relu_();
  }

  detail::BatchNorm last_bn() const { return bottleneck_ ? bn3_ : bn2_; }

 private:
  bool bottleneck_;
  nn::Conv2d conv1_{nullptr}, conv2_{nullptr}, conv3_{nullptr};
  detail::BatchNorm bn1_{nullptr}, bn2_{nullptr}, bn3_{nullptr};
  nn::Sequential downsample_{nullptr};
};

}  // namespace

struct ResNet::Layers {
  nn::Conv2d conv1{nullptr};
  detail::BatchNorm bn1{nullptr};
  nn::MaxPool2d maxpool{nullptr};
  std::vector<nn::Sequential> stages;
  nn::Linear fc{nullptr};
};

ResNetOptions resnet_options(const std::string& name) {
  ResNetOptions o;
  if (name == "resnet18") {
    o.layers = {2, 2, 2, 2};
  } else if (name == "resnet34") {
    o.layers = {3, 4, 6, 3};
  } else if (name == "resnet50") {
    o.layers = {3, 4, 6, 3};
    o.bottleneck = true;
  } else {
    throw std::invalid_argument("resnet_options: unknown ResNet \"" + name + "\"; valid: resnet18 resnet34 resnet50");
  }
  return o;
}

namespace {

// Ranges wide enough for any real ResNet, narrow enough that no option asks for all the memory.
void validate(const ResNetOptions& o) {
  if (o.layers.size() != 4)
    throw std::invalid_argument("resnet: layers must list 4 stages, got " + std::to_string(o.layers.size()));
  for (int64_t n : o.layers)
    if (n < 1 || n > 1024) throw std::invalid_argument("resnet: every stage needs 1 to 1024 blocks");
  if (o.in_channels < 1 || o.in_channels > 64) throw std::invalid_argument("resnet.in_channels: must be in [1, 64]");
  if (o.width < 1 || o.width > 1024) throw std::invalid_argument("resnet.width: must be in [1, 1024]");
  if (o.num_classes < 0 || o.num_classes > 1000000)
    throw std::invalid_argument("resnet.num_classes: must be in [0, 10^6]");
  if (o.stem_padding < -1 || o.stem_padding > 8) throw std::invalid_argument("resnet.stem_padding: must be in [-1, 8]");
}

}  // namespace

int64_t ResNet::state_elements(const ResNetOptions& o) {
  validate(o);
  auto bn = [](int64_t c) { return 4 * c + 1; };  // weight, bias, running mean and var, count
  const int64_t k = o.cifar_stem ? 3 : 7, expansion = o.bottleneck ? 4 : 1;
  int64_t n = o.in_channels * o.width * k * k + bn(o.width), in = o.width;
  for (size_t s = 0; s < 4; ++s) {
    const int64_t planes = o.width << s, out = planes * expansion;
    for (int64_t b = 0; b < o.layers[s]; ++b) {
      const int64_t stride = (b == 0 && s > 0) ? 2 : 1;
      if (o.bottleneck)
        n += in * planes + bn(planes) + planes * planes * 9 + bn(planes) + planes * out + bn(out);
      else
        n += in * planes * 9 + bn(planes) + planes * planes * 9 + bn(planes);
      if (stride != 1 || in != out) n += in * out + bn(out);
      in = out;
    }
  }
  if (o.num_classes > 0) n += in * o.num_classes + o.num_classes;
  return n;
}

ResNet::ResNet(ResNetOptions options) : options_(std::move(options)), layers_(new Layers) {
  const auto& o = options_;
  validate(o);

  auto& L = *layers_;
  L.conv1 = register_module("conv1", o.cifar_stem ? conv(o.in_channels, o.width, 3, 1, o.stem_padding)
                                                  : conv(o.in_channels, o.width, 7, 2, o.stem_padding));
  L.bn1 = register_module("bn1", detail::BatchNorm(o.width));
  if (!o.cifar_stem)
    L.maxpool = register_module("maxpool", nn::MaxPool2d(nn::MaxPool2dOptions(3).stride(2).padding(1)));
  const int64_t expansion = o.bottleneck ? 4 : 1;
  int64_t in = o.width;
  for (size_t s = 0; s < 4; ++s) {
    const int64_t planes = o.width << s;
    nn::Sequential stage;
    for (int64_t b = 0; b < o.layers[s]; ++b) {
      const int64_t stride = (b == 0 && s > 0) ? 2 : 1;
      stage->push_back(std::make_shared<BlockImpl>(in, planes, stride, o.bottleneck));
      in = planes * expansion;
    }
    L.stages.push_back(register_module("layer" + std::to_string(s + 1), stage));
  }
  feature_dim_ = in;
  if (o.num_classes > 0) L.fc = register_module("fc", nn::Linear(in, o.num_classes));

  torch::NoGradGuard no_grad;
  for (auto& m : modules(/*include_self=*/false)) {
    if (auto* c = m->as<nn::Conv2d>()) {
      nn::init::kaiming_normal_(c->weight, 0.0, torch::kFanOut, torch::kReLU);
    } else if (auto* bn = m->as<detail::BatchNorm>()) {
      nn::init::ones_(bn->weight);
      nn::init::zeros_(bn->bias);
    }
  }
  if (o.zero_init_residual) {
    for (auto& stage : L.stages)
      for (auto& block : *stage) nn::init::zeros_(block.get<BlockImpl>().last_bn()->weight);
  }
}

at::Tensor ResNet::features(const at::Tensor& x) {
  auto& L = *layers_;
  if (x.dim() != 4 || x.size(1) != options_.in_channels) {
    std::string got = "[";
    for (int64_t i = 0; i < x.dim(); ++i) got += (i ? ", " : "") + std::to_string(x.size(i));
    throw std::invalid_argument("resnet: expected input [N, " + std::to_string(options_.in_channels) + ", H, W], got " +
                                got + "]");
  }
  at::Tensor y = L.bn1->forward(L.conv1->forward(x)).relu_();
  if (L.maxpool) y = L.maxpool->forward(y);
  for (auto& stage : L.stages) y = stage->forward(y);
  return y.mean({2, 3});  // adaptive average pooling to 1x1, then flatten
}

at::Tensor ResNet::forward(const at::Tensor& x) {
  at::Tensor f = features(x);
  return layers_->fc ? layers_->fc->forward(f) : f;
}

int64_t ResNet::output_dim() const { return options_.num_classes > 0 ? options_.num_classes : feature_dim_; }

std::shared_ptr<Network> ResNet::copy() const {
  auto out = std::make_shared<ResNet>(options_);
  copy_state(*this, *out);
  out->train(is_training());
  return out;
}

nlohmann::json ResNet::to_json() const {
  const auto& o = options_;
  std::string type;
  for (const char* name : {"resnet18", "resnet34", "resnet50"}) {
    const ResNetOptions ref = resnet_options(name);
    if (ref.layers == o.layers && ref.bottleneck == o.bottleneck) type = name;
  }
  nlohmann::json j = {{"type", type.empty() ? "resnet" : type},
                      {"in_channels", o.in_channels},
                      {"width", o.width},
                      {"cifar_stem", o.cifar_stem},
                      {"zero_init_residual", o.zero_init_residual},
                      {"num_classes", o.num_classes}};
  if (o.stem_padding >= 0) j["stem_padding"] = o.stem_padding;
  if (type.empty()) j["layers"] = o.layers, j["bottleneck"] = o.bottleneck;
  return j;
}

}  // namespace twins::models

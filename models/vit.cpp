// torchvision's VisionTransformer (torchvision/models/vision_transformer.py), module for module, so
// that names and initialisation match: conv_proj truncated-normal with std sqrt(1 / fan_in) and
// zero bias, class token 0, position embedding normal(0.02), attention in_proj Xavier-uniform with
// zero biases, MLP Xavier-uniform with normal(1e-6) biases, LayerNorms eps 1e-6, exact GELU.
// Additions torchvision lacks: position embeddings interpolated to other input sizes, stochastic
// depth, mean pooling.
#include "twins/models/vit.h"

#include <torch/nn/functional/upsampling.h>
#include <torch/nn/init.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/dropout.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>

#include <cmath>
#include <nlohmann/json.hpp>
#include <stdexcept>

#include "core/compat.h"

namespace twins::models {
namespace nn = torch::nn;

namespace {

constexpr double kLayerNormEps = 1e-6;

nn::LayerNorm layer_norm(int64_t d) { return nn::LayerNorm(nn::LayerNormOptions({d}).eps(kLayerNormEps)); }

// nn.MultiheadAttention(hidden, heads, batch_first=True) as torchvision's blocks call it (query =
// key = value, no mask, need_weights=False): in_proj_weight [3D, D], in_proj_bias [3D], out_proj.
class SelfAttentionImpl : public nn::Module {
 public:
  SelfAttentionImpl(int64_t hidden, int64_t heads, double dropout) : heads_(heads), dropout_(dropout) {
    in_proj_weight = register_parameter("in_proj_weight", at::empty({3 * hidden, hidden}));
    in_proj_bias = register_parameter("in_proj_bias", at::zeros({3 * hidden}));
    out_proj = register_module("out_proj", nn::Linear(hidden, hidden));
    torch::NoGradGuard no_grad;
    nn::init::xavier_uniform_(in_proj_weight);
    nn::init::zeros_(out_proj->bias);
  }
  at::Tensor forward(const at::Tensor& x) {
    const int64_t n = x.size(0), length = x.size(1), d = x.size(2);
    // [N, L, 3D] -> [3, N, heads, L, D / heads]
    const at::Tensor qkv =
        at::linear(x, in_proj_weight, in_proj_bias).view({n, length, 3, heads_, d / heads_}).permute({2, 0, 3, 1, 4});
    at::Tensor y = compat::attention(qkv[0], qkv[1], qkv[2], is_training() ? dropout_ : 0.0);
    return out_proj->forward(y.transpose(1, 2).reshape({n, length, d}));
  }
  at::Tensor in_proj_weight, in_proj_bias;
  nn::Linear out_proj{nullptr};

 private:
  int64_t heads_;
  double dropout_;
};
TORCH_MODULE(SelfAttention);

// Drops the whole residual branch of a random subset of the samples, rescaling the others.
at::Tensor drop_path(const at::Tensor& branch, double p, bool training) {
  if (!training || p <= 0) return branch;
  const double keep = 1.0 - p;
  std::vector<int64_t> shape(static_cast<size_t>(branch.dim()), 1);
  shape[0] = branch.size(0);
  return branch * at::empty(shape, branch.options()).bernoulli_(keep).div_(keep);
}

// torchvision's EncoderBlock: x + attention(ln_1(x)), then + mlp(ln_2(x)).
class EncoderBlockImpl : public nn::Module {
 public:
  EncoderBlockImpl(const ViTOptions& o, double drop_path) : dropout_(o.dropout), drop_path_(drop_path) {
    ln_1 = register_module("ln_1", layer_norm(o.hidden));
    self_attention = register_module("self_attention", SelfAttention(o.hidden, o.heads, o.attention_dropout));
    ln_2 = register_module("ln_2", layer_norm(o.hidden));
    // MLPBlock: Linear, GELU, Dropout, Linear, Dropout (so the linears are mlp.0 and mlp.3).
    mlp = register_module("mlp", nn::Sequential(nn::Linear(o.hidden, o.mlp), nn::GELU(), nn::Dropout(o.dropout),
                                                nn::Linear(o.mlp, o.hidden), nn::Dropout(o.dropout)));
    torch::NoGradGuard no_grad;
    for (size_t i : {size_t{0}, size_t{3}}) {
      auto& linear = *mlp[i]->as<nn::Linear>();
      nn::init::xavier_uniform_(linear.weight);
      nn::init::normal_(linear.bias, 0.0, 1e-6);
    }
  }
  at::Tensor forward(const at::Tensor& x) {
    at::Tensor y = self_attention->forward(ln_1->forward(x));
    if (dropout_ > 0) y = at::dropout(y, dropout_, is_training());
    const at::Tensor h = x + drop_path(y, drop_path_, is_training());
    return h + drop_path(mlp->forward(ln_2->forward(h)), drop_path_, is_training());
  }
  nn::LayerNorm ln_1{nullptr}, ln_2{nullptr};
  SelfAttention self_attention{nullptr};
  nn::Sequential mlp{nullptr};

 private:
  double dropout_, drop_path_;
};
TORCH_MODULE(EncoderBlock);

// torchvision's Encoder: pos_embedding, layers.encoder_layer_<i>, ln.
class EncoderImpl : public nn::Module {
 public:
  EncoderImpl(const ViTOptions& o, int64_t tokens) {
    pos_embedding = register_parameter("pos_embedding", at::empty({1, tokens, o.hidden}));
    layers = register_module("layers", std::make_shared<nn::Module>());
    for (int64_t i = 0; i < o.depth; ++i) {
      const double rate = o.depth > 1 ? o.drop_path * static_cast<double>(i) / static_cast<double>(o.depth - 1) : 0.0;
      blocks.push_back(layers->register_module("encoder_layer_" + std::to_string(i), EncoderBlock(o, rate)));
    }
    ln = register_module("ln", layer_norm(o.hidden));
    torch::NoGradGuard no_grad;
    nn::init::normal_(pos_embedding, 0.0, 0.02);
  }
  at::Tensor pos_embedding;
  std::shared_ptr<nn::Module> layers;
  std::vector<EncoderBlock> blocks;
  nn::LayerNorm ln{nullptr};
};
TORCH_MODULE(Encoder);

void validate(const ViTOptions& o) {
  auto need = [](bool ok, const std::string& what) {
    if (!ok) throw std::invalid_argument("vit." + what);
  };
  need(o.image_size >= 1 && o.image_size <= 8192, "image_size: must be in [1, 8192]");
  need(o.patch_size >= 1 && o.patch_size <= o.image_size, "patch_size: must be in [1, image_size]");
  need(o.image_size % o.patch_size == 0, "image_size: must be a multiple of patch_size (" +
                                             std::to_string(o.image_size) + " and " + std::to_string(o.patch_size) +
                                             ")");
  need((o.image_size / o.patch_size) <= 256, "patch_size: at most 256 x 256 patches per image");
  need(o.in_channels >= 1 && o.in_channels <= 64, "in_channels: must be in [1, 64]");
  need(o.depth >= 1 && o.depth <= 256, "depth: must be in [1, 256]");
  need(o.hidden >= 1 && o.hidden <= 16384, "hidden: must be in [1, 16384]");
  need(o.heads >= 1 && o.hidden % o.heads == 0, "heads: must divide hidden (" + std::to_string(o.hidden) + ")");
  need(o.mlp >= 1 && o.mlp <= 65536, "mlp: must be in [1, 65536]");
  need(o.dropout >= 0 && o.dropout < 1, "dropout: must be in [0, 1)");
  need(o.attention_dropout >= 0 && o.attention_dropout < 1, "attention_dropout: must be in [0, 1)");
  need(o.drop_path >= 0 && o.drop_path < 1, "drop_path: must be in [0, 1)");
  need(o.pool == "cls" || o.pool == "mean", "pool: must be \"cls\" or \"mean\", got \"" + o.pool + "\"");
  need(o.num_classes >= 0 && o.num_classes <= 1000000, "num_classes: must be in [0, 10^6]");
}

std::string shape_of(const at::Tensor& x) {
  std::string s = "[";
  for (int64_t i = 0; i < x.dim(); ++i) s += (i ? ", " : "") + std::to_string(x.size(i));
  return s + "]";
}

}  // namespace

struct ViT::Layers {
  nn::Conv2d conv_proj{nullptr};
  at::Tensor class_token;
  Encoder encoder{nullptr};
  nn::Linear head{nullptr};
};

ViTOptions vit_options(const std::string& name) {
  ViTOptions o;
  o.patch_size = 16, o.depth = 12;
  if (name == "vit_tiny") {
    o.hidden = 192, o.heads = 3;
  } else if (name == "vit_small") {
    o.hidden = 384, o.heads = 6;
  } else if (name == "vit_base" || name == "vit") {
    o.hidden = 768, o.heads = 12;
  } else {
    throw std::invalid_argument("unknown ViT preset '" + name + "' (vit_tiny, vit_small, vit_base)");
  }
  o.mlp = 4 * o.hidden;
  return o;
}

int64_t ViT::state_elements(const ViTOptions& o) {
  validate(o);
  const int64_t d = o.hidden, g = o.image_size / o.patch_size;
  const int64_t block = 2 * (2 * d) + (3 * d * d + 3 * d) + (d * d + d) + (d * o.mlp + o.mlp) + (o.mlp * d + d);
  int64_t n = o.in_channels * d * o.patch_size * o.patch_size + d + d + (1 + g * g) * d + o.depth * block + 2 * d;
  if (o.num_classes > 0) n += d * o.num_classes + o.num_classes;
  return n;
}

ViT::ViT(ViTOptions options) : options_(std::move(options)), layers_(new Layers) {
  const auto& o = options_;
  validate(o);
  auto& L = *layers_;
  const int64_t grid = o.image_size / o.patch_size;
  L.conv_proj = register_module(
      "conv_proj", nn::Conv2d(nn::Conv2dOptions(o.in_channels, o.hidden, o.patch_size).stride(o.patch_size)));
  L.class_token = register_parameter("class_token", at::zeros({1, 1, o.hidden}));
  L.encoder = register_module("encoder", Encoder(o, 1 + grid * grid));
  if (o.num_classes > 0) {
    auto heads = register_module("heads", std::make_shared<nn::Module>());
    L.head = heads->register_module("head", nn::Linear(o.hidden, o.num_classes));
  }
  torch::NoGradGuard no_grad;
  const double fan_in = static_cast<double>(o.in_channels * o.patch_size * o.patch_size);
  // trunc_normal_(std, a=-2, b=2): the bounds are absolute, far beyond std <= 1 for any fan-in.
  L.conv_proj->weight.normal_(0.0, std::sqrt(1.0 / fan_in)).clamp_(-2.0, 2.0);
  nn::init::zeros_(L.conv_proj->bias);
  if (L.head) nn::init::zeros_(L.head->weight), nn::init::zeros_(L.head->bias);
}

at::Tensor ViT::position_embedding(int64_t grid_h, int64_t grid_w) const {
  const auto& o = options_;
  const int64_t grid = o.image_size / o.patch_size;
  const at::Tensor& pos = layers_->encoder->pos_embedding;
  if (grid_h == grid && grid_w == grid) return pos;
  namespace F = nn::functional;
  const at::Tensor patches = pos.slice(1, 1).reshape({1, grid, grid, o.hidden}).permute({0, 3, 1, 2});
  const at::Tensor resized = F::interpolate(patches, F::InterpolateFuncOptions()
                                                         .size(std::vector<int64_t>{grid_h, grid_w})
                                                         .mode(torch::kBicubic)
                                                         .align_corners(false));
  return at::cat({pos.slice(1, 0, 1), resized.permute({0, 2, 3, 1}).reshape({1, grid_h * grid_w, o.hidden})}, 1);
}

at::Tensor ViT::features(const at::Tensor& x) {
  const auto& o = options_;
  auto& L = *layers_;
  if (x.dim() != 4 || x.size(1) != o.in_channels || x.size(2) % o.patch_size || x.size(3) % o.patch_size)
    throw std::invalid_argument("vit: expected input [N, " + std::to_string(o.in_channels) + ", H, W] with H and W " +
                                "multiples of the patch size " + std::to_string(o.patch_size) + ", got " + shape_of(x));
  const int64_t n = x.size(0), grid_h = x.size(2) / o.patch_size, grid_w = x.size(3) / o.patch_size;
  // [N, D, h, w] -> [N, h * w, D], the class token in front, plus the position embedding.
  at::Tensor tokens = L.conv_proj->forward(x).flatten(2).transpose(1, 2);
  tokens = at::cat({L.class_token.expand({n, -1, -1}), tokens}, 1) + position_embedding(grid_h, grid_w);
  if (o.dropout > 0) tokens = at::dropout(tokens, o.dropout, is_training());
  for (auto& block : L.encoder->blocks) tokens = block->forward(tokens);
  tokens = L.encoder->ln->forward(tokens);
  return o.pool == "mean" ? tokens.slice(1, 1).mean(1) : tokens.select(1, 0);
}

at::Tensor ViT::forward(const at::Tensor& x) {
  at::Tensor f = features(x);
  return layers_->head ? layers_->head->forward(f) : f;
}

int64_t ViT::output_dim() const { return options_.num_classes > 0 ? options_.num_classes : options_.hidden; }

std::vector<at::Tensor> ViT::no_weight_decay() const { return {layers_->class_token, layers_->encoder->pos_embedding}; }

std::shared_ptr<Network> ViT::copy() const {
  auto out = std::make_shared<ViT>(options_);
  copy_state(*this, *out);
  out->train(is_training());
  return out;
}

nlohmann::json ViT::to_json() const {
  const auto& o = options_;
  return {{"type", "vit"},
          {"image_size", o.image_size},
          {"patch_size", o.patch_size},
          {"in_channels", o.in_channels},
          {"depth", o.depth},
          {"hidden", o.hidden},
          {"heads", o.heads},
          {"mlp", o.mlp},
          {"dropout", o.dropout},
          {"attention_dropout", o.attention_dropout},
          {"drop_path", o.drop_path},
          {"pool", o.pool},
          {"num_classes", o.num_classes}};
}

}  // namespace twins::models

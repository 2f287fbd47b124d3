#pragma once
// Vision Transformers with torchvision's architecture (torchvision/models/vision_transformer.py)
// and exactly its parameter names, so weights move to and from torchvision's VisionTransformer:
//   conv_proj.{weight,bias}, class_token, encoder.pos_embedding,
//   encoder.layers.encoder_layer_<i>.{ln_1, self_attention.{in_proj_weight, in_proj_bias,
//   out_proj}, ln_2, mlp.0, mlp.3}, encoder.ln, and heads.head when num_classes > 0.
// The embedding is the class token after the final LayerNorm (torchvision's model with `heads`
// removed), or the mean of the patch tokens. Any input whose sides are multiples of the patch
// size works: the position embeddings are interpolated (bicubic) from the trained grid.
#include <string>

#include "twins/models/network.h"

namespace twins::models {

struct ViTOptions {
  /// Side of the square images the position embeddings are made for (the training view size).
  int64_t image_size = 224;
  int64_t patch_size = 16;
  int64_t in_channels = 3;
  /// Encoder blocks (torchvision's num_layers).
  int64_t depth = 12;
  /// Token width (torchvision's hidden_dim); a multiple of `heads`.
  int64_t hidden = 768;
  /// Attention heads (torchvision's num_heads).
  int64_t heads = 12;
  /// Hidden size of each block's MLP (torchvision's mlp_dim; 4 x hidden in the standard family).
  int64_t mlp = 3072;
  /// Dropout after the position embedding, in the MLPs and after attention (torchvision's
  /// dropout), and on the attention weights (attention_dropout). 0 in every SSL recipe.
  double dropout = 0.0;
  double attention_dropout = 0.0;
  /// Stochastic depth: block i of `depth` drops its residual branches per sample with
  /// probability drop_path * i / (depth - 1) in training (timm's rule). No parameters.
  double drop_path = 0.0;
  /// "cls": the class token after the final LayerNorm; "mean": the mean of the patch tokens.
  std::string pool = "cls";
  /// > 0 adds torchvision's classifier `heads.head`; 0 (the SSL backbone) outputs features.
  int64_t num_classes = 0;
};

/// A torchvision-compatible ViT. forward: [N, in_channels, H, W] -> [N, output_dim()], with H and W
/// multiples of patch_size (other sizes than image_size interpolate the position embeddings).
class ViT : public Network {
 public:
  explicit ViT(ViTOptions options);
  at::Tensor forward(const at::Tensor& x) override;
  /// The pooled features without `heads`, whatever num_classes is.
  at::Tensor features(const at::Tensor& x);
  int64_t output_dim() const override;
  std::shared_ptr<Network> copy() const override;
  nlohmann::json to_json() const override;
  std::vector<at::Tensor> no_weight_decay() const override;
  const ViTOptions& options() const { return options_; }
  /// encoder.pos_embedding for a grid of grid_h x grid_w patches: the trained one, or its patch
  /// part interpolated bicubically (align_corners false, as timm), the class token's kept.
  at::Tensor position_embedding(int64_t grid_h, int64_t grid_w) const;
  /// Elements of the parameters of a ViT with `options`, computed without building it.
  static int64_t state_elements(const ViTOptions& options);

 private:
  struct Layers;
  ViTOptions options_;
  std::shared_ptr<Layers> layers_;
};

/// ViTOptions of "vit_tiny" (192 wide, 3 heads), "vit_small" (384, 6), "vit_base" (768, 12):
/// patch 16, depth 12, MLP 4 x hidden, 224 px; "vit" is vit_base's.
ViTOptions vit_options(const std::string& name);

}  // namespace twins::models

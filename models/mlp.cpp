#include "twins/models/mlp.h"

#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/linear.h>

#include <nlohmann/json.hpp>
#include <stdexcept>

#include "models/batch_norm.h"
#include "twins/config.h"

namespace twins::models {
namespace nn = torch::nn;

std::vector<int64_t> parse_mlp_spec(const std::string& spec, const std::string& path) {
  std::vector<int64_t> dims;
  size_t start = 0;
  while (start <= spec.size()) {
    const size_t dash = spec.find('-', start);
    const std::string part = spec.substr(start, dash == std::string::npos ? dash : dash - start);
    const auto value = config::parse_integer(part);
    if (!value || *value < 1 || *value > 65536)
      throw std::invalid_argument(path + ": \"" + spec +
                                  "\" is not a list of sizes in [1, 65536] like \"8192-8192-8192\"");
    dims.push_back(*value);
    if (dims.size() > 16)
      throw std::invalid_argument(path + ": \"" + spec.substr(0, 60) + "...\" has more than 16 layers");
    if (dash == std::string::npos) break;
    start = dash + 1;
  }
  return dims;
}

struct MLP::Layers {
  std::vector<nn::Linear> linears;
  std::vector<detail::BatchNorm> norms;
  detail::BatchNorm last_norm{nullptr};
};

MLP::MLP(int64_t in_dim, MLPOptions options, const std::string& path)
    : in_dim_(in_dim),
      options_(std::move(options)),
      dims_(parse_mlp_spec(options_.spec, path + ".spec")),
      layers_(new Layers) {
  if (in_dim < 1) throw std::invalid_argument(path + ": input size must be >= 1, got " + std::to_string(in_dim));
  int64_t index = 0, in = in_dim;
  for (size_t i = 0; i < dims_.size(); ++i) {
    const bool last = i + 1 == dims_.size();
    auto linear = nn::Linear(nn::LinearOptions(in, dims_[i]).bias(last ? options_.last_bias : options_.bias));
    layers_->linears.push_back(register_module(std::to_string(index++), linear));
    if (!last) {
      if (options_.batch_norm)
        layers_->norms.push_back(register_module(std::to_string(index++), detail::BatchNorm(dims_[i])));
      ++index;  // the ReLU's slot: it has no parameters, but keeps nn.Sequential's numbering
    }
    in = dims_[i];
  }
  if (options_.last_batch_norm)
    layers_->last_norm =
        register_module(std::to_string(index), detail::BatchNorm(dims_.back(), 1e-5, 0.1, options_.last_affine));
}

at::Tensor MLP::forward(const at::Tensor& x) {
  at::Tensor y = x;
  const size_t n = layers_->linears.size();
  for (size_t i = 0; i < n; ++i) {
    y = layers_->linears[i]->forward(y);
    if (i + 1 < n) {
      if (options_.batch_norm) y = layers_->norms[i]->forward(y);
      y = y.relu();
    }
  }
  return options_.last_batch_norm ? layers_->last_norm->forward(y) : y;
}

std::shared_ptr<Network> MLP::copy() const {
  auto out = std::make_shared<MLP>(in_dim_, options_);
  copy_state(*this, *out);
  out->train(is_training());
  return out;
}

nlohmann::json MLP::to_json() const {
  return {{"type", "mlp"},
          {"spec", options_.spec},
          {"bias", options_.bias},
          {"last_bias", options_.last_bias},
          {"batch_norm", options_.batch_norm},
          {"last_batch_norm", options_.last_batch_norm},
          {"last_affine", options_.last_affine}};
}

}  // namespace twins::models

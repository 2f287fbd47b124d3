#include "train/ssl_model.h"

#include <ATen/ATen.h>
#include <torch/nn/module.h>
#include <torch/optim/adamw.h>
#include <torch/optim/sgd.h>
#include <torch/serialize/archive.h>

#include <sstream>

#include "twins/dist/data_parallel.h"
#include "twins/train/lars.h"

namespace twins::train::detail {

SSLModel::SSLModel(const Recipe& recipe, int64_t num_classes) {
  backbone = models::create_backbone(recipe.backbone);
  in_channels = static_cast<int>(recipe.backbone.is_object() ? recipe.backbone.value("in_channels", 3) : 3);
  projector = models::create_head(recipe.projector, backbone->output_dim());
  if (!recipe.predictor.is_null()) predictor = models::create_head(recipe.predictor, projector->output_dim());
  if (recipe.method == "byol") {
    target_backbone = backbone->copy();
    target_projector = projector->copy();
    for (auto& p : target_backbone->parameters()) p.set_requires_grad(false);
    for (auto& p : target_projector->parameters()) p.set_requires_grad(false);
  }
  if (num_classes > 0) probe = torch::nn::Linear(backbone->output_dim(), num_classes);
  loss = losses::create_loss(recipe.loss);
}

void SSLModel::to(const at::Device& device, bool channels_last) {
  for (auto* n : {&backbone, &projector, &predictor, &target_backbone, &target_projector})
    if (*n) (*n)->to(device);
  if (probe) probe->to(device);
  if (channels_last) {
    for (auto* n : {&backbone, &target_backbone})
      if (*n)
        for (auto& p : (*n)->parameters())
          if (p.dim() == 4) p.set_data(p.data().contiguous(at::MemoryFormat::ChannelsLast));
  }
}

void SSLModel::train(bool on) {
  for (auto* n : {&backbone, &projector, &predictor, &target_backbone, &target_projector})
    if (*n) (*n)->train(on);
  if (probe) probe->train(on);
}

void SSLModel::distribute(const std::shared_ptr<dist::Communicator>& communicator, bool sync_batchnorm) {
  for (auto* n : {&backbone, &projector, &predictor, &target_backbone, &target_projector})
    if (*n) {
      dist::broadcast_module(**n, *communicator);
      if (sync_batchnorm) models::set_sync_batchnorm(**n, communicator);
    }
  if (probe) dist::broadcast_module(*probe, *communicator);
  loss->set_communicator(communicator);
}

void SSLModel::broadcast_buffers(dist::Communicator& communicator) {
  for (auto* n : {&backbone, &projector, &predictor, &target_backbone, &target_projector})
    if (*n) dist::broadcast_buffers(**n, communicator);
}

std::vector<at::Tensor> SSLModel::parameters() const {
  std::vector<at::Tensor> out;
  for (const auto* n : {&backbone, &projector, &predictor})
    if (*n)
      for (const auto& p : (*n)->parameters()) out.push_back(p);
  return out;
}

SSLModel::Output SSLModel::forward(const std::vector<at::Tensor>& views) {
  const bool byol = static_cast<bool>(target_backbone);
  std::vector<losses::ViewEmbeddings> e(views.size());
  Output out;
  for (size_t v = 0; v < views.size(); ++v) {
    const at::Tensor f = backbone->forward(views[v]);
    if (v == 0) out.features = f;
    e[v].projection = projector->forward(f);
    if (byol) {
      e[v].prediction = predictor->forward(e[v].projection);
      at::NoGradGuard no_grad;
      e[v].target_projection = target_projector->forward(target_backbone->forward(views[v]));
    }
  }
  if (views.size() == 2) {
    out.loss = loss->compute(e[0], e[1]);
    return out;
  }
  // Multi-crop: every pair with a global view (0 or 1), averaged.
  int pairs = 0;
  for (size_t i = 0; i < 2 && i < views.size(); ++i)
    for (size_t j = i + 1; j < views.size(); ++j) {
      losses::LossOutput l = loss->compute(e[i], e[j]);
      if (pairs++ == 0) {
        out.loss = l;
        continue;
      }
      out.loss.total = out.loss.total + l.total;
      for (size_t t = 0; t < l.terms.size(); ++t) out.loss.terms[t].second = out.loss.terms[t].second + l.terms[t].second;
    }
  out.loss.total = out.loss.total / pairs;
  for (auto& t : out.loss.terms) t.second = t.second / pairs;
  return out;
}

void SSLModel::ema_update(double tau) {
  at::NoGradGuard no_grad;
  auto update = [tau](const models::Network& online, models::Network& target) {
    auto src = online.named_parameters();
    for (auto& item : target.named_parameters()) item.value().mul_(tau).add_(src[item.key()], 1.0 - tau);
    auto bsrc = online.named_buffers();
    for (auto& item : target.named_buffers()) {
      at::Tensor& t = item.value();
      if (t.is_floating_point()) t.mul_(tau).add_(bsrc[item.key()], 1.0 - tau);
      else t.copy_(bsrc[item.key()]);  // num_batches_tracked
    }
  };
  update(*backbone, *target_backbone);
  update(*projector, *target_projector);
}

models::NamedTensors SSLModel::state() const {
  models::NamedTensors out;
  auto add = [&out](const std::string& prefix, const torch::nn::Module& m) {
    for (const auto& p : m.named_parameters()) out.emplace_back(prefix + "." + p.key(), p.value());
    for (const auto& b : m.named_buffers()) out.emplace_back(prefix + "." + b.key(), b.value());
  };
  add("backbone", *backbone);
  add("projector", *projector);
  if (predictor) add("predictor", *predictor);
  if (target_backbone) add("target_backbone", *target_backbone), add("target_projector", *target_projector);
  if (probe) add("probe", *probe);
  return out;
}

void SSLModel::load_state(const models::SafeTensorsFile& file) {
  at::NoGradGuard no_grad;
  for (auto& [name, tensor] : state()) {
    if (!file.contains(name)) throw std::runtime_error("checkpoint lacks " + name);
    const at::Tensor& src = file.at(name);
    if (src.sizes() != tensor.sizes())
      throw std::runtime_error("checkpoint entry " + name + " has another shape than the model's");
    at::Tensor dst = tensor;
    dst.copy_(src);
  }
}

std::unique_ptr<torch::optim::Optimizer> make_optimizer(const OptimizerConfig& c, const SSLModel& model,
                                                        double lr, double bias_lr) {
  std::vector<at::Tensor> weights, flat;
  for (const auto& p : model.parameters()) (p.dim() > 1 ? weights : flat).push_back(p);
  const double flat_decay = c.exclude_1d ? 0.0 : c.weight_decay;
  if (c.type == "lars") {
    auto o = LARSOptions(lr).weight_decay(c.weight_decay).momentum(c.momentum).eta(c.eta).exclude_1d(c.exclude_1d).clip(c.clip);
    std::vector<torch::optim::OptimizerParamGroup> groups;
    groups.emplace_back(weights, std::make_unique<LARSOptions>(o));
    groups.emplace_back(flat, std::make_unique<LARSOptions>(LARSOptions(o).lr(bias_lr)));
    return std::make_unique<LARS>(std::move(groups), o);
  }
  if (c.type == "sgd") {
    auto o = torch::optim::SGDOptions(lr).momentum(c.momentum).weight_decay(c.weight_decay);
    std::vector<torch::optim::OptimizerParamGroup> groups;
    groups.emplace_back(weights, std::make_unique<torch::optim::SGDOptions>(o));
    groups.emplace_back(flat, std::make_unique<torch::optim::SGDOptions>(
                                  torch::optim::SGDOptions(o).lr(bias_lr).weight_decay(flat_decay)));
    return std::make_unique<torch::optim::SGD>(std::move(groups), o);
  }
  auto o = torch::optim::AdamWOptions(lr).weight_decay(c.weight_decay).betas({c.betas[0], c.betas[1]}).eps(c.eps);
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(weights, std::make_unique<torch::optim::AdamWOptions>(o));
  groups.emplace_back(flat, std::make_unique<torch::optim::AdamWOptions>(
                                torch::optim::AdamWOptions(o).lr(bias_lr).weight_decay(flat_decay)));
  return std::make_unique<torch::optim::AdamW>(std::move(groups), o);
}

void set_learning_rates(torch::optim::Optimizer& optimizer, const std::vector<double>& lrs) {
  auto& groups = optimizer.param_groups();
  for (size_t g = 0; g < groups.size() && g < lrs.size(); ++g) groups[g].options().set_lr(lrs[g]);
}

std::vector<uint8_t> save_optimizer(const torch::optim::Optimizer& optimizer) {
  torch::serialize::OutputArchive archive;
  optimizer.save(archive);
  std::ostringstream s;
  archive.save_to(s);
  const std::string bytes = s.str();
  return std::vector<uint8_t>(bytes.begin(), bytes.end());
}

void load_optimizer(torch::optim::Optimizer& optimizer, const at::Tensor& bytes) {
  const at::Tensor b = bytes.contiguous();
  std::istringstream s(std::string(reinterpret_cast<const char*>(b.data_ptr<uint8_t>()), static_cast<size_t>(b.numel())));
  torch::serialize::InputArchive archive;
  archive.load_from(s);
  optimizer.load(archive);
}

}  // namespace twins::train::detail

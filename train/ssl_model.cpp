#include "train/ssl_model.h"

#include <ATen/ATen.h>

#include <map>
#include <sstream>
#include <stdexcept>
#include <vector>

#include "core/compat.h"
#include "twins/distributed/data_parallel.h"
#include "twins/models/vit.h"
#include "twins/models/weights.h"

namespace twins::train::detail {

SSLModel::SSLModel(const Recipe& recipe, int64_t num_classes) : recipe_(recipe), num_classes_(num_classes) {
  loss = losses::create_loss(recipe.loss, "loss");
  const losses::LossNeeds needs = loss->needs();
  backbone = register_module("backbone", models::create_backbone(recipe.backbone, "model.backbone"));
  in_channels = recipe.in_channels();
  projector =
      register_module("projector", models::create_head(recipe.projector, backbone->output_dim(), "model.projector"));
  if (needs.predictor) {
    if (recipe.predictor.is_null())
      throw std::invalid_argument("model.predictor: " + loss->title() + " needs a predictor");
    predictor =
        register_module("predictor", models::create_head(recipe.predictor, projector->output_dim(), "model.predictor"));
  }
  if (needs.momentum_target) {
    target_backbone = register_module("target_backbone", backbone->copy());
    target_projector = register_module("target_projector", projector->copy());
    for (auto& p : target_backbone->parameters()) p.set_requires_grad(false);
    for (auto& p : target_projector->parameters()) p.set_requires_grad(false);
  }
  if (num_classes > 0) probe = register_module("probe", torch::nn::Linear(backbone->output_dim(), num_classes));
}

void SSLModel::init_backbone(const std::string& path) {
  models::LoadedBackbone loaded;
  try {
    loaded = models::read_backbone(path);
  } catch (const std::invalid_argument& e) {  // the file's architecture metadata
    throw std::invalid_argument("model.backbone_init: " + std::string(e.what()));
  } catch (const std::runtime_error& e) {
    throw std::runtime_error("model.backbone_init: " + std::string(e.what()));
  }
  models::NamedTensors from = models::backbone_state(*loaded.network);
  const models::NamedTensors into = models::backbone_state(*backbone);
  std::vector<std::string> problems;
  // Settings that change the function without changing a shape (a ViT's heads, its pooling);
  // those of training or initialisation only may differ.
  nlohmann::json theirs = loaded.network->to_json(), ours = backbone->to_json();
  for (const char* key : {"num_classes", "zero_init_residual", "dropout", "attention_dropout", "drop_path"})
    theirs.erase(key), ours.erase(key);
  // A ViT trained at another image size (the same patches): its position embedding resampled to
  // this one's grid, as the ViT does for other input sizes at run time (bicubic, as timm's
  // resample_abs_pos_embed and DeiT's fine-tuning at 384 px).
  const auto* their_vit = dynamic_cast<const models::ViT*>(loaded.network.get());
  const auto* our_vit = dynamic_cast<const models::ViT*>(backbone.get());
  if (their_vit && our_vit && their_vit->options().patch_size == our_vit->options().patch_size &&
      their_vit->options().image_size != our_vit->options().image_size) {
    const int64_t grid = our_vit->options().image_size / our_vit->options().patch_size;
    at::NoGradGuard no_grad;
    for (auto& [name, tensor] : from)
      if (name == "encoder.pos_embedding") tensor = their_vit->position_embedding(grid, grid).contiguous();
    theirs.erase("image_size"), ours.erase("image_size");
  }
  for (const auto& [key, value] : ours.items())
    if (theirs.value(key, nlohmann::json()) != value)
      problems.push_back(key + ": file " + theirs.value(key, nlohmann::json()).dump() + ", model.backbone " +
                         value.dump());
  for (auto& p : models::state_differences(into, from, "model.backbone", "file")) problems.push_back(std::move(p));
  if (!problems.empty())
    throw std::invalid_argument(models::list_problems(
        "model.backbone_init: " + loaded.path + " holds another network than model.backbone " + recipe_.backbone.dump(),
        problems));
  models::copy_state_by_name(into, from);
  if (target_backbone) models::copy_state(*backbone, *target_backbone);
}

void SSLModel::set_channels_last() {
  for (auto* n : {&backbone, &target_backbone})
    if (*n)
      for (auto& p : (*n)->parameters())
        if (p.dim() == 4) p.set_data(p.data().contiguous(at::MemoryFormat::ChannelsLast));
}

void SSLModel::distribute(const std::shared_ptr<distributed::Communicator>& communicator, bool sync_batchnorm) {
  distributed::broadcast_module(*this, *communicator);
  if (sync_batchnorm) models::set_sync_batchnorm(*this, communicator);
  loss->set_communicator(communicator);
}

void SSLModel::broadcast_buffers(distributed::Communicator& communicator) {
  distributed::broadcast_buffers(*this, communicator);
}

std::vector<at::Tensor> SSLModel::online_parameters() const {
  std::vector<at::Tensor> out;
  for (const auto* n : {&backbone, &projector, &predictor})
    if (*n)
      for (const auto& p : (*n)->parameters()) out.push_back(p);
  return out;
}

std::vector<at::Tensor> SSLModel::online_buffers() const {
  std::vector<at::Tensor> out;
  for (const auto* n : {&backbone, &projector, &predictor})
    if (*n)
      for (const auto& b : (*n)->buffers()) out.push_back(b);
  return out;
}

SSLModel::Output SSLModel::forward(const std::vector<at::Tensor>& views) {
  Embedded e = embed(views);
  return {loss_of(e.views), e.features};
}

SSLModel::Embedded SSLModel::embed(const std::vector<at::Tensor>& views, bool with_target) {
  Embedded out;
  out.views.resize(views.size());
  for (size_t v = 0; v < views.size(); ++v) {
    const at::Tensor f = backbone->forward(views[v]);
    if (v == 0) out.features = f;
    out.views[v].projection = projector->forward(f);
    if (predictor) out.views[v].prediction = predictor->forward(out.views[v].projection);
  }
  if (target_backbone && with_target) {
    at::NoGradGuard no_grad;
    for (size_t v = 0; v < views.size(); ++v)
      out.views[v].target_projection = target_projector->forward(target_backbone->forward(views[v]));
  }
  // The losses run in fp32 (or the model's own fp64) even under mixed precision: their batch
  // statistics (variances, cross-correlation and covariance matrices) lose too much in bf16 or fp16.
  const compat::NoAutocast fp32_loss;
  for (auto& v : out.views)
    for (at::Tensor* t : {&v.projection, &v.prediction, &v.target_projection})
      if (t->defined() && (t->scalar_type() == at::kBFloat16 || t->scalar_type() == at::kHalf)) *t = t->to(at::kFloat);
  return out;
}

losses::LossOutput SSLModel::loss_of(const std::vector<losses::ViewEmbeddings>& e) const {
  const compat::NoAutocast fp32_loss;
  if (e.size() == 2) return loss->compute(e[0], e[1]);
  // Multi-crop: every pair with a global view (0 or 1), averaged.
  losses::LossOutput out;
  int pairs = 0;
  for (size_t i = 0; i < 2 && i < e.size(); ++i)
    for (size_t j = i + 1; j < e.size(); ++j) {
      losses::LossOutput l = loss->compute(e[i], e[j]);
      if (pairs++ == 0) {
        out = l;
        continue;
      }
      out.total = out.total + l.total;
      for (size_t t = 0; t < l.terms.size(); ++t) out.terms[t].second = out.terms[t].second + l.terms[t].second;
    }
  out.total = out.total / pairs;
  for (auto& t : out.terms) t.second = t.second / pairs;
  return out;
}

void SSLModel::ema_update(double tau) {
  if (!target_backbone) return;
  at::NoGradGuard no_grad;
  // Multi-tensor ops (a few launches on a GPU rather than two per tensor); the same arithmetic.
  std::vector<at::Tensor> targets, sources;
  auto collect = [&](const models::Network& online, models::Network& target) {
    auto src = online.named_parameters();
    for (auto& item : target.named_parameters()) targets.push_back(item.value()), sources.push_back(src[item.key()]);
    auto bsrc = online.named_buffers();
    for (auto& item : target.named_buffers()) {
      at::Tensor& t = item.value();
      if (t.is_floating_point())
        targets.push_back(t), sources.push_back(bsrc[item.key()]);
      else
        t.copy_(bsrc[item.key()]);  // num_batches_tracked
    }
  };
  collect(*backbone, *target_backbone);
  collect(*projector, *target_projector);
  if (targets.empty()) return;
  at::_foreach_mul_(targets, tau);
  at::_foreach_add_(targets, sources, 1.0 - tau);
}

models::NamedTensors SSLModel::state() const { return models::module_state(*this); }

void SSLModel::load_state(const models::SafeTensorsFile& file) { models::load_module_state(*this, file, "checkpoint"); }

std::shared_ptr<torch::nn::Module> SSLModel::clone(const c10::optional<c10::Device>& device) const {
  auto copy = std::make_shared<SSLModel>(recipe_, num_classes_);
  models::copy_state(*this, *copy);
  copy->train(is_training());
  if (device) copy->to(*device);
  return copy;
}

}  // namespace twins::train::detail

// The training step: views on the device -> forward under the recipe's precision -> loss ->
// backward with gradients averaged over ranks -> optimizer -> momentum target -> online probe.
#include "twins/train/trainer.h"

#include <ATen/ATen.h>
#include <torch/nn/functional/loss.h>
#include <torch/optim/sgd.h>

#include <cmath>
#include <nlohmann/json.hpp>

#include "core/compat.h"
#include "train/ssl_model.h"
#include "twins/augment/pipeline.h"
#include "twins/distributed/communicator.h"
#include "twins/distributed/data_parallel.h"
#include "twins/train/schedule.h"

namespace twins::train {
using nlohmann::json;

struct Trainer::Impl {
  Recipe recipe;
  TrainerOptions options;
  std::vector<augment::Normalization> normalizations;  // one per view
  std::shared_ptr<detail::SSLModel> model;
  std::shared_ptr<torch::optim::Optimizer> optimizer;
  std::unique_ptr<torch::optim::SGD> probe_optimizer;
  std::unique_ptr<distributed::GradientReducer> reducer, probe_reducer;
  Precision precision = Precision::fp32;
  int world = 1;
  double lr = 0, bias_lr = 0;
  int64_t warmup_steps = 0;
  int64_t step = 0;
  ProbeCounts probe;
  // Dynamic loss scaling for fp16 (torch.cuda.amp.GradScaler's defaults).
  double fp16_scale = 65536.0;
  int64_t fp16_good = 0;

  bool cuda() const { return options.device.is_cuda(); }

  std::vector<at::Tensor> inputs(const data::Batch& batch) const {
    if (batch.views.size() != normalizations.size())
      throw std::invalid_argument("Trainer::step: a batch with " + std::to_string(batch.views.size()) +
                                  " views for a recipe with " + std::to_string(normalizations.size()));
    std::vector<at::Tensor> xs;
    for (size_t v = 0; v < batch.views.size(); ++v) {
      at::Tensor x = augment::normalize_batch(batch.views[v], normalizations[v], options.device, at::kFloat);
      if (recipe.train.channels_last) x = x.contiguous(at::MemoryFormat::ChannelsLast);
      xs.push_back(std::move(x));
    }
    return xs;
  }

  // The probe learns from the (detached) backbone features of view 0, labelled samples only
  // (unlabelled ones are -1). Under data parallelism every rank steps the probe, even without
  // labels in its batch, so the collectives stay matched.
  void probe_step(const at::Tensor& features, const at::Tensor& batch_labels) {
    const at::Tensor labels = batch_labels.to(options.device);
    const at::Tensor valid = labels.ge(0);
    const int64_t labelled = valid.sum().item<int64_t>();
    if (labelled == 0 && !probe_reducer) return;
    const at::Tensor logits = model->probe->forward(features.detach().to(at::kFloat));
    const at::Tensor per_sample = torch::nn::functional::cross_entropy(
        logits, labels.clamp_min(0), torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kNone));
    const at::Tensor loss = (per_sample * valid).sum() / static_cast<double>(std::max<int64_t>(1, labelled));
    probe_optimizer->zero_grad();
    loss.backward();
    if (probe_reducer) probe_reducer->finish();
    probe_optimizer->step();
    probe.correct += (logits.argmax(1).eq(labels) * valid).sum().item<int64_t>();
    probe.seen += labelled;
  }
};

Trainer::Trainer(const Recipe& recipe, TrainerOptions options) : impl_(new Impl) {
  auto& m = *impl_;
  m.recipe = recipe;
  m.options = std::move(options);
  const TrainConfig& tc = recipe.train;
  m.precision = resolve_precision(tc.precision, m.cuda());
  if (!m.cuda() && m.precision == Precision::fp16)
    throw std::invalid_argument("train.precision: fp16 needs a CUDA device; use bf16 or fp32 on the CPU");
  if (m.options.steps_per_epoch < 1 || m.options.total_steps < 1)
    throw std::invalid_argument("Trainer: steps_per_epoch and total_steps must be >= 1");
  for (const auto& v : augment::parse_views(recipe.views, "views")) m.normalizations.push_back(v.normalization);
  const auto& comm = m.options.communicator;
  m.world = comm ? comm->world_size() : 1;

  m.model = std::make_shared<detail::SSLModel>(recipe, recipe.probe.enabled ? m.options.num_classes : 0);
  m.model->to(m.options.device);
  if (tc.channels_last) m.model->set_channels_last();
  m.model->train(true);
  const int64_t global_batch = tc.batch_size * m.world * tc.grad_accumulation;
  m.lr = scaled_lr(recipe.optimizer.base_lr, global_batch);
  m.bias_lr = recipe.optimizer.bias_base_lr >= 0 ? scaled_lr(recipe.optimizer.bias_base_lr, global_batch) : m.lr;
  m.warmup_steps = static_cast<int64_t>(
      std::llround(recipe.schedule.warmup_epochs * static_cast<double>(m.options.steps_per_epoch)));
  m.optimizer = detail::make_optimizer(recipe.optimizer, *m.model, m.lr, m.bias_lr);
  if (m.model->probe)
    m.probe_optimizer = std::make_unique<torch::optim::SGD>(
        m.model->probe->parameters(),
        torch::optim::SGDOptions(recipe.probe.lr).momentum(0.9).weight_decay(recipe.probe.weight_decay));
  if (comm) {  // every rank starts from rank 0's state
    m.model->distribute(comm, tc.sync_batchnorm);
    distributed::GradientReducerOptions ro;
    ro.bucket_mb = tc.bucket_mb;
    m.reducer = std::make_unique<distributed::GradientReducer>(m.model->online_parameters(), comm, ro);
    if (m.model->probe)
      m.probe_reducer = std::make_unique<distributed::GradientReducer>(m.model->probe->parameters(), comm, ro);
  }
}

Trainer::~Trainer() = default;

StepResult Trainer::step(const data::Batch& batch, bool stop_requested) {
  return step(std::vector<data::Batch>{batch}, stop_requested);
}

StepResult Trainer::step(const std::vector<data::Batch>& micro_batches, bool stop_requested) {
  auto& m = *impl_;
  const auto& comm = m.options.communicator;
  const int64_t accumulate = static_cast<int64_t>(micro_batches.size());
  if (accumulate < 1) throw std::invalid_argument("Trainer::step: no batch");
  const auto& total_steps = m.options.total_steps;
  const auto& sc = m.recipe.schedule;
  auto scheduled = [&](double base) {
    return warmup_cosine_lr(m.step, total_steps, m.warmup_steps, base, sc.final_lr_ratio, sc.warmup_start_lr);
  };
  // Random ops inside the networks (stochastic depth, dropout) draw from torch's generator: seeded
  // from (seed, step, rank) here, so a resumed run draws what an uninterrupted one would.
  const uint64_t rank = comm ? static_cast<uint64_t>(comm->rank()) : 0;
  at::manual_seed(static_cast<uint64_t>(m.recipe.train.seed) * 0x9E3779B97F4A7C15ULL +
                  static_cast<uint64_t>(m.step) * 0xBF58476D1CE4E5B9ULL + rank * 0x94D049BB133111EBULL);
  const double lr = scheduled(m.lr);
  detail::set_learning_rates(*m.optimizer, {lr, scheduled(m.bias_lr)});
  m.optimizer->zero_grad();

  StepResult result;
  // The loss and its terms of this step (summed over micro-batches, each weighted 1/accumulate).
  at::Tensor step_total;
  std::vector<at::Tensor> step_terms;
  const double weight = 1.0 / static_cast<double>(accumulate);
  for (int64_t micro = 0; micro < accumulate; ++micro) {
    const data::Batch& batch = micro_batches[static_cast<size_t>(micro)];
    const std::vector<at::Tensor> xs = m.inputs(batch);
    if (comm && !m.recipe.train.sync_batchnorm) m.model->broadcast_buffers(*comm);
    detail::SSLModel::Output out;
    {
      compat::Autocast autocast(m.options.device.type(), m.precision != Precision::fp32,
                                m.precision == Precision::fp16 ? at::kHalf : at::kBFloat16);
      out = m.model->forward(xs);
    }
    step_total = micro == 0 ? out.loss.total.detach() * weight : step_total + out.loss.total.detach() * weight;
    for (size_t k = 0; k < out.loss.terms.size(); ++k) {
      const at::Tensor t = out.loss.terms[k].second.detach() * weight;
      if (micro == 0)
        step_terms.push_back(t), result.terms.emplace_back(out.loss.terms[k].first, 0.0);
      else
        step_terms[k] = step_terms[k] + t;
    }
    // Only the last micro-batch's backward averages gradients over ranks.
    if (m.reducer) m.reducer->set_sync(micro + 1 == accumulate);
    at::Tensor objective = out.loss.total.to(at::kFloat) * weight;
    if (m.precision == Precision::fp16) objective = objective * m.fp16_scale;
    objective.backward();
    if (m.model->probe) m.probe_step(out.features, batch.labels);
    result.images += batch.views[0].size(0) * m.world;
  }

  // The loss and its terms averaged over ranks (what one process over the global batch
  // reports), and whether any rank asked to stop: one small all-reduce per step, so every rank
  // takes the same decisions at the same step.
  {
    std::vector<at::Tensor> parts{step_total.to(at::kDouble).reshape({1})};
    for (const auto& t : step_terms) parts.push_back(t.to(at::kDouble).reshape({1}));
    parts.push_back(
        at::full({1}, stop_requested ? 1.0 : 0.0, at::TensorOptions().dtype(at::kDouble).device(m.options.device)));
    at::Tensor shared = at::cat(parts);
    if (comm) comm->all_reduce(shared);
    shared = shared.to(at::kCPU);
    const double* v = shared.data_ptr<double>();
    result.loss = v[0] / m.world;
    for (size_t k = 0; k < step_terms.size(); ++k) result.terms[k].second = v[k + 1] / m.world;
    result.stop = v[step_terms.size() + 1] > 0;
  }
  if (!std::isfinite(result.loss)) {
    std::string terms;
    for (const auto& [name, value] : result.terms) terms += " " + name + "=" + std::to_string(value);
    throw NonFiniteLoss("step " + std::to_string(m.step) + ": the loss is not finite (total " +
                        std::to_string(result.loss) + ";" + terms + ")");
  }
  if (m.reducer) m.reducer->finish();
  if (m.precision == Precision::fp16) {    // unscale; skip the update and halve the scale on overflow
    std::vector<at::Tensor> finite_parts;  // one device-to-host read for all parameters
    for (auto& p : m.model->online_parameters())
      if (p.grad().defined()) {
        p.grad().div_(m.fp16_scale);
        finite_parts.push_back(p.grad().isfinite().all().reshape({1}));
      }
    const bool finite = finite_parts.empty() || at::cat(finite_parts).all().item<bool>();
    result.skipped = !finite;
    if (!finite)
      m.fp16_scale /= 2, m.fp16_good = 0;
    else if (++m.fp16_good % 2000 == 0)
      m.fp16_scale *= 2;
  }
  if (!result.skipped) m.optimizer->step();
  if (m.model->target_backbone) {
    result.tau = byol_tau(m.step, total_steps, m.recipe.tau_base);
    m.model->ema_update(*result.tau);
  }
  result.lr = lr;
  result.step = ++m.step;
  return result;
}

int64_t Trainer::steps_taken() const { return impl_->step; }
Precision Trainer::precision() const { return impl_->precision; }
const c10::Device& Trainer::device() const { return impl_->options.device; }
std::pair<double, double> Trainer::base_learning_rates() const { return {impl_->lr, impl_->bias_lr}; }
int Trainer::in_channels() const { return impl_->model->in_channels; }
models::Network& Trainer::backbone() { return *impl_->model->backbone; }
bool Trainer::probing() const { return static_cast<bool>(impl_->model->probe); }

Trainer::ProbeCounts Trainer::end_probe_epoch() {
  auto& m = *impl_;
  ProbeCounts c = m.probe;
  if (m.options.communicator) {  // the probe's accuracy over every rank's samples
    at::Tensor counts = at::tensor({c.correct, c.seen}, at::kLong).to(m.options.device);
    m.options.communicator->all_reduce(counts);
    counts = counts.to(at::kCPU);
    c.correct = counts[0].item<int64_t>(), c.seen = counts[1].item<int64_t>();
  }
  m.probe = {};
  return c;
}

at::Tensor Trainer::probe_logits(const at::Tensor& features) {
  auto& probe = impl_->model->probe;
  if (!probe) throw std::logic_error("Trainer::probe_logits: this recipe has no online probe");
  at::NoGradGuard no_grad;
  probe->eval();
  at::Tensor logits = probe->forward(features.to(impl_->options.device, at::kFloat)).to(at::kCPU);
  probe->train();
  return logits;
}

models::NamedTensors Trainer::state() const {
  const auto& m = *impl_;
  models::NamedTensors tensors = m.model->state();
  auto bytes_tensor = [](const std::vector<uint8_t>& b) {
    return at::from_blob(const_cast<uint8_t*>(b.data()), {static_cast<int64_t>(b.size())}, at::kByte).clone();
  };
  tensors.emplace_back("optimizer_state", bytes_tensor(detail::save_optimizer(*m.optimizer)));
  if (m.probe_optimizer)
    tensors.emplace_back("probe_optimizer_state", bytes_tensor(detail::save_optimizer(*m.probe_optimizer)));
  return tensors;
}

json Trainer::state_info() const {
  const auto& m = *impl_;
  return {{"step", m.step},
          {"probe_correct", m.probe.correct},
          {"probe_seen", m.probe.seen},
          {"fp16_scale", m.fp16_scale},
          {"fp16_good", m.fp16_good}};
}

void Trainer::load_state(const models::SafeTensorsFile& file, const json& info) {
  auto& m = *impl_;
  m.model->load_state(file);
  detail::load_optimizer(*m.optimizer, file.at("optimizer_state"));
  if (m.probe_optimizer && file.contains("probe_optimizer_state"))
    detail::load_optimizer(*m.probe_optimizer, file.at("probe_optimizer_state"));
  m.step = info.at("step").get<int64_t>();
  m.probe.correct = info.value("probe_correct", int64_t{0}), m.probe.seen = info.value("probe_seen", int64_t{0});
  m.fp16_scale = info.value("fp16_scale", m.fp16_scale);
  m.fp16_good = info.value("fp16_good", int64_t{0});
}

}  // namespace twins::train

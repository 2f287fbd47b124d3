// The training step: views on the device -> forward under the recipe's precision -> loss ->
// backward with gradients averaged over ranks -> optimizer -> momentum target -> online probe.
#include "twins/train/trainer.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/nn/functional/loss.h>
#include <torch/optim/sgd.h>

#include <cmath>
#include <exception>
#include <functional>
#include <iostream>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>

#include "core/compat.h"
#include "core/optimizer_state.h"
#include "train/cuda_graph.h"
#include "train/ssl_model.h"
#include "twins/augment/pipeline.h"
#include "twins/distributed/communicator.h"
#include "twins/distributed/data_parallel.h"
#include "twins/runtime.h"
#include "twins/train/schedule.h"

namespace twins::train {
using nlohmann::json;

struct Trainer::Impl {
  using Embedded = detail::SSLModel::Embedded;
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
  // The online probe's correct predictions, counted on the device (no read-back per step), and
  // its labelled samples, counted on the host.
  at::Tensor probe_correct;
  int64_t probe_seen = 0;
  // Per view, the normalization as x * scale + shift, on the device (made at the first step).
  std::vector<std::pair<at::Tensor, at::Tensor>> affine;
  // Dynamic loss scaling for fp16 (torch.cuda.amp.GradScaler's defaults).
  double fp16_scale = 65536.0;
  int64_t fp16_good = 0;

  // What one micro-batch's forward and backward leaves: the loss and its terms, detached and
  // weighted.
  struct Pass {
    at::Tensor total;
    std::vector<std::pair<std::string, at::Tensor>> terms;
  };

  // train.cuda_graph: after `warmup` eager steps of one shape (cuDNN's autotuning and cuBLAS's
  // workspaces done) the forward and backward of a step of that shape are captured (inputs copied
  // into `views` and `labels`, outputs in `out`, the gradients the capture left in `grads`) and
  // replayed by every later step of that shape.
  struct Graph {
    explicit Graph(const c10::Device& device) : cuda(std::make_unique<detail::CudaGraph>(device)) {}
    std::unique_ptr<detail::CudaGraph> cuda;
    static constexpr int64_t kWarmup = 3;
    int64_t warmup = kWarmup;
    std::vector<std::vector<int64_t>> shapes;  // of the views, during the warm-up
    std::vector<at::Tensor> views;
    at::Tensor labels, loss_scale;
    Pass out;
    std::vector<at::Tensor> params, grads;  // online and probe parameters, and their gradients
  };
  std::optional<Graph> graph;
  std::string graph_note;  // why train.cuda_graph is off, when it was asked for

  bool cuda() const { return options.device.is_cuda(); }

  // A view's uint8 images (any device) as the network's normalized float input.
  at::Tensor input(size_t v, const at::Tensor& images) {
    auto& [scale, shift] = affine[v];
    if (!scale.defined()) {
      auto [a, b] = augment::normalization_affine(normalizations[v], images.size(1));
      const auto opts = at::TensorOptions().dtype(at::kFloat).device(options.device);
      scale = a.to(opts), shift = b.to(opts);
    }
    at::Tensor x =
        at::addcmul(shift, images.to(options.device, /*non_blocking=*/images.is_pinned()).to(at::kFloat), scale);
    if (recipe.train.channels_last) x = x.contiguous(at::MemoryFormat::ChannelsLast);
    return x;
  }

  // Forward of every view under the recipe's precision, the loss, and backward of the loss x
  // `weight` (x the fp16 scale: `scale` on the device, else fp16_scale); with `labels` (on the
  // device), the probe's forward and backward too. Device work only, nothing read back: what a
  // CUDA graph captures.
  Pass forward_backward(const std::vector<at::Tensor>& views, const at::Tensor& labels, double weight,
                        const at::Tensor& scale) {
    const Embedded e = embed(views, /*with_target=*/true);
    detail::SSLModel::Output out{model->loss_of(e.views), e.features};
    Pass pass;
    pass.total = out.loss.total.detach() * weight;
    for (const auto& [name, value] : out.loss.terms) pass.terms.emplace_back(name, value.detach() * weight);
    at::Tensor objective = out.loss.total.to(at::kFloat) * weight;
    if (precision == Precision::fp16) objective = scale.defined() ? objective * scale : objective * fp16_scale;
    objective.backward();
    if (labels.defined()) probe_backward(out.features, labels);
    return pass;
  }

  // train.grad_cache: the loss over the whole step's batch. First every micro-batch's embeddings
  // without the autograd graph (the online networks' buffers restored afterwards, so BatchNorm's
  // statistics move once per micro-batch as without the cache), then the loss over all of them
  // and its gradient with respect to the embeddings, then each micro-batch's forward again with
  // the graph, backpropagating its slice of that gradient (and the probe's). `seed(i)` seeds
  // micro-batch i's random ops, so both forwards draw the same.
  Pass cached_forward_backward(const std::vector<data::Batch>& micro_batches, const std::vector<int64_t>& labelled,
                               const std::function<void(size_t)>& seed) {
    const auto& comm = options.communicator;
    const size_t k = micro_batches.size();
    std::vector<std::vector<losses::ViewEmbeddings>> parts(k);
    {
      // The buffers come back however this block ends (an error leaves the step undone).
      struct Restore {
        std::vector<at::Tensor> buffers, saved;
        ~Restore() {
          at::NoGradGuard no_grad;
          try {
            for (size_t b = 0; b < buffers.size(); ++b) buffers[b].copy_(saved[b]);
          } catch (...) {  // only after another error (a failing device), which propagates
          }
        }
      } restore;
      restore.buffers = model->online_buffers();
      for (const auto& b : restore.buffers) restore.saved.push_back(b.clone());
      at::NoGradGuard no_grad;
      for (size_t i = 0; i < k; ++i) {
        seed(i);
        parts[i] = embed(micro_batches[i].views, /*with_target=*/true).views;
      }
    }
    // The step's embeddings, leaves of the loss's graph: view v's field = the micro-batches' rows.
    std::vector<losses::ViewEmbeddings> whole(parts[0].size());
    auto join = [&](size_t v, at::Tensor losses::ViewEmbeddings::*field, bool leaf) {
      std::vector<at::Tensor> rows;
      for (const auto& p : parts) rows.push_back(p[v].*field);
      if (!rows[0].defined()) return;
      whole[v].*field = at::cat(rows);
      if (leaf) (whole[v].*field).requires_grad_(true);
    };
    for (size_t v = 0; v < whole.size(); ++v) {
      join(v, &losses::ViewEmbeddings::projection, true);
      join(v, &losses::ViewEmbeddings::prediction, true);
      join(v, &losses::ViewEmbeddings::target_projection, false);
    }
    parts.clear();
    const losses::LossOutput loss = model->loss_of(whole);
    Pass pass;
    pass.total = loss.total.detach();
    for (const auto& [name, value] : loss.terms) pass.terms.emplace_back(name, value.detach());
    at::Tensor objective = loss.total.to(at::kFloat);
    if (precision == Precision::fp16) objective = objective * fp16_scale;
    objective.backward();

    int64_t row = 0;
    for (size_t i = 0; i < k; ++i) {
      const data::Batch& batch = micro_batches[i];
      if (comm && !recipe.train.sync_batchnorm) model->broadcast_buffers(*comm);
      if (reducer) reducer->set_sync(i + 1 == k);
      seed(i);
      const Embedded e = embed(batch.views, /*with_target=*/false);
      const int64_t n = batch.views.at(0).size(0);
      std::vector<at::Tensor> outputs, grads;
      for (size_t v = 0; v < e.views.size(); ++v)
        for (auto field : {&losses::ViewEmbeddings::projection, &losses::ViewEmbeddings::prediction}) {
          const at::Tensor& leaf = whole[v].*field;
          if (!leaf.defined() || !leaf.grad().defined()) continue;  // (SimSiam's projections: detached targets)
          outputs.push_back(e.views[v].*field);
          grads.push_back(leaf.grad().narrow(0, row, n));
        }
      if (!outputs.empty()) torch::autograd::backward(outputs, grads);
      row += n;
      if (model->probe && (labelled[i] > 0 || probe_reducer)) {
        probe_optimizer->zero_grad();
        probe_backward(e.features, batch.labels.to(options.device));
        probe_update(labelled[i]);
      }
    }
    return pass;
  }

  // The online (and target) embeddings of one micro-batch's views under the recipe's precision.
  Embedded embed(const std::vector<at::Tensor>& views, bool with_target) {
    if (views.size() != normalizations.size())
      throw std::invalid_argument("Trainer::step: a batch with " + std::to_string(views.size()) +
                                  " views for a recipe with " + std::to_string(normalizations.size()));
    std::vector<at::Tensor> xs;
    for (size_t v = 0; v < views.size(); ++v) xs.push_back(input(v, views[v]));
    compat::Autocast autocast(options.device.type(), precision != Precision::fp32,
                              precision == Precision::fp16 ? at::kHalf : at::kBFloat16);
    return model->embed(xs, with_target);
  }

  // The probe learns from the (detached) backbone features of view 0, labelled samples only
  // (unlabelled ones are -1); its correct predictions are added up on the device.
  void probe_backward(const at::Tensor& features, const at::Tensor& labels) {
    const at::Tensor valid = labels.ge(0);
    const at::Tensor logits = model->probe->forward(features.detach().to(at::kFloat));
    const at::Tensor per_sample = torch::nn::functional::cross_entropy(
        logits, labels.clamp_min(0), torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kNone));
    const at::Tensor loss = (per_sample * valid).sum() / valid.sum().clamp_min(1);
    loss.backward();
    probe_correct.add_((logits.argmax(1).eq(labels) * valid).sum());
  }

  // The probe's update. Under data parallelism every rank steps the probe, even without labels
  // in its batch, so the collectives stay matched.
  void probe_update(int64_t labelled) {
    if (labelled == 0 && !probe_reducer) return;
    if (probe_reducer) probe_reducer->finish();
    probe_optimizer->step();
  }

  // The step's forward and backward through the CUDA graph, or nothing when the step runs
  // eagerly: during the warm-up, and for a batch of another shape than the captured one.
  std::optional<Pass> graphed(const data::Batch& batch) {
    Graph& g = *graph;
    if (!g.cuda->captured()) {  // warm up on kWarmup steps of the shape to capture
      std::vector<std::vector<int64_t>> shapes;
      for (const auto& x : batch.views) shapes.push_back(x.sizes().vec());
      if (shapes != g.shapes) g.shapes = std::move(shapes), g.warmup = Graph::kWarmup;
      if (g.warmup > 0) {
        --g.warmup;
        return std::nullopt;
      }
    }
    const bool probing = static_cast<bool>(model->probe);
    if (g.cuda->captured()) {
      if (batch.views.size() != g.views.size()) return std::nullopt;
      for (size_t v = 0; v < g.views.size(); ++v)
        if (batch.views[v].sizes() != g.views[v].sizes()) return std::nullopt;
    } else {  // the tensors the graph reads and writes, made before it
      g.views.clear();
      for (const auto& x : batch.views)
        g.views.push_back(at::empty(x.sizes(), at::TensorOptions().dtype(at::kByte).device(options.device)));
      if (probing)
        g.labels = at::empty({batch.labels.size(0)}, at::TensorOptions().dtype(at::kLong).device(options.device));
      g.loss_scale = at::empty({}, at::TensorOptions().dtype(at::kFloat).device(options.device));
    }
    for (size_t v = 0; v < g.views.size(); ++v)
      g.views[v].copy_(batch.views[v], /*non_blocking=*/batch.views[v].is_pinned());
    if (probing) g.labels.copy_(batch.labels, /*non_blocking=*/batch.labels.is_pinned());
    g.loss_scale.fill_(fp16_scale);
    if (!g.cuda->captured()) {
      // The gradients are made by the captured backward (not accumulated into old ones), so
      // that every replay leaves the step's own gradients in them.
      g.params = model->online_parameters();
      if (probing)
        for (const auto& p : model->probe->parameters()) g.params.push_back(p);
      for (auto& p : g.params) p.mutable_grad() = at::Tensor();
      try {
        g.cuda->capture([&] { g.out = forward_backward(g.views, g.labels, 1.0, g.loss_scale); });
      } catch (const std::exception& e) {
        throw std::runtime_error(
            std::string("train.cuda_graph: the step could not be captured in a CUDA graph (set train.cuda_graph to "
                        "false to train eagerly): ") +
            e.what());
      }
      g.grads.clear();
      for (const auto& p : g.params) g.grads.push_back(p.grad());
    }
    g.cuda->replay();
    for (size_t i = 0; i < g.params.size(); ++i) g.params[i].mutable_grad() = g.grads[i];  // after an eager step
    return g.out;
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
  if (!m.cuda()) ensure_correct_cpu_convolutions();
  if (m.options.steps_per_epoch < 1 || m.options.total_steps < 1)
    throw std::invalid_argument("Trainer: steps_per_epoch and total_steps must be >= 1");
  for (const auto& v : augment::parse_views(recipe.views, "views")) m.normalizations.push_back(v.normalization);
  m.affine.resize(m.normalizations.size());
  const auto& comm = m.options.communicator;
  m.world = comm ? comm->world_size() : 1;

  m.model = std::make_shared<detail::SSLModel>(recipe, recipe.probe.enabled ? m.options.num_classes : 0);
  if (!m.options.backbone_init.empty()) {
    // Rank 0 reads the file (distribute() below gives every rank its state); when it cannot,
    // the others hear so at once rather than waiting for its broadcast until the timeout.
    distributed::on_rank0(
        comm, [&] { m.model->init_backbone(m.options.backbone_init); },
        "start from model.backbone_init " + m.options.backbone_init);
  }
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
  if (m.model->probe) m.probe_correct = at::zeros({}, at::TensorOptions().dtype(at::kLong).device(m.options.device));
  if (tc.cuda_graph) {
    if (!m.cuda())
      m.graph_note = "the device is the CPU";
    else if (comm)
      m.graph_note = "data parallelism (its collectives are not captured)";
    else if (tc.grad_accumulation > 1)
      m.graph_note = "train.grad_accumulation > 1";
    else if (!detail::CudaGraph::supported())
      m.graph_note = "this build's LibTorch has no CUDA";
    else
      m.graph.emplace(m.options.device);
  }
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
  if (comm) comm->note_progress(m.step + 1);  // named by the other ranks if this one stops
  const auto& total_steps = m.options.total_steps;
  const auto& sc = m.recipe.schedule;
  auto scheduled = [&](double base) {
    return warmup_cosine_lr(m.step, total_steps, m.warmup_steps, base, sc.final_lr_ratio, sc.warmup_start_lr);
  };
  // Random ops inside the networks (stochastic depth, dropout) draw from torch's generator: seeded
  // from (seed, step, rank) here, so a resumed run draws what an uninterrupted one would.
  // Micro-batch i of the step reseeds with i (its random draws do not depend on how many the
  // previous ones made: the same with train.grad_cache's two forwards).
  const uint64_t rank = comm ? static_cast<uint64_t>(comm->rank()) : 0;
  const uint64_t step_seed = static_cast<uint64_t>(m.recipe.train.seed) * 0x9E3779B97F4A7C15ULL +
                             static_cast<uint64_t>(m.step) * 0xBF58476D1CE4E5B9ULL + rank * 0x94D049BB133111EBULL;
  auto seed = [step_seed](size_t micro) { at::manual_seed(step_seed + micro * 0xD6E8FEB86659FD93ULL); };
  seed(0);
  const double lr = scheduled(m.lr);
  detail::set_learning_rates(*m.optimizer, {lr, scheduled(m.bias_lr)});
  // With a CUDA graph, every step's work (warm-up, capture, replay, eager) runs on its side stream.
  std::optional<detail::CudaGraph::SideStream> side;
  if (m.graph) side.emplace(*m.graph->cuda);

  StepResult result;
  // The loss and its terms of this step (summed over micro-batches, each weighted 1/accumulate).
  at::Tensor step_total;
  std::vector<at::Tensor> step_terms;
  auto add = [&](const Impl::Pass& pass) {
    const bool first = !step_total.defined();
    step_total = first ? pass.total : step_total + pass.total;
    for (size_t k = 0; k < pass.terms.size(); ++k) {
      if (first)
        step_terms.push_back(pass.terms[k].second), result.terms.emplace_back(pass.terms[k].first, 0.0);
      else
        step_terms[k] = step_terms[k] + pass.terms[k].second;
    }
  };
  // Labelled samples per micro-batch, counted where the labels are (the loader's are on the CPU).
  std::vector<int64_t> labelled(static_cast<size_t>(accumulate), 0);
  if (m.model->probe)
    for (int64_t micro = 0; micro < accumulate; ++micro)
      labelled[static_cast<size_t>(micro)] =
          micro_batches[static_cast<size_t>(micro)].labels.ge(0).sum().item<int64_t>();

  std::optional<Impl::Pass> replayed;
  if (m.graph && accumulate == 1) replayed = m.graphed(micro_batches[0]);
  if (replayed) {
    add(*replayed);
    if (m.model->probe) m.probe_update(labelled[0]);
  } else if (m.recipe.train.grad_cache && accumulate > 1) {
    m.optimizer->zero_grad();
    add(m.cached_forward_backward(micro_batches, labelled, seed));
  } else {
    m.optimizer->zero_grad();
    const double weight = 1.0 / static_cast<double>(accumulate);
    for (int64_t micro = 0; micro < accumulate; ++micro) {
      const data::Batch& batch = micro_batches[static_cast<size_t>(micro)];
      seed(static_cast<size_t>(micro));
      if (comm && !m.recipe.train.sync_batchnorm) m.model->broadcast_buffers(*comm);
      // Only the last micro-batch's backward averages gradients over ranks.
      if (m.reducer) m.reducer->set_sync(micro + 1 == accumulate);
      const bool probe = m.model->probe && (labelled[static_cast<size_t>(micro)] > 0 || m.probe_reducer);
      if (probe) m.probe_optimizer->zero_grad();
      add(m.forward_backward(batch.views, probe ? batch.labels.to(m.options.device) : at::Tensor(), weight,
                             at::Tensor()));
      if (probe) m.probe_update(labelled[static_cast<size_t>(micro)]);
    }
  }
  for (int64_t micro = 0; micro < accumulate; ++micro) {
    result.images += micro_batches[static_cast<size_t>(micro)].views.at(0).size(0) * m.world;
    m.probe_seen += labelled[static_cast<size_t>(micro)];
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
    else if (++m.fp16_good % 2000 == 0 && m.fp16_scale * 2 <= std::numeric_limits<float>::max())
      m.fp16_scale *= 2;  // (PyTorch keeps the scale in fp32 and never grows it to inf)
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
bool Trainer::cuda_graph() const { return impl_->graph.has_value(); }
const std::string& Trainer::cuda_graph_note() const { return impl_->graph_note; }
int Trainer::in_channels() const { return impl_->model->in_channels; }
models::Network& Trainer::backbone() { return *impl_->model->backbone; }
bool Trainer::probing() const { return static_cast<bool>(impl_->model->probe); }

Trainer::ProbeCounts Trainer::probe_counts() {
  auto& m = *impl_;
  ProbeCounts c;
  if (m.probe_correct.defined()) c.correct = m.probe_correct.item<int64_t>();
  c.seen = m.probe_seen;
  if (m.options.communicator) {  // the probe's accuracy over every rank's samples
    at::Tensor counts = at::tensor({c.correct, c.seen}, at::kLong).to(m.options.communicator->device());
    m.options.communicator->all_reduce(counts);
    counts = counts.to(at::kCPU);
    c.correct = counts[0].item<int64_t>(), c.seen = counts[1].item<int64_t>();
  }
  return c;
}

Trainer::ProbeCounts Trainer::end_probe_epoch() {
  auto& m = *impl_;
  const ProbeCounts c = probe_counts();
  if (m.probe_correct.defined()) m.probe_correct.zero_();
  m.probe_seen = 0;
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
  tensors.emplace_back("optimizer_state", bytes_tensor(save_optimizer_state(*m.optimizer)));
  if (m.probe_optimizer)
    tensors.emplace_back("probe_optimizer_state", bytes_tensor(save_optimizer_state(*m.probe_optimizer)));
  return tensors;
}

json Trainer::state_info() const {
  const auto& m = *impl_;
  return {{"step", m.step},
          {"probe_correct", m.probe_correct.defined() ? m.probe_correct.item<int64_t>() : int64_t{0}},
          {"probe_seen", m.probe_seen},
          {"fp16_scale", m.fp16_scale},
          {"fp16_good", m.fp16_good}};
}

void Trainer::load_state(const models::SafeTensorsFile& file, const json& info) {
  auto& m = *impl_;
  m.model->load_state(file);
  load_optimizer_state(*m.optimizer, file.at("optimizer_state"));
  if (m.probe_optimizer && file.contains("probe_optimizer_state"))
    load_optimizer_state(*m.probe_optimizer, file.at("probe_optimizer_state"));
  m.step = info.at("step").get<int64_t>();
  const bool counts_here = !m.options.communicator || m.options.communicator->rank() == 0;  // the job's counts
  if (m.probe_correct.defined()) m.probe_correct.fill_(counts_here ? info.value("probe_correct", int64_t{0}) : 0);
  m.probe_seen = counts_here ? info.value("probe_seen", int64_t{0}) : 0;
  m.fp16_scale = info.value("fp16_scale", m.fp16_scale);
  m.fp16_good = info.value("fp16_good", int64_t{0});
}

}  // namespace twins::train

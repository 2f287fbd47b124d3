#include "twins/eval/probe.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/nn/functional/loss.h>
#include <torch/nn/modules/linear.h>
#include <torch/optim/sgd.h>

#include <chrono>
#include <cmath>
#include <stdexcept>

#include "core/optimizer_state.h"
#include "twins/augment/random.h"
#include "twins/schedule.h"

namespace twins::eval {

Accuracy accuracy_of(const at::Tensor& logits, const at::Tensor& labels) {
  Accuracy a;
  const int64_t n = labels.size(0);
  if (n == 0) return a;
  const int64_t k = std::min<int64_t>(5, logits.size(1));
  const at::Tensor top = std::get<1>(logits.topk(k, 1));
  const at::Tensor hit = top.eq(labels.view({-1, 1}));
  a.top1 = 100.0 * hit.select(1, 0).sum().item<double>() / static_cast<double>(n);
  a.top5 = 100.0 * hit.any(1).sum().item<double>() / static_cast<double>(n);
  return a;
}

namespace {

void check(const Features& f, const char* what) {
  if (!f.features.defined() || f.features.dim() != 2 || f.labels.dim() != 1 || f.labels.size(0) != f.features.size(0))
    throw std::invalid_argument(std::string(what) + ": expected features [N, D] and labels [N]");
}

// One LibTorch intra-op thread while it lives, for a small problem on the CPU: a step of the
// cached-feature probe (batch x features x classes, e.g. 256 x 192 x 10) is a few microseconds of
// arithmetic, and handing each of its ~20 ops to the thread pool costs more than the ops (Fashion-
// MNIST, 100 epochs: 5 s on one thread, 19-34 s on two). Large problems keep every thread.
class OneThreadForSmallSteps {
 public:
  OneThreadForSmallSteps(const at::Device& device, int64_t macs_per_step) : before_(at::get_num_threads()) {
    if (device.is_cpu() && macs_per_step < (int64_t{1} << 24) && before_ > 1) at::set_num_threads(1);
  }
  ~OneThreadForSmallSteps() {
    if (at::get_num_threads() != before_) at::set_num_threads(before_);
  }
  OneThreadForSmallSteps(const OneThreadForSmallSteps&) = delete;
  OneThreadForSmallSteps& operator=(const OneThreadForSmallSteps&) = delete;

 private:
  int before_;
};

// Labelled rows only.
Features labelled(const Features& f) {
  const at::Tensor mask = f.labels.ge(0);
  return {f.features.index({mask}), f.labels.index({mask})};
}

}  // namespace

struct ProbeHead::Impl {
  at::Tensor mean, std;
  torch::nn::Linear linear{nullptr};
  std::unique_ptr<torch::optim::SGD> sgd;
  LinearProbeOptions options;
  int64_t total = 1, done = 0;
  at::Device device{at::kCPU};
};

ProbeHead::ProbeHead(const at::Tensor& mean, const at::Tensor& std, int64_t num_classes, const LinearProbeOptions& o,
                     int64_t total_steps, const at::Device& device)
    : impl_(new Impl) {
  auto& m = *impl_;
  if (num_classes < 2) throw std::invalid_argument("linear_probe: needs at least 2 classes");
  m.device = device, m.options = o, m.total = std::max<int64_t>(1, total_steps);
  m.mean = mean.to(device, at::kFloat), m.std = std.to(device, at::kFloat).clamp_min(1e-6);
  at::manual_seed(o.seed);
  m.linear = torch::nn::Linear(mean.size(0), num_classes);
  m.linear->to(device);
  m.sgd = std::make_unique<torch::optim::SGD>(
      m.linear->parameters(), torch::optim::SGDOptions(o.lr).momentum(o.momentum).weight_decay(o.weight_decay));
}

ProbeHead::~ProbeHead() = default;

void ProbeHead::step(const at::Tensor& features, const at::Tensor& labels_all) {
  const at::Tensor labels = labels_all.to(impl_->device);
  const at::Tensor keep = labels.ge(0);
  if (!keep.any().item<bool>()) {
    ++impl_->done;  // the schedule moves on as if the batch had been used
    return;
  }
  at::Tensor x = features.to(impl_->device, at::kFloat).index({keep});
  standardise_(x);
  step_standardised(x, labels.index({keep}));
}

void ProbeHead::standardise_(at::Tensor& features) const { features.sub_(impl_->mean).div_(impl_->std); }

void ProbeHead::step_standardised(const at::Tensor& x, const at::Tensor& y) {
  auto& m = *impl_;
  const double lr = warmup_cosine_lr(m.done++, m.total, 0, m.options.lr, 0.0);
  for (auto& g : m.sgd->param_groups()) g.options().set_lr(lr);
  const at::Tensor loss = torch::nn::functional::cross_entropy(m.linear->forward(x), y);
  m.sgd->zero_grad();
  loss.backward();
  m.sgd->step();
}

std::pair<at::Tensor, at::Tensor> ProbeHead::parameters() const {
  return {impl_->linear->weight.detach().cpu().clone(), impl_->linear->bias.detach().cpu().clone()};
}

std::vector<std::pair<std::string, at::Tensor>> ProbeHead::state() const {
  const auto& m = *impl_;
  const std::vector<uint8_t> bytes = save_optimizer_state(*m.sgd);
  return {{"probe.weight", m.linear->weight.detach().cpu().clone()},
          {"probe.bias", m.linear->bias.detach().cpu().clone()},
          {"probe.optimizer_state",
           at::from_blob(const_cast<uint8_t*>(bytes.data()), {static_cast<int64_t>(bytes.size())}, at::kByte).clone()},
          {"probe.steps", at::full({1}, m.done, at::kLong)}};
}

void ProbeHead::load_state(const std::vector<std::pair<std::string, at::Tensor>>& state) {
  auto& m = *impl_;
  auto find = [&](const std::string& name, at::IntArrayRef shape, at::ScalarType type) {
    for (const auto& [key, t] : state)
      if (key == name) {
        if ((!shape.empty() && t.sizes() != shape) || t.scalar_type() != type)
          throw std::runtime_error("probe state: " + name + " has shape " + at::str(t.sizes()) + " (" +
                                   std::string(c10::toString(t.scalar_type())) + "), the classifier needs " +
                                   at::str(shape.empty() ? t.sizes() : shape) + " (" + c10::toString(type) + ")");
        return t;
      }
    throw std::runtime_error("probe state: " + name + " is missing");
  };
  const at::Tensor weight = find("probe.weight", m.linear->weight.sizes(), at::kFloat);
  const at::Tensor bias = find("probe.bias", m.linear->bias.sizes(), at::kFloat);
  const at::Tensor steps = find("probe.steps", {1}, at::kLong);
  const at::Tensor bytes = find("probe.optimizer_state", {}, at::kByte);
  {
    at::NoGradGuard no_grad;
    m.linear->weight.copy_(weight);
    m.linear->bias.copy_(bias);
  }
  load_optimizer_state(*m.sgd, bytes);
  m.done = steps.item<int64_t>();
}

Accuracy ProbeHead::score(const Features& all) {
  at::NoGradGuard no_grad;
  const Features f = labelled(all);  // its own copy: standardised in place
  at::Tensor x = f.features.to(impl_->device, at::kFloat);
  standardise_(x);
  return accuracy_of(impl_->linear->forward(x), f.labels.to(impl_->device));
}

LinearProbeResult linear_probe(const Features& train_all, const Features& test_all, int64_t num_classes,
                               const LinearProbeOptions& o, const at::Device& device) {
  check(train_all, "linear_probe train"), check(test_all, "linear_probe test");
  const auto start = std::chrono::steady_clock::now();
  const Features train = labelled(train_all);
  if (train.labels.size(0) == 0) throw std::invalid_argument("linear_probe: the training set has no labels");
  const int64_t n = train.labels.size(0);
  const int64_t batches = (n + o.batch_size - 1) / o.batch_size;
  ProbeHead head(train.features.mean(0), train.features.std(0), num_classes, o, batches * o.epochs, device);
  // Standardised once, in place (`train` is this function's own copy; no second copy of a large
  // feature set): the same rows, bit for bit, as standardising each batch.
  at::Tensor x = train.features.to(device, at::kFloat);
  head.standardise_(x);
  const at::Tensor y = train.labels.to(device);
  const OneThreadForSmallSteps threads(device, o.batch_size * x.size(1) * num_classes);
  for (int64_t e = 0; e < o.epochs; ++e) {
    const at::Tensor perm =
        at::tensor(augment::permutation(n, augment::Rng(o.seed, static_cast<uint64_t>(e), 0, 0)), at::kLong).to(device);
    for (int64_t b = 0; b < batches; ++b) {
      const at::Tensor idx = perm.slice(0, b * o.batch_size, std::min(n, (b + 1) * o.batch_size));
      head.step_standardised(x.index_select(0, idx), y.index_select(0, idx));
    }
  }
  LinearProbeResult r;
  r.num_classes = num_classes;
  r.train = head.score(train_all);
  r.test = head.score(test_all);
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return r;
}

std::map<int64_t, Accuracy> knn(const Features& train_all, const Features& test_all, int64_t num_classes,
                                const KnnOptions& o, const at::Device& device) {
  check(train_all, "knn train"), check(test_all, "knn test");
  const Features train = labelled(train_all), test = labelled(test_all);
  if (train.labels.size(0) == 0 || o.k.empty())
    throw std::invalid_argument("knn: needs labelled training samples and k");
  if (!(o.temperature > 0)) throw std::invalid_argument("knn: temperature must be > 0");
  auto normalise = [](const at::Tensor& f) { return f / f.norm(2, {1}, true).clamp_min(1e-12); };
  const at::Tensor bank = normalise(train.features.to(at::kFloat)).to(device);
  const at::Tensor bank_labels = train.labels.to(device);
  const int64_t n_train = bank.size(0);
  int64_t k_max = 0;
  for (int64_t k : o.k) k_max = std::max(k_max, std::min(k, n_train));
  std::map<int64_t, std::pair<double, double>> hits;  // k -> (top1 hits, top5 hits)
  const int64_t n = test.labels.size(0);
  at::NoGradGuard no_grad;
  for (int64_t start = 0; start < n; start += o.chunk) {
    const int64_t end = std::min(n, start + o.chunk);
    const at::Tensor q = normalise(test.features.slice(0, start, end).to(at::kFloat)).to(device);
    const at::Tensor labels = test.labels.slice(0, start, end).to(device);
    const auto [sim, idx] = q.mm(bank.t()).topk(k_max, 1);  // sorted, nearest first
    const at::Tensor neighbour_labels = bank_labels.index_select(0, idx.flatten()).view(idx.sizes());
    const at::Tensor weights = (sim / o.temperature).exp();
    for (int64_t k_given : o.k) {
      const int64_t k = std::min(k_given, n_train);
      at::Tensor votes = at::zeros({end - start, num_classes}, weights.options());
      votes.scatter_add_(1, neighbour_labels.slice(1, 0, k), weights.slice(1, 0, k));
      const Accuracy a = accuracy_of(votes, labels);
      hits[k_given].first += a.top1 * static_cast<double>(end - start);
      hits[k_given].second += a.top5 * static_cast<double>(end - start);
    }
  }
  std::map<int64_t, Accuracy> out;
  for (const auto& [k, h] : hits) out[k] = {h.first / static_cast<double>(n), h.second / static_cast<double>(n)};
  return out;
}

}  // namespace twins::eval

#include "twins/eval/finetune.h"

#include <ATen/ATen.h>
#include <torch/nn/functional/loss.h>
#include <torch/nn/modules/linear.h>
#include <torch/optim/sgd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <optional>
#include <sstream>
#include <stdexcept>

#include "core/compat.h"
#include "twins/augment/random.h"
#include "twins/data/loader.h"
#include "twins/eval/evaluate.h"
#include "twins/eval/features.h"
#include "twins/runtime.h"

namespace twins::eval {
namespace fs = std::filesystem;

namespace {

std::vector<int64_t> listed_samples(const data::Dataset& dataset, const std::string& file) {
  std::ifstream in(file);
  if (!in) throw std::runtime_error("finetune.subset: cannot open " + file);
  // Every sample under its id and under its id's file name; a name two samples share is
  // ambiguous (-1).
  std::map<std::string, int64_t> by_name;
  auto add = [&](const std::string& name, int64_t i) {
    const auto [it, inserted] = by_name.emplace(name, i);
    if (!inserted && it->second != i) it->second = -1;
  };
  for (int64_t i = 0; i < dataset.size(); ++i) {
    const std::string id = dataset.id(i);
    add(id, i);
    add(fs::path(id).filename().string(), i);
  }
  std::vector<int64_t> chosen;
  std::vector<bool> taken(static_cast<size_t>(dataset.size()), false);
  std::string line;
  for (int64_t number = 1; std::getline(in, line); ++number) {
    while (!line.empty() && (line.back() == '\r' || line.back() == ' ' || line.back() == '\t')) line.pop_back();
    if (line.empty()) continue;
    const std::string where = file + " line " + std::to_string(number) + ": \"" + line + "\"";
    const auto it = by_name.find(line);
    if (it == by_name.end()) throw std::runtime_error("finetune.subset: " + where + " names no training sample");
    if (it->second < 0)
      throw std::runtime_error("finetune.subset: " + where + " names several training samples; give their ids");
    if (dataset.label(it->second) < 0) throw std::runtime_error("finetune.subset: " + where + " has no label");
    if (!taken[static_cast<size_t>(it->second)]) chosen.push_back(it->second);
    taken[static_cast<size_t>(it->second)] = true;
  }
  if (in.bad()) throw std::runtime_error("finetune.subset: cannot read " + file);
  if (chosen.empty()) throw std::runtime_error("finetune.subset: " + file + " names no sample");
  std::sort(chosen.begin(), chosen.end());
  return chosen;
}

// PyTorch's CosineAnnealingLR(T_max = epochs) at `epoch`, eta_min 0.
double cosine(double base, int64_t epoch, int64_t epochs) {
  return base * 0.5 * (1.0 + std::cos(M_PI * static_cast<double>(epoch) / static_cast<double>(epochs)));
}

}  // namespace

std::vector<int64_t> select_train_samples(const data::Dataset& dataset, double train_percent,
                                          const std::string& subset_file, uint64_t seed) {
  if (!subset_file.empty()) return listed_samples(dataset, subset_file);
  if (!(train_percent > 0 && train_percent <= 100))
    throw std::invalid_argument("finetune.train_percent: must be in (0, 100], got " + std::to_string(train_percent));
  std::map<int64_t, std::vector<int64_t>> by_class;
  for (int64_t i = 0; i < dataset.size(); ++i)
    if (const int64_t label = dataset.label(i); label >= 0) by_class[label].push_back(i);
  if (by_class.empty()) throw std::runtime_error("finetune: the training set has no labelled sample");
  std::vector<int64_t> chosen;
  for (const auto& [label, members] : by_class) {
    const auto n = static_cast<int64_t>(members.size());
    const int64_t take = std::clamp<int64_t>(std::llround(static_cast<double>(n) * train_percent / 100.0), 1, n);
    if (take == n) {
      chosen.insert(chosen.end(), members.begin(), members.end());
      continue;
    }
    const auto order = augment::permutation(n, augment::Rng(seed, static_cast<uint64_t>(label), 0, 0));
    for (int64_t k = 0; k < take; ++k) chosen.push_back(members[static_cast<size_t>(order[static_cast<size_t>(k)])]);
  }
  std::sort(chosen.begin(), chosen.end());
  return chosen;
}

FinetuneRun run_finetune(const std::string& backbone, const EvalConfig& c) {
  const auto start = std::chrono::steady_clock::now();
  const FinetuneOptions& o = c.finetune;
  const at::Device device = resolve_eval_device(c.device);
  configure_compute(0, /*deterministic=*/false, device);
  if (device.is_cpu())  // training on the CPU: make sure its convolutions are right first
    if (const std::string& warning = ensure_correct_cpu_convolutions(); !warning.empty())
      std::cerr << "warning: " << warning << "\n";
  const bool frozen = o.lr_backbone == 0;
  const bool bf16 = o.precision == "bf16" || (o.precision == "auto" && device.is_cuda());
  FinetuneRun run;

  std::shared_ptr<models::Network> net = open_backbone(backbone);
  net->to(device);
  const int channels = static_cast<int>(net->to_json().value("in_channels", 3));
  auto train_all = data::create_dataset(c.train_data, "train_data");
  auto test = data::create_dataset(c.test_data, "test_data");
  run.num_classes = std::max(train_all->num_classes(), test->num_classes());
  if (run.num_classes < 2)
    throw std::invalid_argument("finetune: train_data and test_data need at least 2 classes, they have " +
                                std::to_string(run.num_classes));
  // The training samples: a subset when asked for (or to leave unlabelled ones out).
  std::shared_ptr<const data::Dataset> train = train_all;
  if (train_all->streaming()) {
    if (!o.subset.empty() || o.train_percent < 100)
      throw std::invalid_argument(
          "finetune.train_percent/subset: train_data is a streaming dataset (tar shards); a subset needs an indexed "
          "one (an image folder, a list or a binary dataset)");
    run.train_samples = train_all->size();
  } else {
    auto indices = select_train_samples(*train_all, o.train_percent, o.subset, o.seed);
    run.train_samples = static_cast<int64_t>(indices.size());
    if (run.train_samples != train_all->size()) train = data::subset(train_all, std::move(indices));
  }

  // The classifier, initialised as the official evaluate.py does.
  at::manual_seed(o.seed);
  run.feature_dim = net->output_dim();
  torch::nn::Linear head(run.feature_dim, run.num_classes);
  {
    at::NoGradGuard no_grad;
    head->weight.normal_(0.0, 0.01);
    head->bias.zero_();
  }
  head->to(device);
  std::vector<at::Tensor> backbone_parameters = net->parameters();
  for (auto& p : backbone_parameters) p.set_requires_grad(!frozen);
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(head->parameters(), std::make_unique<torch::optim::SGDOptions>(o.lr_head));
  if (!frozen) groups.emplace_back(backbone_parameters, std::make_unique<torch::optim::SGDOptions>(o.lr_backbone));
  torch::optim::SGD sgd(std::move(groups),
                        torch::optim::SGDOptions(o.lr_head).momentum(o.momentum).weight_decay(o.weight_decay));
  auto set_lr = [&](int64_t epoch) {  // every group's options, whatever the LibTorch merged them from
    auto& g = sgd.param_groups();
    for (size_t k = 0; k < g.size(); ++k) {
      auto& opts = static_cast<torch::optim::SGDOptions&>(g[k].options());
      opts.lr(cosine(k == 0 ? o.lr_head : o.lr_backbone, epoch, o.epochs));
      opts.momentum(o.momentum).weight_decay(o.weight_decay);
    }
  };

  augment::View view;
  view.ops.push_back(augment::create_op(
      {{"type", "random_resized_crop"}, {"size", c.image_size}, {"scale", o.crop_scale}, {"interpolation", "bilinear"}},
      "finetune"));
  view.ops.push_back(augment::create_op({{"type", "random_horizontal_flip"}}, "finetune"));
  view.size = {c.image_size, c.image_size};
  view.normalization = c.normalization;
  data::LoaderOptions lo;
  lo.batch_size = o.batch_size, lo.workers = c.workers, lo.seed = o.seed, lo.channels = channels;
  // A batch of one would leave BatchNorm without statistics: the last incomplete batch is dropped
  // unless it is the only one.
  lo.drop_last = run.train_samples > o.batch_size;
  lo.pin_memory = device.is_cuda();
  data::Loader loader(train, {view}, lo);
  const int64_t batches = loader.batches_per_epoch();

  std::ostringstream protocol;
  protocol << (frozen ? "frozen backbone (lr_backbone 0)" : "fine-tuned backbone") << ", " << run.train_samples
           << " training samples ";
  if (o.subset.empty())
    protocol << "(" << o.train_percent << "% of each class)";
  else
    protocol << "(listed in " << o.subset << ")";
  protocol << ", random resized crop [" << o.crop_scale[0] << ", " << o.crop_scale[1] << "] + flip, " << o.epochs
           << " epochs, " << (bf16 ? "bf16 autocast" : "fp32");
  run.protocol = protocol.str();
  std::cerr << "  " << run.protocol << "\n";

  auto last = start;
  for (int64_t epoch = 0; epoch < o.epochs; ++epoch) {
    set_lr(epoch);
    net->train(!frozen);  // frozen: BatchNorm keeps its statistics (the official `--weights freeze`)
    head->train();
    loader.start_epoch(epoch);
    at::Tensor loss_sum = at::zeros({}, at::TensorOptions().dtype(at::kDouble).device(device));
    int64_t done = 0, used = 0;
    while (auto batch = loader.next()) {
      ++done;
      const at::Tensor keep = batch->labels.ge(0);
      const int64_t labelled = keep.sum().item<int64_t>();
      if (labelled == 0) continue;
      at::Tensor x = augment::normalize_batch(batch->views[0], view.normalization, device, at::kFloat);
      at::Tensor y = batch->labels.to(device, /*non_blocking=*/batch->labels.is_pinned());
      if (labelled < y.size(0)) {
        const at::Tensor k = keep.to(device);
        x = x.index({k}), y = y.index({k});
      }
      at::Tensor logits;
      {
        compat::Autocast autocast(device.type(), bf16, at::kBFloat16);
        std::optional<at::NoGradGuard> no_grad;
        if (frozen) no_grad.emplace();
        at::Tensor features = net->forward(x);
        no_grad.reset();
        logits = head->forward(features.to(at::kFloat));
      }
      const at::Tensor loss = torch::nn::functional::cross_entropy(logits.to(at::kFloat), y);
      sgd.zero_grad();
      loss.backward();
      sgd.step();
      loss_sum.add_(loss.detach());
      ++used;
      const auto now = std::chrono::steady_clock::now();
      if (std::chrono::duration<double>(now - last).count() > 10) {
        const double elapsed = std::chrono::duration<double>(now - start).count();
        const double fraction = static_cast<double>(epoch * batches + done) / static_cast<double>(batches * o.epochs);
        std::cerr << "  finetune: epoch " << epoch + 1 << "/" << o.epochs << ", batch " << done << "/" << batches
                  << ", ETA " << static_cast<int64_t>(elapsed / std::max(1e-9, fraction) - elapsed) << " s\n";
        last = now;
      }
    }
    const double mean_loss = used ? loss_sum.item<double>() / static_cast<double>(used) : 0.0;
    if (!std::isfinite(mean_loss))
      throw std::runtime_error("finetune: the loss is not finite in epoch " + std::to_string(epoch + 1) +
                               " (lower finetune.lr_backbone or finetune.lr_head)");
    run.epoch_loss.push_back(mean_loss);
    std::cerr << "  finetune: epoch " << epoch + 1 << "/" << o.epochs << " loss " << mean_loss << " (lr head "
              << cosine(o.lr_head, epoch, o.epochs) << ", backbone " << cosine(o.lr_backbone, epoch, o.epochs) << ")\n";
  }

  // Scored on the test set's centre crops, backbone in evaluation mode.
  for (auto& p : backbone_parameters) p.set_requires_grad(true);
  net->eval();
  head->eval();
  ExtractOptions xo;
  xo.batch_size = c.batch_size, xo.workers = c.workers, xo.channels = channels, xo.what = "test features";
  const Features f = extract_features(*net, test, eval_view(*test, c.image_size, c.normalization), device, xo);
  {
    at::NoGradGuard no_grad;
    const at::Tensor mask = f.labels.ge(0);
    const at::Tensor logits = head->forward(f.features.index({mask}).to(device, at::kFloat));
    run.test = accuracy_of(logits, f.labels.index({mask}).to(device));
    run.test_samples = mask.sum().item<int64_t>();
  }
  net->to(at::kCPU);
  run.backbone = net;
  run.head_weight = head->weight.detach().to(at::kCPU).clone();
  run.head_bias = head->bias.detach().to(at::kCPU).clone();
  run.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return run;
}

}  // namespace twins::eval

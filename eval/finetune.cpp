#include "twins/eval/finetune.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/nn/functional/loss.h>
#include <torch/nn/modules/linear.h>
#include <torch/optim/sgd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <unordered_map>

#include "core/compat.h"
#include "core/optimizer_state.h"
#include "core/tensorboard.h"
#include "eval/progress.h"
#include "twins/augment/random.h"
#include "twins/data/loader.h"
#include "twins/distributed/communicator.h"
#include "twins/distributed/data_parallel.h"
#include "twins/eval/evaluate.h"
#include "twins/eval/features.h"
#include "twins/eval/transform.h"
#include "twins/io.h"
#include "twins/models/safetensors.h"
#include "twins/models/weights.h"
#include "twins/runtime.h"

namespace twins::eval {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// The fine-tuning checkpoint's metadata keys.
constexpr const char* kSettingsKey = "twins_finetune_settings";
constexpr const char* kEpochsKey = "twins_finetune_epochs_done";
constexpr const char* kLossKey = "twins_finetune_epoch_loss";
constexpr const char* kTestKey = "twins_finetune_test_per_epoch";
constexpr const char* kWorldKey = "twins_finetune_world_size";
constexpr const char* kSecondsKey = "twins_finetune_seconds";  // spent by the calls before
// Written mid-epoch: the next epoch's place and, per rank, its sums so far {"batches_done",
// "loss_sums", "batches_counted", "learned" (whether it learned from a batch yet), "seconds"};
// absent after a whole epoch.
constexpr const char* kPartialKey = "twins_finetune_partial_epoch";

json to_json(const std::vector<FinetuneRun::EpochScore>& scores) {
  json out = json::array();
  for (const auto& s : scores) out.push_back({{"epoch", s.epoch}, {"top1", s.test.top1}, {"top5", s.test.top5}});
  return out;
}

json to_json(const FinetuneOptions& o) {
  return {{"epochs", o.epochs},
          {"batch_size", o.batch_size},
          {"lr_backbone", o.lr_backbone},
          {"lr_head", o.lr_head},
          {"weight_decay", o.weight_decay},
          {"momentum", o.momentum},
          {"train_percent", o.train_percent},
          {"subset", o.subset},
          {"crop_scale", o.crop_scale},
          {"precision", o.precision},
          {"seed", o.seed}};
}

std::vector<int64_t> listed_samples(const data::Dataset& dataset, const std::string& file) {
  std::ifstream in(file);
  if (!in) throw std::runtime_error("finetune.subset: cannot open " + file);
  // The names listed, then one pass over the dataset: memory grows with the list, not with the
  // dataset. A name is a sample's id (taken first) or its id's file name.
  struct Wanted {
    int64_t line = 0;
    int64_t by_id = -1, by_name = -1;
    bool ambiguous = false;  // a file name two samples share
  };
  std::unordered_map<std::string, Wanted> wanted;
  std::vector<std::string> order;
  std::string line;
  for (int64_t number = 1; std::getline(in, line); ++number) {
    while (!line.empty() && (line.back() == '\r' || line.back() == ' ' || line.back() == '\t')) line.pop_back();
    if (line.empty() || wanted.count(line)) continue;  // a name listed twice counts once
    wanted[line].line = number;
    order.push_back(line);
  }
  if (in.bad()) throw std::runtime_error("finetune.subset: cannot read " + file);
  if (order.empty()) throw std::runtime_error("finetune.subset: " + file + " names no sample");
  for (int64_t i = 0; i < dataset.size(); ++i) {
    const std::string id = dataset.id(i);
    if (const auto it = wanted.find(id); it != wanted.end()) {
      if (it->second.by_id >= 0) it->second.ambiguous = true;
      it->second.by_id = i;
    }
    const std::string name = fs::path(id).filename().string();
    if (name == id) continue;
    if (const auto it = wanted.find(name); it != wanted.end()) {
      if (it->second.by_name >= 0) it->second.ambiguous = true;
      it->second.by_name = i;
    }
  }
  std::vector<int64_t> chosen;
  for (const std::string& name : order) {
    const Wanted& w = wanted.at(name);
    const std::string where = file + " line " + std::to_string(w.line) + ": \"" + name + "\"";
    if (w.by_id < 0 && w.ambiguous)
      throw std::runtime_error("finetune.subset: " + where + " names several training samples; give their ids");
    const int64_t i = w.by_id >= 0 ? w.by_id : w.by_name;
    if (i < 0) throw std::runtime_error("finetune.subset: " + where + " names no sample of train_data");
    if (dataset.label(i) < 0) throw std::runtime_error("finetune.subset: " + where + " has no label");
    chosen.push_back(i);
  }
  std::sort(chosen.begin(), chosen.end());
  chosen.erase(std::unique(chosen.begin(), chosen.end()), chosen.end());
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
  if (by_class.empty()) throw std::runtime_error("finetune: train_data has no labelled sample");
  std::vector<int64_t> chosen;
  for (const auto& [label, members] : by_class) {
    const auto n = static_cast<int64_t>(members.size());
    const int64_t take = std::clamp<int64_t>(std::llround(static_cast<double>(n) * train_percent / 100.0), 1, n);
    if (take == n) {
      chosen.insert(chosen.end(), members.begin(), members.end());
      continue;
    }
    // A stream of its own (index ~1), apart from the views' (seed, epoch, sample, view) streams.
    const auto order = augment::permutation(n, augment::Rng(seed, static_cast<uint64_t>(label), ~uint64_t{1}, 0));
    for (int64_t k = 0; k < take; ++k) chosen.push_back(members[static_cast<size_t>(order[static_cast<size_t>(k)])]);
  }
  std::sort(chosen.begin(), chosen.end());
  return chosen;
}

FinetuneRun run_finetune(const std::string& backbone, const EvalConfig& c, const FinetuneControl& control) {
  const auto start = std::chrono::steady_clock::now();
  const FinetuneOptions& o = c.finetune;
  // A data-parallel run: this rank's place; rank 0 speaks and writes.
  const std::shared_ptr<distributed::Communicator>& comm = control.communicator;
  const int rank = comm ? comm->rank() : 0, world = comm ? comm->world_size() : 1;
  const bool main_rank = rank == 0;
  if (o.batch_size % world != 0)
    throw std::invalid_argument("finetune.batch_size: " + std::to_string(o.batch_size) +
                                " is the global batch and must divide evenly over the " + std::to_string(world) +
                                " ranks");
  if (o.lr_backbone > 0 && o.batch_size / world < 2)
    throw std::invalid_argument("finetune.batch_size: " + std::to_string(o.batch_size) + " over " +
                                std::to_string(world) +
                                " rank(s) is one image per batch, which BatchNorm cannot normalise in training "
                                "mode; give at least 2 per rank (or lr_backbone 0, a frozen backbone)");
  const at::Device device = resolve_eval_device(c.device);
  configure_compute(0, /*deterministic=*/false, device);
  if (device.is_cpu())  // training on the CPU: make sure its convolutions are right first
    if (const std::string& warning = ensure_correct_cpu_convolutions(); !warning.empty() && main_rank)
      std::cerr << "warning: " << warning << "\n";
  const bool frozen = o.lr_backbone == 0;
  const bool bf16 = o.precision == "bf16" || (o.precision == "auto" && device.is_cuda());  // default fp32
  FinetuneRun run;
  run.world_size = world, run.main_rank = main_rank;

  std::shared_ptr<models::Network> net = open_backbone(backbone);
  // What a checkpoint must have been written for to be resumed.
  const json settings = {{"backbone", backbone},
                         {"weights_crc32", backbone_checksum(*net)},
                         {"train_data", c.train_data},
                         {"image_size", c.image_size},
                         {"normalize", {{"mean", c.normalization.mean}, {"std", c.normalization.std}}},
                         {"finetune", to_json(o)}};
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

  const bool streaming_train = train->streaming();

  // The classifier, initialised as the official evaluate.py does, from a generator of its own (ranks that are threads
  // of one process share LibTorch's global one), drawing what the global one seeded with finetune.seed did: Linear's
  // own initialisation (a uniform draw per weight and per bias), then N(0, 0.01).
  run.feature_dim = net->output_dim();
  torch::nn::Linear head(run.feature_dim, run.num_classes);  // its own initialisation overwritten below
  {
    at::Generator generator = at::make_generator<at::CPUGeneratorImpl>(o.seed);
    at::NoGradGuard no_grad;
    at::empty(head->weight.sizes()).uniform_(0, 1, generator);
    at::empty(head->bias.sizes()).uniform_(0, 1, generator);
    head->weight.normal_(0.0, 0.01, generator);
    head->bias.zero_();
  }
  head->to(device);
  if (comm) {  // every rank starts from rank 0's weights (the same by construction; made sure)
    distributed::broadcast_module(*net, *comm);
    distributed::broadcast_module(*head, *comm);
  }
  const std::vector<at::Tensor> backbone_parameters = net->parameters();  // frozen: run under NoGradGuard
  // Gradients averaged over the ranks, as DDP (the backbone's only when it learns).
  std::unique_ptr<distributed::GradientReducer> reducer;
  if (comm) {
    std::vector<at::Tensor> trained = head->parameters();
    if (!frozen) trained.insert(trained.end(), backbone_parameters.begin(), backbone_parameters.end());
    reducer = std::make_unique<distributed::GradientReducer>(std::move(trained), comm);
  }
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

  const augment::View view = random_crop_flip_view(c.image_size, o.crop_scale, c.normalization);
  data::LoaderOptions lo;
  lo.batch_size = o.batch_size / world, lo.seed = o.seed, lo.channels = channels;
  lo.workers = loader_workers(c.workers, device);
  lo.rank = rank, lo.world_size = world;  // PyTorch's DistributedSampler order
  lo.drop_last = false;                   // every labelled sample, each epoch, as the official script
  lo.pin_memory = device.is_cuda();
  data::Loader loader(train, {view}, lo);
  const int64_t batches = loader.batches_per_epoch();

  // Resume from where the checkpoint was written: after an epoch, or within one.
  int64_t first_epoch = 0, first_batch = 0;
  double earlier_seconds = 0;
  struct {  // the epoch resumed mid-way: this rank's sums so far and flag
    double loss_sum = 0, seconds = 0;
    int64_t counted = 0;
    bool learned = false;
  } carried;
  const std::string& checkpoint = control.checkpoint;
  if (!checkpoint.empty() && fs::exists(checkpoint)) {
    const models::SafeTensorsFile file = models::load_safetensors(checkpoint);  // its checksum checked
    const auto meta = [&](const char* key) {
      const auto it = file.metadata.find(key);
      if (it == file.metadata.end()) throw std::runtime_error("finetune: " + checkpoint + " lacks its " + key);
      return it->second;
    };
    if (json::parse(meta(kSettingsKey), nullptr, false) != settings)
      throw std::runtime_error("finetune: " + checkpoint +
                               " was written for another backbone or other settings; remove it to start over, or "
                               "write to another folder (--out)");
    const json epochs_done = json::parse(meta(kEpochsKey), nullptr, false);
    const json losses = json::parse(meta(kLossKey), nullptr, false);
    json partial;  // null: written after a whole epoch
    if (const auto it = file.metadata.find(kPartialKey); it != file.metadata.end()) {
      partial = json::parse(it->second, nullptr, false);
      // One entry per rank that wrote it, each a number / a count / a flag.
      const auto per_rank = [&](const char* key, bool (*valid)(const json&)) {
        const json v = partial.is_object() ? partial.value(key, json()) : json();
        const json flags = partial.is_object() ? partial.value("learned", json()) : json();
        return v.is_array() && !v.empty() && flags.is_array() && v.size() == flags.size() &&
               std::all_of(v.begin(), v.end(), valid);
      };
      const json batches_done = partial.is_object() ? partial.value("batches_done", json()) : json();
      const json seconds = partial.is_object() ? partial.value("seconds", json()) : json();
      if (!batches_done.is_number_integer() || batches_done.get<int64_t>() < 1 || !seconds.is_number() ||
          seconds.get<double>() < 0 || !per_rank("loss_sums", [](const json& v) { return v.is_number(); }) ||
          !per_rank("batches_counted", [](const json& v) { return v.is_number_integer() && v.get<int64_t>() >= 0; }) ||
          !per_rank("learned", [](const json& v) { return v.is_boolean(); }))
        throw std::runtime_error("finetune: " + checkpoint + ": malformed " + kPartialKey);
    }
    const int64_t whole_epochs_max = partial.is_null() ? o.epochs : o.epochs - 1;
    if (!epochs_done.is_number_integer() || epochs_done.get<int64_t>() < (partial.is_null() ? 1 : 0) ||
        epochs_done.get<int64_t>() > whole_epochs_max || !losses.is_array() ||
        static_cast<int64_t>(losses.size()) != epochs_done.get<int64_t>())
      throw std::runtime_error("finetune: " + checkpoint + ": malformed " + kEpochsKey + " or " + kLossKey);
    first_epoch = epochs_done.get<int64_t>();
    if (!partial.is_null()) {
      const auto ranks_before = static_cast<int64_t>(partial["learned"].size());
      // Batch k of an indexed dataset is the same global batch over any number of ranks
      // (DistributedSampler's order); tar shards are dealt to the ranks whole.
      if (ranks_before != world && streaming_train)
        throw std::runtime_error("finetune: " + checkpoint + " was written within an epoch by " +
                                 std::to_string(ranks_before) +
                                 " rank(s) reading tar shards, which are dealt to the ranks whole: resume it with " +
                                 std::to_string(ranks_before) + " rank(s) (or remove it to start over)");
      // As many batches an epoch over any number of ranks: ceil(ceil(N / W) / (B / W)) = ceil(N / B).
      first_batch = partial["batches_done"].get<int64_t>();
      if (first_batch >= batches)
        throw std::runtime_error("finetune: " + checkpoint + ": malformed " + kPartialKey + " (batch " +
                                 std::to_string(first_batch) + " of an epoch of " + std::to_string(batches) +
                                 ": did train_data change?)");
      carried.seconds = partial["seconds"].get<double>();
      if (ranks_before == world) {  // each rank its own sums: the epoch's loss as if uninterrupted
        const auto r = static_cast<size_t>(rank);
        carried.loss_sum = partial["loss_sums"][r].get<double>();
        carried.counted = partial["batches_counted"][r].get<int64_t>();
        carried.learned = partial["learned"][r].get<bool>();
      } else {  // rank 0 carries every rank's sums
        for (size_t r = 0; r < partial["learned"].size(); ++r) {
          if (main_rank) carried.loss_sum += partial["loss_sums"][r].get<double>();
          if (main_rank) carried.counted += partial["batches_counted"][r].get<int64_t>();
          carried.learned = carried.learned || partial["learned"][r].get<bool>();
        }
      }
    }
    if (const auto it = file.metadata.find(kSecondsKey); it != file.metadata.end()) {  // absent in older checkpoints
      const json spent = json::parse(it->second, nullptr, false);
      if (spent.is_number() && spent.get<double>() >= 0) earlier_seconds = spent.get<double>();
    }
    for (const auto& l : losses) run.epoch_loss.push_back(l.is_number() ? l.get<double>() : 0.0);
    if (const auto it = file.metadata.find(kTestKey); it != file.metadata.end()) {  // absent before eval_every_epochs
      const json scores = json::parse(it->second, nullptr, false);
      if (!scores.is_array()) throw std::runtime_error("finetune: " + checkpoint + ": malformed " + kTestKey);
      for (const auto& e : scores) {
        if (!e.is_object() || !e.value("epoch", json()).is_number_integer() || !e.value("top1", json()).is_number() ||
            !e.value("top5", json()).is_number())
          throw std::runtime_error("finetune: " + checkpoint + ": malformed " + kTestKey);
        run.test_per_epoch.push_back({e["epoch"].get<int64_t>(), {e["top1"].get<double>(), e["top5"].get<double>()}});
      }
    }
    models::load_module_state(*net, file, "finetune: " + checkpoint, "backbone.");
    models::load_module_state(*head, file, "finetune: " + checkpoint, "head.");
    load_optimizer_state(sgd, file.at("optimizer_state"));
    if (main_rank && first_batch == 0)
      std::cerr << "  resuming from " << checkpoint << " after epoch " << first_epoch << " of " << o.epochs << "\n";
    else if (main_rank)
      std::cerr << "  resuming from " << checkpoint << " at batch " << first_batch << " of " << batches << " in epoch "
                << first_epoch + 1 << " of " << o.epochs << "\n";
    const auto saved_world = file.metadata.find(kWorldKey);  // absent: written by one process
    if (const std::string ranks = saved_world == file.metadata.end() ? "1" : saved_world->second;
        ranks != std::to_string(world) && main_rank)
      std::cerr << "warning: finetune: " << checkpoint << " was written by " << ranks << " rank(s), resuming with "
                << world << ": the same global batches, but BatchNorm's batch statistics now over each rank's "
                << o.batch_size / world << " images\n";
  }
  if (comm) {  // the ranks must resume from the same place (the run folder shared by every node)
    const std::vector<int64_t> places = comm->gather({first_epoch, first_batch});  // rank after rank
    bool same = true;
    std::string per_rank;
    for (size_t i = 0; i < places.size(); i += 2) {
      same = same && places[i] == first_epoch && places[i + 1] == first_batch;
      per_rank += (i ? "; rank " : "rank ") + std::to_string(i / 2) + ": " + std::to_string(places[i]) + ", " +
                  std::to_string(places[i + 1]);
    }
    if (!same)
      throw std::runtime_error("finetune: the ranks found different checkpoints at " + checkpoint +
                               " (epochs, batches done per rank: " + per_rank +
                               "); every node must see the same output folder");
  }
  run.start_epoch = first_epoch, run.start_batch = first_batch;
  auto save_checkpoint = [&](int64_t epochs_done, const json& partial) {
    models::NamedTensors tensors = models::module_state(*net, "backbone.");
    for (auto& t : models::module_state(*head, "head.")) tensors.push_back(std::move(t));
    const std::vector<uint8_t> bytes = save_optimizer_state(sgd);
    tensors.emplace_back(
        "optimizer_state",
        at::from_blob(const_cast<uint8_t*>(bytes.data()), {static_cast<int64_t>(bytes.size())}, at::kByte).clone());
    if (const fs::path parent = fs::path(checkpoint).parent_path(); !parent.empty()) fs::create_directories(parent);
    std::map<std::string, std::string> metadata = {
        {kSettingsKey, settings.dump()},
        {kEpochsKey, std::to_string(epochs_done)},
        {kWorldKey, std::to_string(world)},
        {kLossKey, json(run.epoch_loss).dump()},
        {kTestKey, to_json(run.test_per_epoch).dump()},
        {kSecondsKey, json(earlier_seconds + detail::seconds_since(start)).dump()}};
    if (!partial.is_null()) metadata[kPartialKey] = partial.dump();
    models::save_safetensors(checkpoint, tensors, metadata);
  };

  // Scored on the test set's centre crops, backbone in evaluation mode with rank 0's BatchNorm
  // statistics; with several ranks each scores every world-th test sample (a streaming test set:
  // rank 0 all of it, the others waiting in short collectives) and the counts are summed.
  std::shared_ptr<const data::Dataset> scored = test;
  if (world > 1 && !test->streaming()) {
    std::vector<int64_t> share;
    for (int64_t i = rank; i < test->size(); i += world) share.push_back(i);
    scored = share.empty() ? nullptr : data::subset(test, std::move(share));
  } else if (world > 1 && !main_rank) {
    scored = nullptr;
  }
  const augment::View test_view = eval_view(*test, c.image_size, c.normalization);
  auto score_test = [&]() {
    if (comm) distributed::broadcast_buffers(*net, *comm);
    net->eval();
    head->eval();
    int64_t counts[3] = {0, 0, 0};  // labelled samples, top-1 hits, top-5 hits
    const auto tally = [&](const std::function<void()>& keep_alive) {
      if (!scored) return;
      ExtractOptions xo;
      xo.batch_size = c.batch_size, xo.workers = c.workers, xo.channels = channels, xo.what = "test features";
      xo.progress = main_rank;
      xo.after_batch = keep_alive;
      const Features f = extract_features(*net, scored, test_view, device, xo);
      at::NoGradGuard no_grad;
      const at::Tensor mask = f.labels.ge(0);
      counts[0] = mask.sum().item<int64_t>();
      if (counts[0] > 0) {
        const at::Tensor logits = head->forward(f.features.index({mask}).to(device, at::kFloat));
        const at::Tensor top = std::get<1>(logits.topk(std::min<int64_t>(5, logits.size(1)), 1));
        const at::Tensor hit = top.eq(f.labels.index({mask}).to(device).view({-1, 1}));
        counts[1] = hit.select(1, 0).sum().item<int64_t>();
        counts[2] = hit.any(1).sum().item<int64_t>();
      }
    };
    if (comm && world > 1 && test->streaming()) {  // rank 0 alone, however long it takes, the others waiting
      if (main_rank) std::cerr << "  scoring the test set on rank 0 alone (a stream of shards)\n";
      distributed::on_rank0_long(comm.get(), tally, "score the test set");
    } else {
      tally({});
    }
    if (comm)
      for (int64_t& count : counts) count = comm->sum(count);
    if (counts[0] == 0) throw std::runtime_error("finetune: test_data has no labelled sample");
    run.test_samples = counts[0];
    Accuracy a;
    a.top1 = 100.0 * static_cast<double>(counts[1]) / static_cast<double>(counts[0]);
    a.top5 = 100.0 * static_cast<double>(counts[2]) / static_cast<double>(counts[0]);
    return a;
  };

  std::ostringstream protocol;
  protocol << (frozen ? "frozen backbone (lr_backbone 0)" : "fine-tuned backbone") << ", " << run.train_samples
           << " training samples ";
  if (o.subset.empty())
    protocol << "(" << o.train_percent << "% of each class)";
  else
    protocol << "(listed in " << o.subset << ")";
  protocol << ", random resized crop [" << o.crop_scale[0] << ", " << o.crop_scale[1] << "] + flip, " << o.epochs
           << " epochs, " << (bf16 ? "bf16 autocast" : "fp32");
  if (world > 1) protocol << ", " << world << " ranks x " << o.batch_size / world << " images per batch";
  run.protocol = protocol.str();
  if (main_rank) std::cerr << "  " << run.protocol << "\n";

  // What rank 0 alone writes (the log, the checkpoint): its failure stops every rank at once.
  const bool writes = !checkpoint.empty() || !control.metrics.empty() || !control.tensorboard_dir.empty();
  auto on_rank0 = [&](const std::function<void()>& f) {
    distributed::on_rank0(comm, f, "write its log or checkpoint");
  };
  // The per-epoch log: the lines of epochs after the checkpoint's (a run that died before it
  // checkpointed) are dropped, as a fresh run's file is emptied.
  std::unique_ptr<io::AppendFile> metrics;
  std::unique_ptr<twins::detail::EventFile> events;
  if (writes)
    on_rank0([&] {
      if (!control.metrics.empty()) {
        std::string kept;
        if (first_epoch > 0) {
          std::ifstream in(control.metrics);
          for (std::string line; std::getline(in, line);) {
            const json j = json::parse(line, nullptr, false);
            if (j.is_object() && j.contains("epoch") && j["epoch"].is_number_integer() &&
                j["epoch"].get<int64_t>() <= first_epoch)
              kept += line + "\n";
          }
        }
        if (const fs::path parent = fs::path(control.metrics).parent_path(); !parent.empty())
          fs::create_directories(parent);
        io::write_file_atomic(control.metrics, kept);
        metrics = std::make_unique<io::AppendFile>(control.metrics);
      }
      if (!control.tensorboard_dir.empty()) {
        fs::create_directories(control.tensorboard_dir);
        events = std::make_unique<twins::detail::EventFile>(control.tensorboard_dir, first_epoch + 1);
      }
    });

  detail::EpochProgress progress("finetune", first_epoch, o.epochs, batches, first_batch);
  detail::AfterBatch after_batch(control.stop, comm.get(), device.is_cuda(), batches, o.checkpoint_every_steps,
                                 "finetune_batch");
  for (int64_t epoch = first_epoch; epoch < o.epochs; ++epoch) {
    if ((control.stop_after_epochs > 0 && epoch - first_epoch == control.stop_after_epochs) ||
        after_batch.stop_after_epoch()) {
      if (main_rank)
        std::cerr << "  finetune: stopped after epoch " << epoch << " of " << o.epochs
                  << (checkpoint.empty() ? std::string() : ", state in " + checkpoint) << "\n";
      run.epochs_done = epoch;
      return run;
    }
    const bool resumed_here = epoch == first_epoch && first_batch > 0;
    set_lr(epoch);
    const auto epoch_start = std::chrono::steady_clock::now();
    const double earlier_epoch_seconds = resumed_here ? carried.seconds : 0.0;
    net->train(!frozen);  // frozen: BatchNorm keeps its statistics (the official `--weights freeze`)
    head->train();
    loader.start_epoch(epoch, resumed_here ? first_batch : 0);
    // The epoch's loss summed over the batches this rank learned from (resumed mid-epoch: from
    // its sums in the checkpoint); whether it learned from one yet.
    at::Tensor loss_sum =
        at::full({}, resumed_here ? carried.loss_sum : 0.0, at::TensorOptions().dtype(at::kDouble).device(device));
    int64_t done = resumed_here ? first_batch : 0, counted = resumed_here ? carried.counted : 0;
    bool learned = resumed_here && carried.learned;
    auto train_on = [&](const data::Batch& batch) {
      // A last batch of one image is left out when fine-tuning: BatchNorm in training mode cannot
      // normalise one value per channel (a backbone whose last maps are 1 x 1). Every rank's
      // batches have the same sizes, so the ranks leave it out together.
      if (!frozen && batch.views[0].size(0) == 1 && done == batches && done > 1) return;
      const at::Tensor keep = batch.labels.ge(0);
      const int64_t labelled = keep.sum().item<int64_t>();
      at::Tensor x, y;
      if (labelled > 0) {
        x = augment::normalize_batch(batch.views[0], view.normalization, device, at::kFloat);
        y = batch.labels.to(device, /*non_blocking=*/batch.labels.is_pinned());
        if (labelled < y.size(0)) {
          const at::Tensor k = keep.to(device);
          x = x.index({k}), y = y.index({k});
        }
      }
      // Unlabelled images (a stream of shards; subsets hold labelled ones only) may leave nothing
      // to learn from, or one image, which BatchNorm cannot take after the first; with several
      // ranks, they agree whether any learns from this batch: if none does, no rank steps (as
      // one process skips it); else those without add zero to the averaged gradients.
      const bool learns = labelled > 0 && (frozen || x.size(0) > 1 || !learned);
      if ((comm && streaming_train) ? comm->sum(learns ? 1 : 0) == 0 : !learns) return;
      if (!learns) {
        sgd.zero_grad();
        reducer->finish();
        sgd.step();
        return;
      }
      at::Tensor features;
      {
        compat::Autocast autocast(device.type(), bf16, at::kBFloat16);
        std::optional<at::NoGradGuard> no_grad;
        if (frozen) no_grad.emplace();
        features = net->forward(x).to(at::kFloat);
      }
      const at::Tensor loss = torch::nn::functional::cross_entropy(head->forward(features), y);
      sgd.zero_grad();
      loss.backward();
      if (reducer) reducer->finish();
      sgd.step();
      loss_sum.add_(loss.detach());
      ++counted;
      learned = true;
    };
    while (auto batch = loader.next()) {
      ++done;
      // Random ops inside the network (stochastic depth) draw from (seed, epoch, batch, rank), so
      // that a resumed run, even one resumed mid-epoch, draws what an uninterrupted one would.
      at::manual_seed(o.seed * 0x9E3779B97F4A7C15ULL + (static_cast<uint64_t>(epoch) << 32) +
                      static_cast<uint64_t>(done) + static_cast<uint64_t>(rank) * 0xD1B54A32D192ED03ULL);
      train_on(*batch);
      if (main_rank) progress.batch_done(epoch, done);
      const detail::AfterBatch::Next next = after_batch(epoch, done);
      if (!next.checkpoint) continue;
      if (!checkpoint.empty()) {  // every rank's sums and flag, gathered
        at::Tensor sums = at::stack({loss_sum, at::full({}, static_cast<double>(counted), loss_sum.options()),
                                     at::full({}, learned ? 1.0 : 0.0, loss_sum.options())});
        if (comm) sums = comm->all_gather(sums.to(comm->device()));
        sums = sums.cpu().view({-1, 3});
        json partial = {{"batches_done", done},
                        {"loss_sums", json::array()},
                        {"batches_counted", json::array()},
                        {"learned", json::array()},
                        {"seconds", earlier_epoch_seconds + detail::seconds_since(epoch_start)}};
        if (!at::isfinite(sums).all().item<bool>())
          throw std::runtime_error("finetune: the loss is not finite in epoch " + std::to_string(epoch + 1) +
                                   " (lower finetune.lr_backbone or finetune.lr_head)");
        for (int64_t r = 0; r < sums.size(0); ++r) {
          partial["loss_sums"].push_back(sums[r][0].item<double>());
          partial["batches_counted"].push_back(static_cast<int64_t>(sums[r][1].item<double>()));
          partial["learned"].push_back(sums[r][2].item<double>() != 0);
        }
        on_rank0([&] { save_checkpoint(epoch, partial); });
      }
      if (next.stop) {
        if (main_rank)
          std::cerr << "  finetune: stopped at batch " << done << " of " << batches << " in epoch " << epoch + 1
                    << " of " << o.epochs << (checkpoint.empty() ? std::string() : ", state in " + checkpoint) << "\n";
        run.epochs_done = epoch, run.stopped_at_batch = done;
        return run;
      }
    }
    at::Tensor totals = at::stack({loss_sum, at::full({}, static_cast<double>(counted), loss_sum.options())});
    if (comm) {  // the epoch's loss: the mean over every rank's batches
      totals = totals.to(comm->device());
      comm->all_reduce(totals);
    }
    totals = totals.cpu();
    const auto used_everywhere = static_cast<int64_t>(totals[1].item<double>());
    if (used_everywhere == 0)
      throw std::runtime_error("finetune: epoch " + std::to_string(epoch + 1) +
                               " found no labelled sample in train_data");
    const double mean_loss = totals[0].item<double>() / static_cast<double>(used_everywhere);
    if (!std::isfinite(mean_loss))
      throw std::runtime_error("finetune: the loss is not finite in epoch " + std::to_string(epoch + 1) +
                               " (lower finetune.lr_backbone or finetune.lr_head)");
    run.epoch_loss.push_back(mean_loss);
    const double epoch_seconds = earlier_epoch_seconds + detail::seconds_since(epoch_start);
    json line = {{"epoch", epoch + 1},
                 {"epochs", o.epochs},
                 {"loss", mean_loss},
                 {"lr_head", cosine(o.lr_head, epoch, o.epochs)},
                 {"lr_backbone", cosine(o.lr_backbone, epoch, o.epochs)},
                 {"epoch_seconds", epoch_seconds}};
    std::string scored_now;
    if (o.eval_every_epochs > 0 && ((epoch + 1) % o.eval_every_epochs == 0 || epoch + 1 == o.epochs)) {
      const Accuracy a = score_test();
      run.test_per_epoch.push_back({epoch + 1, a});
      line["test_top1"] = a.top1, line["test_top5"] = a.top5;
      std::ostringstream said;
      said << ", test top-1 " << a.top1 << "%";
      scored_now = said.str();
    }
    if (main_rank)
      std::cerr << "  finetune: epoch " << epoch + 1 << "/" << o.epochs << " loss " << mean_loss << " (lr head "
                << cosine(o.lr_head, epoch, o.epochs) << ", backbone " << cosine(o.lr_backbone, epoch, o.epochs) << ")"
                << scored_now << "\n";
    if (writes)
      on_rank0([&] {
        // The line before the checkpoint, on the disk: a resume from this checkpoint finds it, and
        // one from the previous drops it.
        if (metrics) metrics->append(line.dump() + "\n"), metrics->sync();
        if (events) {
          std::vector<std::pair<std::string, double>> scalars;
          for (const auto& [key, value] : line.items())
            if (key != "epoch" && key != "epochs") scalars.emplace_back("finetune/" + key, value.get<double>());
          events->scalars(epoch + 1, scalars);
          events->sync();
        }
        if (!checkpoint.empty()) save_checkpoint(epoch + 1, json());
      });
  }
  run.epochs_done = o.epochs;
  run.finished = true;

  if (!run.test_per_epoch.empty() && run.test_per_epoch.back().epoch == o.epochs)
    run.test = run.test_per_epoch.back().test;  // scored after the last epoch already
  else
    run.test = score_test();
  net->to(at::kCPU);
  run.backbone = net;
  run.head_weight = head->weight.detach().to(at::kCPU).clone();
  run.head_bias = head->bias.detach().to(at::kCPU).clone();
  run.seconds = earlier_seconds + detail::seconds_since(start);  // the whole fine-tuning's, over resumes
  return run;
}

}  // namespace twins::eval

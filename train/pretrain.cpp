// The pretraining loop: loader -> views on the device -> forward, loss, backward, optimizer,
// BYOL's EMA, the online probe; metrics, progress, checkpoints and exact resume.
#include "twins/train/pretrain.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/cuda.h>
#include <torch/nn/functional/loss.h>
#include <torch/optim/sgd.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/compat.h"
#include "train/ssl_model.h"
#include "twins/augment/pipeline.h"
#include "twins/data/dataset.h"
#include "twins/data/loader.h"
#include "twins/dist/communicator.h"
#include "twins/dist/data_parallel.h"
#include "twins/eval/features.h"
#include "twins/eval/plots.h"
#include "twins/models/safetensors.h"
#include "twins/models/weights.h"
#include "twins/train/recipe.h"
#include "twins/train/schedule.h"
#include "twins/runtime.h"
#include "twins/version.h"

namespace twins::train {
namespace fs = std::filesystem;
using nlohmann::json;
using Clock = std::chrono::steady_clock;

namespace {

std::atomic<bool> g_stop{false};

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

at::Device resolve_device(const std::string& name) {
  if (name == "auto") return torch::cuda::is_available() ? at::Device(at::kCUDA, 0) : at::Device(at::kCPU);
  at::Device d(at::kCPU);
  try {
    d = at::Device(name);
  } catch (const std::exception&) {
    throw std::invalid_argument("train.device: \"" + name + "\" is not a device (auto, cpu, cuda, cuda:N)");
  }
  if (d.is_cuda() && !torch::cuda::is_available())
    throw std::runtime_error("train.device: " + name + " requested but CUDA is not available (this LibTorch: " +
                             compat::torch_version_string() + "); use --device cpu");
  if (d.is_cuda() && !d.has_index()) d = at::Device(at::kCUDA, 0);
  return d;
}

double peak_rss_mb() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::stod(line.substr(6)) / 1024.0;
  return 0;
}

std::string checkpoint_name(int64_t step) {
  char name[64];
  std::snprintf(name, sizeof name, "step-%08lld.safetensors", static_cast<long long>(step));
  return name;
}

// Checkpoints of a run folder, newest first.
std::vector<fs::path> list_checkpoints(const fs::path& dir) {
  std::vector<fs::path> out;
  if (!fs::is_directory(dir)) return out;
  for (const auto& e : fs::directory_iterator(dir)) {
    const std::string n = e.path().filename().string();
    if (n.rfind("step-", 0) == 0 && e.path().extension() == ".safetensors") out.push_back(e.path());
  }
  std::sort(out.rbegin(), out.rend());
  return out;
}

std::string format_duration(double s) {
  const int64_t t = static_cast<int64_t>(s);
  std::ostringstream o;
  if (t >= 3600) o << t / 3600 << "h" << std::setw(2) << std::setfill('0') << (t % 3600) / 60 << "m";
  else o << t / 60 << "m" << std::setw(2) << std::setfill('0') << t % 60 << "s";
  return o.str();
}

struct ProbeStats {
  int64_t correct = 0, seen = 0;
  double top1() const { return seen ? 100.0 * static_cast<double>(correct) / static_cast<double>(seen) : 0.0; }
};

}  // namespace

StepBenchmark bench_step(const json& config, int64_t steps, int64_t warmup, const std::string& device_name) {
  const Recipe recipe = Recipe::parse(config);
  const TrainConfig& tc = recipe.train;
  const at::Device device = resolve_device(device_name.empty() ? tc.device : device_name);
  set_compute_threads(tc.threads);
  const bool cuda = device.is_cuda();
  const std::string precision = tc.precision == "auto" ? (cuda ? "bf16" : "fp32") : tc.precision;
  const auto views = augment::parse_views(recipe.views, "views");
  at::manual_seed(tc.seed);
  const int64_t classes = 10;
  detail::SSLModel model(recipe, classes);
  model.to(device, tc.channels_last);
  model.train(true);
  const double lr = scaled_lr(recipe.optimizer.base_lr, tc.batch_size);
  auto optimizer = detail::make_optimizer(recipe.optimizer, model, lr, lr);
  torch::optim::SGD probe_optimizer(model.probe->parameters(), torch::optim::SGDOptions(recipe.probe.lr).momentum(0.9));
  // Synthetic uint8 batches on the device, as the loader would deliver them.
  std::vector<at::Tensor> batches;
  for (const auto& v : views) {
    const int h = v.size.first > 0 ? v.size.first : 224, w = v.size.second > 0 ? v.size.second : 224;
    batches.push_back(at::randint(0, 256, {tc.batch_size, model.in_channels, h, w}, at::TensorOptions().dtype(at::kByte).device(device)));
  }
  const at::Tensor labels = at::randint(0, classes, {tc.batch_size}, at::TensorOptions().dtype(at::kLong).device(device));
  auto one_step = [&] {
    std::vector<at::Tensor> xs;
    for (size_t v = 0; v < views.size(); ++v) {
      at::Tensor x = augment::normalize_batch(batches[v], views[v].normalization, device, at::kFloat);
      if (tc.channels_last) x = x.contiguous(at::MemoryFormat::ChannelsLast);
      xs.push_back(x);
    }
    detail::SSLModel::Output out;
    {
      compat::CudaAutocast autocast(cuda && precision != "fp32", precision == "fp16" ? at::kHalf : at::kBFloat16);
      out = model.forward(xs);
    }
    optimizer->zero_grad();
    out.loss.total.backward();
    optimizer->step();
    if (model.target_backbone) model.ema_update(0.99);
    const at::Tensor logits = model.probe->forward(out.features.detach().to(at::kFloat));
    probe_optimizer.zero_grad();
    torch::nn::functional::cross_entropy(logits, labels).backward();
    probe_optimizer.step();
    return out.loss.total.item<double>();  // synchronises the device
  };
  for (int64_t i = 0; i < warmup; ++i) one_step();
  const auto start = Clock::now();
  for (int64_t i = 0; i < steps; ++i) one_step();
  StepBenchmark r;
  r.batch_size = tc.batch_size, r.steps = steps, r.device = device.str();
  r.seconds_per_step = seconds_since(start) / static_cast<double>(std::max<int64_t>(1, steps));
  r.images_per_second = static_cast<double>(tc.batch_size) / r.seconds_per_step;
  return r;
}

void request_stop() { g_stop.store(true); }
void clear_stop() { g_stop.store(false); }

PretrainResult pretrain(const json& given_config, const PretrainOptions& options) {
  const auto start_time = Clock::now();
  const fs::path out_dir = options.out_dir;
  const fs::path ckpt_dir = out_dir / "checkpoints";

  // On resume, the run's own config rules: the checkpoint holds the resolved one.
  json config = given_config;
  models::SafeTensorsFile resume_from;
  bool resuming = false;
  if (options.resume) {
    const auto candidates = list_checkpoints(ckpt_dir);
    if (candidates.empty())
      throw std::runtime_error("--resume: no checkpoint in " + ckpt_dir.string() + " (start without --resume)");
    for (const auto& c : candidates) {
      try {
        resume_from = models::load_safetensors(c.string());
        if (!resume_from.metadata.count("twins_checkpoint")) throw std::runtime_error(c.string() + ": not a twins checkpoint");
        resuming = true;
        std::cerr << "resuming from " << c.string() << "\n";
        break;
      } catch (const std::exception& e) {
        std::cerr << "warning: skipping checkpoint " << c.filename().string() << ": " << e.what() << "\n";
      }
    }
    if (!resuming) throw std::runtime_error("--resume: every checkpoint in " + ckpt_dir.string() + " is corrupt");
    config = json::parse(resume_from.metadata.at("config"));
  }
  const Recipe recipe = Recipe::parse(config);
  const TrainConfig& tc = recipe.train;
  // Data parallelism when a launcher started this process (torchrun, SLURM, OpenMPI, or
  // `twins pretrain --nproc-per-node`): one rank per process, CUDA device = local rank.
  const dist::Environment env = dist::detect_environment();
  const bool parallel = env.launcher != "none";
  at::Device device = resolve_device(options.device.empty() ? tc.device : options.device);
  if (parallel && device.is_cuda()) {
    const std::string asked = options.device.empty() ? tc.device : options.device;
    if (asked == "auto" || asked == "cuda") device = resolve_device("cuda:" + std::to_string(env.local_rank));
  }
  std::shared_ptr<dist::Communicator> comm;
  if (parallel) {
    dist::CommunicatorOptions co;
    co.backend = tc.dist_backend, co.timeout_s = tc.dist_timeout_s;
    comm = dist::Communicator::create(env, device, co);
  }
  const int world = comm ? comm->world_size() : 1;
  const bool main_rank = !comm || comm->rank() == 0;  // writes the run folder, prints progress
  const bool show = options.progress && main_rank;
  set_compute_threads(tc.threads);
  if (tc.deterministic) compat::set_deterministic(true);
  const bool cuda = device.is_cuda();
  if (cuda && !tc.deterministic) at::globalContext().setBenchmarkCuDNN(true);  // fixed shapes: let cuDNN pick
  const std::string precision = tc.precision == "auto" ? (cuda ? "bf16" : "fp32") : tc.precision;
  if (!cuda && precision != "fp32")
    throw std::invalid_argument("train.precision: " + precision + " needs a CUDA device; use fp32 on the CPU");

  // Data.
  const auto dataset = data::create_dataset(recipe.data, "data");
  const auto views = augment::parse_views(recipe.views, "views");
  at::manual_seed(tc.seed);
  detail::SSLModel model(recipe, dataset->num_classes());
  data::LoaderOptions lo;
  lo.batch_size = tc.batch_size, lo.workers = tc.workers, lo.seed = tc.seed, lo.channels = model.in_channels;
  lo.pin_memory = cuda;
  if (comm) lo.rank = comm->rank(), lo.world_size = world;
  data::Loader loader(dataset, views, lo);
  // With gradient accumulation a step takes `accumulate` loader batches; an epoch's leftover
  // batches (fewer than `accumulate`) are skipped.
  const int64_t accumulate = tc.grad_accumulation;
  const int64_t steps_per_epoch = loader.batches_per_epoch() / accumulate;
  const int64_t epoch_batches = steps_per_epoch * accumulate;
  if (steps_per_epoch < 1)
    throw std::invalid_argument("train.grad_accumulation: " + std::to_string(accumulate) + " batches per step, but an epoch has only " +
                                std::to_string(loader.batches_per_epoch()) + " batches of " + std::to_string(tc.batch_size));
  const int64_t total_steps = tc.epochs * steps_per_epoch;
  const int64_t warmup_steps = static_cast<int64_t>(std::llround(recipe.schedule.warmup_epochs * steps_per_epoch));
  const int64_t global_batch = tc.batch_size * world * tc.grad_accumulation;
  const double lr = scaled_lr(recipe.optimizer.base_lr, global_batch);
  const double bias_lr = recipe.optimizer.bias_base_lr >= 0 ? scaled_lr(recipe.optimizer.bias_base_lr, global_batch) : lr;

  model.to(device, tc.channels_last);
  model.train(true);
  auto optimizer = detail::make_optimizer(recipe.optimizer, model, lr, bias_lr);
  std::unique_ptr<torch::optim::SGD> probe_optimizer;
  const bool probing = recipe.probe.enabled && model.probe;
  if (probing)
    probe_optimizer = std::make_unique<torch::optim::SGD>(
        model.probe->parameters(), torch::optim::SGDOptions(recipe.probe.lr).momentum(0.9).weight_decay(recipe.probe.weight_decay));
  std::unique_ptr<dist::GradientReducer> reducer, probe_reducer;

  int64_t step = 0, epoch = 0, first_batch = 0;
  ProbeStats probe_stats;
  double fp16_scale = 65536.0;
  int64_t fp16_good = 0;
  if (resuming) {
    model.load_state(resume_from);
    detail::load_optimizer(*optimizer, resume_from.at("optimizer_state"));
    if (probe_optimizer && resume_from.contains("probe_optimizer_state"))
      detail::load_optimizer(*probe_optimizer, resume_from.at("probe_optimizer_state"));
    const json meta = json::parse(resume_from.metadata.at("twins_checkpoint"));
    step = meta.at("step"), epoch = meta.at("epoch"), first_batch = meta.at("batch");
    probe_stats.correct = meta.value("probe_correct", 0), probe_stats.seen = meta.value("probe_seen", 0);
    fp16_scale = meta.value("fp16_scale", fp16_scale);
    const int64_t saved_world = meta.value("world_size", int64_t{1});
    if (saved_world != world) {  // same samples seen this epoch, counted in the new batches
      first_batch = first_batch * saved_world / world / accumulate * accumulate;
      if (main_rank)
        std::cerr << "warning: the checkpoint was written by " << saved_world << " rank(s), resuming with " << world
                  << ": the epoch continues after the same number of samples; steps and schedules follow the new global batch\n";
    }
    if (first_batch >= epoch_batches) ++epoch, first_batch = 0, probe_stats = {};
  }
  if (comm) {  // every rank starts from rank 0's state (resumed or freshly initialised)
    model.distribute(comm, tc.sync_batchnorm);
    dist::GradientReducerOptions ro;
    ro.bucket_mb = tc.bucket_mb;
    reducer = std::make_unique<dist::GradientReducer>(model.parameters(), comm, ro);
    if (probing) probe_reducer = std::make_unique<dist::GradientReducer>(model.probe->parameters(), comm, ro);
  }

  std::ofstream metrics;
  if (main_rank) {
    fs::create_directories(ckpt_dir);
    std::ofstream(out_dir / "config.json") << config.dump(2) << "\n";
    metrics.open(out_dir / "metrics.jsonl", std::ios::app);
    if (!metrics) throw std::runtime_error((out_dir / "metrics.jsonl").string() + ": cannot write");
  }
  auto log = [&](const json& line) {
    if (main_rank) metrics << line.dump() << "\n" << std::flush;
  };

  auto save_checkpoint = [&](int64_t next_batch) {
    const fs::path path = ckpt_dir / checkpoint_name(step);
    if (!main_rank) return path;  // every rank holds the same state; rank 0 writes it
    models::NamedTensors tensors = model.state();
    auto bytes_tensor = [](const std::vector<uint8_t>& b) {
      return at::from_blob(const_cast<uint8_t*>(b.data()), {static_cast<int64_t>(b.size())}, at::kByte).clone();
    };
    tensors.emplace_back("optimizer_state", bytes_tensor(detail::save_optimizer(*optimizer)));
    if (probe_optimizer) tensors.emplace_back("probe_optimizer_state", bytes_tensor(detail::save_optimizer(*probe_optimizer)));
    const json meta = {{"step", step}, {"epoch", epoch}, {"batch", next_batch}, {"probe_correct", probe_stats.correct},
                       {"probe_seen", probe_stats.seen}, {"fp16_scale", fp16_scale}, {"twins_version", TWINS_VERSION_STRING},
                       {"world_size", world}};
    models::save_safetensors(path.string(), tensors, {{"twins_checkpoint", meta.dump()}, {"config", config.dump()}});
    const auto all = list_checkpoints(ckpt_dir);
    for (size_t i = static_cast<size_t>(tc.keep_checkpoints); i < all.size(); ++i) fs::remove(all[i]);
    return path;
  };

  const int64_t start_step = step;
  // Whether any rank was asked to stop (all ranks get the same answer).
  auto agree_stop = [&] {
    if (!comm) return g_stop.load();
    at::Tensor flag = at::full({1}, g_stop.load() ? 1.0 : 0.0, at::TensorOptions().dtype(at::kDouble).device(device));
    comm->all_reduce(flag);
    return flag.item<double>() > 0;
  };
  const bool tty = show && ::isatty(STDERR_FILENO);
  const int64_t max_steps = tc.max_steps > 0 ? std::min(tc.max_steps, total_steps) : total_steps;
  if (show)
    std::cerr << "pretrain " << recipe.method << ": " << dataset->size() << " samples, " << views.size() << " views, "
              << steps_per_epoch << " steps/epoch, " << tc.epochs << " epochs" << (tc.max_steps ? " (max_steps " + std::to_string(tc.max_steps) + ")" : "")
              << ", batch " << tc.batch_size << (comm ? " x " + std::to_string(world) + " ranks (" + comm->backend() + ")" : "")
              << (accumulate > 1 ? " x " + std::to_string(accumulate) + " accumulated" : "")
              << ", lr " << lr << ", device " << device.str() << " (" << precision << ")\n";

  PretrainResult result;
  double window_wait = 0, window_time = 0, total_wait = 0;
  int64_t window_images = 0, images = 0;
  auto window_start = Clock::now();
  const auto train_start = Clock::now();
  bool stop = false;
  std::optional<double> last_probe;
  std::optional<eval::Features> last_eval_features;

  while (!stop && epoch < tc.epochs && step < max_steps) {
    loader.start_epoch(epoch, first_batch);
    const auto epoch_start = Clock::now();
    while (step < max_steps && first_batch < epoch_batches) {
      const double factor_lr = warmup_cosine_lr(step, total_steps, warmup_steps, 1.0, recipe.schedule.final_lr_ratio);
      detail::set_learning_rates(*optimizer, {lr * factor_lr, bias_lr * factor_lr});
      optimizer->zero_grad();
      // The loss and its terms of this step (summed over micro-batches, each weighted 1/accumulate).
      at::Tensor step_total;
      std::vector<at::Tensor> step_terms;
      std::vector<std::string> term_names;
      int64_t next_batch = first_batch;
      bool complete = true;
      for (int64_t micro = 0; micro < accumulate; ++micro) {
        const auto wait_start = Clock::now();
        auto batch = loader.next();
        const double waited = seconds_since(wait_start);
        if (!batch) {
          complete = false;
          break;
        }
        window_wait += waited, total_wait += waited;
        std::vector<at::Tensor> xs;
        for (size_t v = 0; v < views.size(); ++v) {
          at::Tensor x = augment::normalize_batch(batch->views[v], views[v].normalization, device, at::kFloat);
          if (tc.channels_last) x = x.contiguous(at::MemoryFormat::ChannelsLast);
          xs.push_back(std::move(x));
        }
        if (comm && !tc.sync_batchnorm) model.broadcast_buffers(*comm);
        detail::SSLModel::Output out;
        {
          compat::CudaAutocast autocast(cuda && precision != "fp32", precision == "fp16" ? at::kHalf : at::kBFloat16);
          out = model.forward(xs);
        }
        const double weight = 1.0 / static_cast<double>(accumulate);
        step_total = step_total.defined() ? step_total + out.loss.total.detach() * weight : out.loss.total.detach() * weight;
        for (size_t k = 0; k < out.loss.terms.size(); ++k) {
          const at::Tensor t = out.loss.terms[k].second.detach() * weight;
          if (micro == 0) step_terms.push_back(t), term_names.push_back(out.loss.terms[k].first);
          else step_terms[k] = step_terms[k] + t;
        }
        // Only the last micro-batch's backward averages gradients over ranks.
        if (reducer) reducer->set_sync(micro + 1 == accumulate);
        at::Tensor objective = out.loss.total.to(at::kFloat) * weight;
        if (precision == "fp16") objective = objective * fp16_scale;  // dynamic loss scaling
        objective.backward();
        if (probing) {
          // Labelled samples only (unlabelled ones are -1). Under data parallelism every rank
          // steps the probe, even without labels in its batch, so the collectives stay matched.
          const at::Tensor labels = batch->labels.to(device);
          const at::Tensor valid = labels.ge(0);
          const int64_t labelled = valid.sum().item<int64_t>();
          if (labelled > 0 || probe_reducer) {
            const at::Tensor logits = model.probe->forward(out.features.detach().to(at::kFloat));
            const at::Tensor per_sample = torch::nn::functional::cross_entropy(
                logits, labels.clamp_min(0), torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kNone));
            const at::Tensor probe_loss = (per_sample * valid).sum() / static_cast<double>(std::max<int64_t>(1, labelled));
            probe_optimizer->zero_grad();
            probe_loss.backward();
            if (probe_reducer) probe_reducer->finish();
            probe_optimizer->step();
            probe_stats.correct += (logits.argmax(1).eq(labels) * valid).sum().item<int64_t>();
            probe_stats.seen += labelled;
          }
        }
        const int64_t n = batch->views[0].size(0) * world;  // images of every rank
        images += n, window_images += n;
        next_batch = batch->index + 1;
      }
      if (!complete) break;
      // The loss and its terms averaged over ranks (what one process over the global batch
      // reports), and whether any rank was asked to stop: one small all-reduce per step, so
      // every rank takes the same decisions at the same step.
      std::vector<double> term_values;
      double total = 0;
      bool stop_requested = g_stop.load() || (options.stop_after > 0 && step + 1 - start_step >= options.stop_after);
      {
        std::vector<at::Tensor> parts{step_total.to(at::kDouble).reshape({1})};
        for (const auto& t : step_terms) parts.push_back(t.to(at::kDouble).reshape({1}));
        parts.push_back(at::full({1}, stop_requested ? 1.0 : 0.0, at::TensorOptions().dtype(at::kDouble).device(device)));
        at::Tensor shared = at::cat(parts);
        if (comm) comm->all_reduce(shared);
        shared = shared.to(at::kCPU);
        const double* v = shared.data_ptr<double>();
        total = v[0] / world;
        for (size_t k = 0; k < step_terms.size(); ++k) term_values.push_back(v[k + 1] / world);
        stop_requested = v[step_terms.size() + 1] > 0;
      }
      // A non-finite loss stops the run here, before the optimizer step, naming the step and the term.
      if (!std::isfinite(total)) {
        std::string terms;
        for (size_t k = 0; k < term_values.size(); ++k) terms += " " + term_names[k] + "=" + std::to_string(term_values[k]);
        throw std::runtime_error("step " + std::to_string(step) + " (epoch " + std::to_string(epoch) +
                                 "): the loss is not finite (total " + std::to_string(total) + ";" + terms +
                                 "). The last good checkpoint is in " + ckpt_dir.string() +
                                 "; lower optimizer.base_lr or check the data (a constant batch, NaN pixels)");
      }
      if (reducer) reducer->finish();
      bool apply = true;
      if (precision == "fp16") {
        for (auto& p : model.parameters())
          if (p.grad().defined()) {
            p.grad().div_(fp16_scale);
            if (!p.grad().isfinite().all().item<bool>()) apply = false;
          }
        if (!apply) fp16_scale /= 2, fp16_good = 0;
        else if (++fp16_good % 2000 == 0) fp16_scale *= 2;
      }
      if (apply) optimizer->step();
      if (model.target_backbone) model.ema_update(byol_tau(step, total_steps, recipe.tau_base));
      ++step;

      if (step % tc.log_every == 0 || step == max_steps) {
        window_time = seconds_since(window_start);
        json line = {{"step", step}, {"epoch", epoch}, {"lr", lr * factor_lr}, {"loss", total}};
        for (size_t k = 0; k < term_values.size(); ++k) line[term_names[k]] = term_values[k];
        line["images_per_s"] = window_images / std::max(1e-9, window_time);
        line["data_wait"] = window_wait / std::max(1e-9, window_time);
        line["peak_rss_mb"] = peak_rss_mb();
        if (model.target_backbone) line["tau"] = byol_tau(step, total_steps, recipe.tau_base);
        log(line);
        if (show) {
          const double eta = (max_steps - step) * seconds_since(train_start) / static_cast<double>(std::max<int64_t>(1, step - start_step));
          std::ostringstream s;
          s << "epoch " << epoch + 1 << "/" << tc.epochs << " step " << next_batch / accumulate << "/" << steps_per_epoch << " [" << step
            << "/" << max_steps << "] " << std::fixed << std::setprecision(0) << line["images_per_s"].get<double>() << " img/s  loss "
            << std::setprecision(4) << total << "  data " << std::setprecision(0) << 100 * line["data_wait"].get<double>()
            << "%  ETA " << format_duration(eta);
          if (tty) std::cerr << "\r" << s.str() << "\033[K" << std::flush;
          else std::cerr << s.str() << "\n";
        }
        window_images = 0, window_wait = 0, window_start = Clock::now();
      }
      if (tc.checkpoint_every_steps > 0 && step % tc.checkpoint_every_steps == 0) save_checkpoint(next_batch);
      if (stop_requested) {
        stop = true;
        first_batch = next_batch;
        break;
      }
      first_batch = next_batch;
    }
    if (tty) std::cerr << "\n";
    if (stop || first_batch < epoch_batches) break;  // interrupted or max_steps inside the epoch

    // End of an epoch: the online probe's accuracy.
    json line = {{"epoch", epoch}, {"step", step}, {"epoch_seconds", seconds_since(epoch_start)}};
    if (probing && comm) {  // the probe's accuracy over every rank's samples
      at::Tensor counts = at::tensor({probe_stats.correct, probe_stats.seen}, at::kLong).to(device);
      comm->all_reduce(counts);
      counts = counts.to(at::kCPU);
      probe_stats.correct = counts[0].item<int64_t>(), probe_stats.seen = counts[1].item<int64_t>();
    }
    if (probing) {
      line["online_probe_train_top1"] = probe_stats.top1();
      last_probe = probe_stats.top1();
      if (!recipe.probe.eval_data.is_null() && main_rank) {
        auto eval_set = data::create_dataset(recipe.probe.eval_data, "online_probe.eval_data");
        const auto view = eval::eval_view(*eval_set, views[0].size.first > 0 ? views[0].size.first : 224, views[0].normalization);
        eval::ExtractOptions eo;
        eo.workers = tc.workers, eo.channels = model.in_channels, eo.progress = false;
        const auto f = eval::extract_features(*model.backbone, eval_set, view, device, eo);
        at::NoGradGuard no_grad;
        model.probe->eval();
        const at::Tensor pred = model.probe->forward(f.features.to(device)).argmax(1).to(at::kCPU);
        model.probe->train();
        const at::Tensor mask = f.labels.ge(0);
        const double top1 = 100.0 * pred.index({mask}).eq(f.labels.index({mask})).sum().item<double>() /
                            std::max<int64_t>(1, mask.sum().item<int64_t>());
        line["online_probe_eval_top1"] = top1;
        last_probe = top1;
        last_eval_features = f;
      }
      if (show)
        std::cerr << "epoch " << epoch + 1 << ": online probe " << std::fixed << std::setprecision(2)
                  << (line.contains("online_probe_eval_top1") ? line["online_probe_eval_top1"].get<double>() : probe_stats.top1())
                  << "% top-1" << (line.contains("online_probe_eval_top1") ? " (eval data)" : " (training views)") << "\n";
    }
    log(line);
    ++epoch;
    first_batch = 0;
    probe_stats = {};
    result.epochs_completed = epoch;
    const bool stop_now = agree_stop();
    if (tc.checkpoint_every_epochs > 0 && epoch % tc.checkpoint_every_epochs == 0 && epoch < tc.epochs && !stop_now)
      save_checkpoint(0);
    if (stop_now) stop = true;
  }

  // Final checkpoint (also when interrupted) and, when finished, the backbone.
  const fs::path last = save_checkpoint(first_batch);
  result.steps = step;
  result.interrupted = stop;
  result.wall_seconds = seconds_since(start_time);
  const double train_seconds = seconds_since(train_start);
  result.images_per_second = images / std::max(1e-9, train_seconds);
  result.online_probe_top1 = last_probe;
  if (!stop && main_rank) {
    result.backbone_path = (out_dir / "backbone.safetensors").string();
    // What the backbone was trained on, so that embedding and evaluation use it by default.
    const json normalize = {{"mean", views[0].normalization.mean}, {"std", views[0].normalization.std}};
    models::save_backbone(result.backbone_path, *model.backbone,
                          {{"twins_method", recipe.method}, {"twins_version", TWINS_VERSION_STRING},
                           {"twins_image_size", std::to_string(views[0].size.first > 0 ? views[0].size.first : 224)},
                           {"twins_normalize", normalize.dump()}});
  }
  if (!stop && main_rank) {  // pictures; a failure here never costs the run
    try {
      eval::write_training_curves((out_dir / "metrics.jsonl").string(), (out_dir / "curves.svg").string());
      if (last_eval_features)
        eval::write_projection(last_eval_features->features, last_eval_features->labels, (out_dir / "embeddings.svg").string(),
                               recipe.method + " backbone, eval data");
    } catch (const std::exception& e) {
      std::cerr << "warning: could not draw the pictures: " << e.what() << "\n";
    }
  }
  json summary = {{"summary", true}, {"steps", step}, {"epochs_completed", result.epochs_completed},
                  {"wall_s", result.wall_seconds}, {"train_s", train_seconds}, {"images_per_s", result.images_per_second},
                  {"data_wait", total_wait / std::max(1e-9, train_seconds)}, {"device", device.str()},
                  {"precision", precision}, {"interrupted", stop}, {"peak_rss_mb", peak_rss_mb()}};
  if (cuda) summary["gpu_hours"] = train_seconds / 3600.0;
  if (last_probe) summary["online_probe_top1"] = *last_probe;
  log(summary);
  if (show) {
    if (stop)
      std::cerr << "interrupted at step " << step << "; checkpoint " << last.string() << "\nresume with: "
                << (options.command_line.empty() ? "twins pretrain --out " + out_dir.string() : options.command_line)
                << " --resume\n";
    else
      std::cerr << "done: " << step << " steps in " << format_duration(result.wall_seconds) << ", "
                << std::fixed << std::setprecision(1) << result.images_per_second << " img/s; backbone: " << result.backbone_path << "\n";
  }
  return result;
}

}  // namespace twins::train

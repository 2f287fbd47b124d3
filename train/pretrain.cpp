// `twins pretrain` as a loop over Trainer::step: the loader feeds it, a RunLog reports it, a
// CheckpointStore keeps it resumable; at the end the backbone and the pictures.
#include "twins/train/pretrain.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <iomanip>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "train/checkpoint_store.h"
#include "train/run_log.h"
#include "twins/augment/pipeline.h"
#include "twins/augment/random.h"
#include "twins/data/dataset.h"
#include "twins/data/loader.h"
#include "twins/distributed/communicator.h"
#include "twins/eval/features.h"
#include "twins/eval/plots.h"
#include "twins/eval/probe.h"
#include "twins/eval/transform.h"
#include "twins/io.h"
#include "twins/losses.h"
#include "twins/models/weights.h"
#include "twins/runtime.h"
#include "twins/train/recipe.h"
#include "twins/train/trainer.h"
#include "twins/version.h"

namespace twins::train {
namespace fs = std::filesystem;
using nlohmann::json;
using Clock = std::chrono::steady_clock;

namespace {

std::atomic<bool> g_stop{false};

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

void warn(const std::string& text) { std::cerr << "warning: " << text << "\n"; }

}  // namespace

void request_stop() { g_stop.store(true); }
void clear_stop() { g_stop.store(false); }

StepBenchmark bench_step(const json& config, int64_t steps, int64_t warmup, const std::string& device_name,
                         int64_t profile_steps) {
  const Recipe recipe = Recipe::parse(config);
  const TrainConfig& tc = recipe.train;
  const at::Device device = resolve_device(device_name.empty() ? tc.device : device_name, "train.device");
  configure_compute(tc.threads, tc.deterministic, device, tc.float32_matmul_precision);
  const int64_t classes = 10;
  at::manual_seed(tc.seed);
  TrainerOptions to;
  to.device = device, to.num_classes = classes, to.total_steps = std::max<int64_t>(1, warmup + steps);
  Trainer trainer(recipe, to);
  // Synthetic uint8 batches on the device, as the loader would deliver them: the model-only
  // bound of the same step that `twins pretrain` runs.
  std::vector<data::Batch> batches(static_cast<size_t>(tc.grad_accumulation));
  for (auto& b : batches) {
    for (const auto& v : augment::parse_views(recipe.views, "views")) {
      const int h = v.size.first > 0 ? v.size.first : augment::kDefaultImageSize;
      const int w = v.size.second > 0 ? v.size.second : augment::kDefaultImageSize;
      b.views.push_back(at::randint(0, 256, {tc.batch_size, trainer.in_channels(), h, w},
                                    at::TensorOptions().dtype(at::kByte).device(device)));
    }
    b.labels = at::randint(0, classes, {tc.batch_size}, at::kLong);  // the loader's are on the CPU
  }
  // A CUDA graph is captured after three eager steps: none of those four is timed.
  if (trainer.cuda_graph()) warmup = std::max<int64_t>(warmup, 4);
  reset_peak_device_memory(device);
  for (int64_t i = 0; i < warmup; ++i) trainer.step(batches);
  // The clock starts and stops with the device idle (as the PyTorch reference's
  // torch.cuda.synchronize()): the last step's optimizer and EMA, queued after its loss
  // read-back, are timed, the warm-up's are not.
  synchronize_device(device);
  const auto start = Clock::now();
  for (int64_t i = 0; i < steps; ++i) trainer.step(batches);
  synchronize_device(device);
  StepBenchmark r;
  r.batch_size = tc.batch_size * tc.grad_accumulation, r.steps = steps, r.device = device.str();
  r.seconds_per_step = seconds_since(start) / static_cast<double>(std::max<int64_t>(1, steps));
  r.images_per_second = static_cast<double>(r.batch_size) / r.seconds_per_step;
  r.peak_memory_gib = static_cast<double>(peak_device_memory_bytes(device)) / (1 << 30);
  r.cuda_graph = trainer.cuda_graph();
  if (profile_steps > 0) {
    {  // one step under the profiler first, not kept: its hooks' small allocations move the large
       // blocks of the step's first run under them to fresh pages (a 1.8x slower ViT-S/16 step)
      profiler::Recorder warm(device.is_cuda());
      trainer.step(batches);
      synchronize_device(device);
    }
    profiler::Recorder recorder(device.is_cuda());
    for (int64_t i = 0; i < profile_steps; ++i) trainer.step(batches);
    synchronize_device(device);
    r.profile = recorder.stop();
  }
  return r;
}

namespace {

// Where this process sits: one rank per process when a launcher started it (torchrun, SLURM,
// OpenMPI, or `twins pretrain --nproc-per-node`), its CUDA device the local rank's.
struct Job {
  at::Device device{at::kCPU};
  std::shared_ptr<distributed::Communicator> comm;
  int world = 1;
  bool main_rank = true;  // writes the run folder, prints progress
};

Job join_job(const TrainConfig& tc, const std::string& device_name) {
  const distributed::Environment env = distributed::detect_environment();
  Job job;
  if (env.launcher == "none") {
    job.device = resolve_device(device_name, "train.device");
    return job;
  }
  job.device = resolve_rank_device(device_name, env.local_rank, "train.device");
  distributed::CommunicatorOptions co;
  co.backend = tc.dist_backend, co.timeout_s = tc.dist_timeout_s, co.heartbeat_timeout_s = tc.dist_heartbeat_timeout_s;
  job.comm = distributed::Communicator::create(env, job.device, co);
  job.world = job.comm->world_size();
  job.main_rank = job.comm->rank() == 0;
  return job;
}

// The position in the run: the epoch, and the next loader batch in it.
struct Position {
  int64_t epoch = 0, batch = 0;
};

// Restores a checkpoint into the trainer and returns where the run continues. With another
// number of ranks the epoch continues after the same number of samples.
Position restore(Trainer& trainer, const detail::CheckpointStore::Checkpoint& k, const Job& job, int64_t accumulate,
                 int64_t epoch_batches) {
  trainer.load_state(k.file, k.info);
  Position p{k.info.at("epoch").get<int64_t>(), k.info.at("batch").get<int64_t>()};
  const int64_t saved_world = k.info.value("world_size", int64_t{1});
  if (saved_world != job.world) {
    p.batch = p.batch * saved_world / job.world / accumulate * accumulate;
    if (job.main_rank)
      warn("the checkpoint was written by " + std::to_string(saved_world) + " rank(s), resuming with " +
           std::to_string(job.world) +
           ": the epoch continues after the same number of samples; steps and schedules follow the new global batch");
  }
  // Stopped at an epoch's last step: its end (the online probe's and kNN's scores, its metrics
  // line, the per-epoch checkpoint) is still to come, as in a run that was not stopped.
  p.batch = std::min(p.batch, epoch_batches);
  return p;
}

// Features of online_probe.eval_data (or of the kNN monitor's bank) under the evaluation
// transform, on rank 0; `classes` grows to the dataset's number of classes.
eval::Features eval_transform_features(Trainer& trainer, const Recipe& recipe, const augment::View& train_view,
                                       const at::Device& device, std::shared_ptr<const data::Dataset> set,
                                       const std::string& what, bool progress, int64_t& classes,
                                       const std::function<void()>& after_batch) {
  const auto transform = eval::EvalTransform::for_dataset(*set, train_view.output_side(), train_view.normalization);
  eval::ExtractOptions eo;
  eo.workers = recipe.train.workers, eo.channels = trainer.in_channels(), eo.progress = progress, eo.what = what;
  eo.after_batch = after_batch;
  classes = std::max(classes, set->num_classes());
  return eval::extract_features(trainer.backbone(), std::move(set), transform.view(), device, eo);
}

// The online probe's top-1 on stored features (labelled rows).
double probe_accuracy(Trainer& trainer, const eval::Features& features) {
  const at::Tensor pred = trainer.probe_logits(features.features).argmax(1);
  const at::Tensor mask = features.labels.ge(0);
  return 100.0 * pred.index({mask}).eq(features.labels.index({mask})).sum().item<double>() /
         static_cast<double>(std::max<int64_t>(1, mask.sum().item<int64_t>()));
}

// The kNN monitor's bank: online_probe.knn.bank_data or the training data, labelled, and of it
// bank_size samples drawn at random with `seed` (the same every epoch; in the data's order).
std::shared_ptr<const data::Dataset> open_knn_bank(const KnnMonitorConfig& knn,
                                                   std::shared_ptr<const data::Dataset> training, uint64_t seed,
                                                   const std::shared_ptr<const data::Dataset>& eval_set) {
  if (eval_set->num_classes() <= 0)
    throw std::invalid_argument(
        "online_probe.knn: online_probe.eval_data has no labels to score the kNN classifier on");
  const bool own = !knn.bank_data.is_null();
  std::shared_ptr<const data::Dataset> bank =
      own ? data::create_dataset(knn.bank_data, "online_probe.knn.bank_data") : std::move(training);
  const std::string key = own ? "online_probe.knn.bank_data" : "data";
  if (bank->num_classes() <= 0)
    throw std::invalid_argument("online_probe.knn: " + key +
                                " has no labels, and the kNN bank needs them (give online_probe.knn.bank_data, e.g. "
                                "the labelled training split)");
  if (knn.bank_size == 0 || knn.bank_size >= bank->size()) return bank;
  std::vector<int64_t> indices = augment::permutation(bank->size(), augment::Rng(seed));
  indices.resize(static_cast<size_t>(knn.bank_size));
  std::sort(indices.begin(), indices.end());
  try {
    return data::subset(bank, std::move(indices));
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument("online_probe.knn.bank_size: " + std::string(e.what()) + " (bank_size 0 takes all of " +
                                key + ")");
  }
}

// backbone.safetensors with what it was trained on, and the pictures (whose failure never
// costs the run).
std::string write_results(Trainer& trainer, const Recipe& recipe, const augment::View& train_view,
                          const fs::path& out_dir, int64_t steps, const std::optional<eval::Features>& eval_features) {
  const std::string path = (out_dir / "backbone.safetensors").string();
  models::BackboneInfo info;
  info.image_size = train_view.output_side();
  info.mean = train_view.normalization.mean, info.std = train_view.normalization.std;
  info.method = recipe.method;
  info.version = TWINS_VERSION_STRING;
  info.provenance = "twins " + std::string(TWINS_VERSION_STRING) + " pretrain, " + std::to_string(steps) + " steps";
  if (!recipe.backbone_init.empty()) info.provenance += ", from " + recipe.backbone_init;
  models::save_backbone(path, trainer.backbone(), info);
  try {
    eval::write_training_curves((out_dir / "metrics.jsonl").string(), (out_dir / "curves.svg").string());
    if (eval_features)
      eval::write_projection(eval_features->features, eval_features->labels, (out_dir / "embeddings.svg").string(),
                             recipe.method + " backbone, eval data");
  } catch (const std::exception& e) {
    warn("could not draw the pictures: " + std::string(e.what()));
  }
  return path;
}

}  // namespace

PretrainResult pretrain(const json& given_config, const PretrainOptions& options) {
  const auto start_time = Clock::now();
  const fs::path out_dir = options.out_dir;
  // The run folder is this run's alone (rank 0 writes it): a second run on it fails at once.
  // Holding the lock, temporaries of writes a crash interrupted can go.
  std::optional<io::FolderLock> lock;
  if (distributed::detect_environment().rank == 0) {
    lock.emplace(out_dir.string());
    const int stale = io::remove_stale_temporaries(out_dir.string()) +
                      io::remove_stale_temporaries((out_dir / "checkpoints").string());
    if (stale > 0)
      warn("removed " + std::to_string(stale) + " temporary file(s) of interrupted writes in " + out_dir.string());
  }
  // On resume, the run's own config rules: the checkpoint holds the resolved one.
  json config = given_config;
  std::optional<detail::CheckpointStore::Checkpoint> resume_from;
  const detail::CheckpointStore found(out_dir / "checkpoints", 1);
  const std::vector<fs::path> existing = found.list();
  if (!options.resume && !options.auto_resume && !existing.empty())
    throw std::invalid_argument(out_dir.string() + " already holds a run (" + existing.front().string() +
                                "): continue it with --resume, or start this one in another --out (or remove that "
                                "folder); --auto-resume continues a run where there is one and starts one where not");
  if (options.resume || !existing.empty()) {
    resume_from = found.load_latest(warn);
    if (!resume_from)
      throw std::runtime_error("resume: no checkpoint in " + (out_dir / "checkpoints").string() +
                               " (start without resuming)");
    // --auto-resume runs one command for the first start and every restart: the run there must
    // be the one that command starts.
    if (!options.resume && resume_from->config != given_config) {
      const json patch = json::diff(resume_from->config, given_config);  // RFC 6902: "/train/epochs"
      json::json_pointer pointer(patch.empty() ? std::string() : patch.front().value("path", std::string()));
      if (!pointer.empty() && pointer.back() == "-") pointer = pointer.parent_pointer();  // an array grown
      std::string key;
      for (json::json_pointer p = pointer; !p.empty(); p.pop_back()) key = p.back() + (key.empty() ? "" : "." + key);
      if (key.empty()) key = "config";
      auto shown = [&pointer](const json& j) {
        std::string text = j.contains(pointer) ? j.at(pointer).dump() : std::string("absent");
        return text.size() > 80 ? text.substr(0, 80) + "..." : text;
      };
      throw std::invalid_argument("--auto-resume: " + out_dir.string() + " holds a run of another config (" + key +
                                  ": " + shown(resume_from->config) + " there, " + shown(given_config) +
                                  " given): continue it with --resume (its own config), or start this one in another "
                                  "--out");
    }
    std::cerr << "resuming from " << resume_from->path.string() << "\n";
    config = resume_from->config;
  }
  const Recipe recipe = Recipe::parse(config);
  const TrainConfig& tc = recipe.train;
  const detail::CheckpointStore store(out_dir / "checkpoints", tc.keep_checkpoints);
  const Job job = join_job(tc, options.device.empty() ? tc.device : options.device);
  if (job.main_rank) io::check_writable(store.dir().string());  // before the training time is spent
  configure_compute(tc.threads, tc.deterministic, job.device, tc.float32_matmul_precision);

  const auto dataset = data::create_dataset(recipe.data, "data");
  const auto views = augment::parse_views(recipe.views, "views");
  data::LoaderOptions lo;
  lo.batch_size = tc.batch_size, lo.seed = tc.seed, lo.channels = recipe.in_channels();
  lo.workers = loader_workers(tc.workers, job.device);
  lo.pin_memory = job.device.is_cuda();
  if (job.comm) lo.rank = job.comm->rank(), lo.world_size = job.world;
  const int64_t rank_samples = (dataset->size() + job.world - 1) / job.world;
  if (rank_samples < tc.batch_size)
    throw std::invalid_argument("train.batch_size: " + std::to_string(tc.batch_size) + " is larger than the " +
                                std::to_string(rank_samples) + " samples of " +
                                (job.world > 1 ? "each rank" : "the dataset"));
  data::Loader loader(dataset, views, lo);
  // With gradient accumulation a step takes `accumulate` loader batches; an epoch's leftover
  // batches (fewer than `accumulate`) are skipped.
  const int64_t accumulate = tc.grad_accumulation;
  const int64_t steps_per_epoch = loader.batches_per_epoch() / accumulate;
  const int64_t epoch_batches = steps_per_epoch * accumulate;
  if (steps_per_epoch < 1)
    throw std::invalid_argument(
        "train.grad_accumulation: " + std::to_string(accumulate) + " batches per step, but an epoch has only " +
        std::to_string(loader.batches_per_epoch()) + " batches of " + std::to_string(tc.batch_size));
  int64_t total_steps = 0;
  if (__builtin_mul_overflow(tc.epochs, steps_per_epoch, &total_steps))
    throw std::invalid_argument("train.epochs: " + std::to_string(tc.epochs) + " epochs of " +
                                std::to_string(steps_per_epoch) + " steps overflow the step counter");
  const int64_t max_steps = tc.max_steps > 0 ? std::min(tc.max_steps, total_steps) : total_steps;

  at::manual_seed(tc.seed);
  TrainerOptions to;
  to.device = job.device, to.num_classes = dataset->num_classes(), to.communicator = job.comm;
  to.steps_per_epoch = steps_per_epoch, to.total_steps = total_steps;
  if (!resume_from) to.backbone_init = recipe.backbone_init;  // a resumed run has its weights
  Trainer trainer(recipe, to);
  Position at;
  const bool resumed = resume_from.has_value();
  if (resume_from) at = restore(trainer, *resume_from, job, accumulate, epoch_batches), resume_from.reset();
  if (job.comm) {  // every rank starts where the others do (the run folder shared by every node)
    const std::vector<int64_t> place = {trainer.steps_taken(), at.epoch, at.batch};
    const std::vector<int64_t> places = job.comm->gather(place);  // rank after rank
    bool same = true;
    for (size_t i = 0; i < places.size(); ++i) same = same && places[i] == place[i % place.size()];
    if (!same) {
      std::string steps;
      for (size_t r = 0; r < places.size() / place.size(); ++r)  // each rank's step leads its values
        steps += (r ? ", rank " : "rank ") + std::to_string(r) + " at step " + std::to_string(places[r * place.size()]);
      throw std::runtime_error("the ranks start from different steps (" + steps +
                               "): every rank must see the same run folder " + out_dir.string() +
                               " (on a file system every node sees)");
    }
  }

  detail::RunLog log(out_dir, job.main_rank, options.progress, tc.tensorboard, trainer.steps_taken() + 1,
                     resumed ? at.epoch : -1);
  log.write_config(config);
  auto save_checkpoint = [&] {
    // The online probe's counts so far are every rank's (a collective: every rank saves here).
    const Trainer::ProbeCounts counts = job.comm && trainer.probing() ? trainer.probe_counts() : Trainer::ProbeCounts{};
    if (!job.main_rank) return store.path_of(trainer.steps_taken());  // every rank holds the same state
    json info = trainer.state_info();
    if (job.comm && trainer.probing()) info["probe_correct"] = counts.correct, info["probe_seen"] = counts.seen;
    info.update(
        {{"epoch", at.epoch}, {"batch", at.batch}, {"twins_version", TWINS_VERSION_STRING}, {"world_size", job.world}});
    log.sync();  // the metrics up to here survive with the checkpoint
    return store.save(trainer.steps_taken(), trainer.state(), info, config);
  };
  {
    std::ostringstream s;
    s << "pretrain " << recipe.method << ": " << dataset->size() << " samples, " << views.size() << " views, "
      << steps_per_epoch << " steps/epoch, " << tc.epochs << " epochs"
      << (tc.max_steps ? " (max_steps " + std::to_string(tc.max_steps) + ")" : "") << ", batch " << tc.batch_size
      << (job.comm ? " x " + std::to_string(job.world) + " ranks (" + job.comm->backend() + ")" : "")
      << (accumulate > 1 ? " x " + std::to_string(accumulate) + " accumulated" + (tc.grad_cache ? " (grad cache)" : "")
                         : "")
      << ", lr " << trainer.base_learning_rates().first << ", " << lo.workers << " loader workers"
      << (tc.workers == kAutoWorkers ? " (auto)" : "") << ", device " << job.device.str() << " ("
      << to_string(trainer.precision()) << (trainer.cuda_graph() ? ", CUDA graph" : "") << ")";
    log.say(s.str());
  }
  if (job.main_rank && accumulate > 1 && !tc.grad_cache && losses::create_loss(recipe.loss)->needs().batch_statistics)
    warn("train.grad_accumulation: " + recipe.method + "'s batch statistics are taken over each of the " +
         std::to_string(accumulate) + " accumulated batches, not over the step's " +
         std::to_string(tc.batch_size * job.world * accumulate) +
         " samples together; train.grad_cache: true takes the loss over the whole step (one more forward per batch)");
  if (job.main_rank && accumulate == 1 && tc.grad_cache)
    warn(
        "train.grad_cache: nothing to do with train.grad_accumulation 1 (it takes the loss over the accumulated "
        "batches of a step)");
  if (job.main_rank && !trainer.cuda_graph_note().empty())
    warn("train.cuda_graph: the step runs eagerly: " + trainer.cuda_graph_note());
  if (job.main_rank && job.device.is_cpu() && !ensure_correct_cpu_convolutions().empty())  // checked by the Trainer
    warn(ensure_correct_cpu_convolutions());
  if (job.main_rank && job.device.is_cpu() && trainer.precision() == Precision::bf16 && !cpu_has_native_bf16())
    warn(
        "train.precision: bf16 on a CPU without AVX512-BF16 or AMX is emulated and may be slower than fp32 (compare "
        "with twins bench step)");

  PretrainResult result;
  result.epochs_completed = at.epoch;  // resumed: the checkpoint's, until an epoch ends here
  const int64_t start_step = trainer.steps_taken();
  bool stop = false;
  std::optional<double> last_probe, last_knn;
  std::optional<eval::Features> eval_features;
  // The online probe's eval data and the kNN monitor's bank, opened and checked before any
  // training by rank 0, which alone scores them; its failure stops every rank at once.
  std::shared_ptr<const data::Dataset> knn_bank, eval_set;
  if (!recipe.probe.eval_data.is_null() && (trainer.probing() || recipe.probe.knn.enabled)) {
    distributed::on_rank0(
        job.comm,
        [&] {
          eval_set = data::create_dataset(recipe.probe.eval_data, "online_probe.eval_data");
          if (recipe.probe.knn.enabled) knn_bank = open_knn_bank(recipe.probe.knn, dataset, tc.seed, eval_set);
        },
        "open online_probe's eval data");
  }
  // (An epoch whose steps are all taken may still be to end: resumed after its last step.)
  while (!stop && at.epoch < tc.epochs && (trainer.steps_taken() < max_steps || at.batch == epoch_batches)) {
    if (at.batch < epoch_batches) loader.start_epoch(at.epoch, at.batch);  // (else only the epoch's end is left)
    const auto epoch_start = Clock::now();
    while (!stop && trainer.steps_taken() < max_steps && at.batch < epoch_batches) {
      std::vector<data::Batch> micro;
      double waited = 0;
      for (int64_t i = 0; i < accumulate; ++i) {
        const auto wait_start = Clock::now();
        auto batch = loader.next();
        waited += seconds_since(wait_start);
        if (!batch) throw std::logic_error("pretrain: the loader ended the epoch early");
        micro.push_back(std::move(*batch));
      }
      const bool want_stop =
          g_stop.load() || (options.stop_after > 0 && trainer.steps_taken() + 1 - start_step >= options.stop_after);
      StepResult r;
      try {
        r = trainer.step(micro, want_stop);
      } catch (const NonFiniteLoss& e) {
        throw std::runtime_error(std::string(e.what()) + " in epoch " + std::to_string(at.epoch) +
                                 ". The last good checkpoint is in " + store.dir().string() +
                                 "; lower optimizer.base_lr or check the data (a constant batch, NaN pixels)");
      }
      at.batch = micro.back().index + 1;
      stop = r.stop;
      io::fault_point("step", std::to_string(r.step));
      log.count(r.images, waited, loader.skipped());
      if (r.step % tc.log_every == 0 || r.step == max_steps)
        log.step(r, {at.epoch, tc.epochs, at.batch / accumulate, steps_per_epoch, r.step, max_steps, start_step});
      if (tc.checkpoint_every_steps > 0 && r.step % tc.checkpoint_every_steps == 0) save_checkpoint();
    }
    log.end_progress();
    if (stop || at.batch < epoch_batches) break;  // interrupted, or max_steps inside the epoch

    // End of an epoch: the online probe's accuracy, a checkpoint, and whether any rank was
    // asked to stop meanwhile (a collective: all ranks get the same answer).
    json line = {{"epoch", at.epoch}, {"step", trainer.steps_taken()}, {"epoch_seconds", seconds_since(epoch_start)}};
    if (trainer.probing()) {  // summed over ranks: every rank takes part
      last_probe = trainer.end_probe_epoch().top1();
      line["online_probe_train_top1"] = *last_probe;
    }
    const bool knn_epoch =
        recipe.probe.knn.enabled && ((at.epoch + 1) % recipe.probe.knn.every_epochs == 0 || at.epoch + 1 == tc.epochs ||
                                     trainer.steps_taken() >= max_steps);
    const bool knn_now = knn_bank && knn_epoch;
    const bool on_eval_data = eval_set && (trainer.probing() || knn_now);  // (rank 0 alone has eval_set)
    auto percent = [](double v) {
      std::ostringstream s;
      s << std::fixed << std::setprecision(2) << v << "% top-1";
      return s.str();
    };
    std::string said;  // the epoch's line on the console
    // Rank 0 alone scores the eval data and embeds the kNN bank, however long that takes, the
    // other ranks waiting (on_rank0_long); its failure stops every rank.
    const auto score = [&](const std::function<void()>& keep_alive) {
      if (!on_eval_data) return;
      const auto eval_start = Clock::now();
      int64_t classes = 0;
      eval_features = eval_transform_features(trainer, recipe, views[0], job.device, eval_set, "online_probe.eval_data",
                                              false, classes, keep_alive);
      if (trainer.probing()) line["online_probe_eval_top1"] = *(last_probe = probe_accuracy(trainer, *eval_features));
      if (knn_now) {
        const auto knn_start = Clock::now();
        const auto bank = eval_transform_features(trainer, recipe, views[0], job.device, knn_bank, "online kNN bank",
                                                  options.progress, classes, keep_alive);
        const auto scores = eval::knn(bank, *eval_features, classes, recipe.probe.knn.options, job.device);
        if (scores.empty()) throw std::runtime_error("online_probe.knn: no labelled sample in online_probe.eval_data");
        for (const auto& [k, a] : scores) {
          line["online_knn_k" + std::to_string(k) + "_top1"] = a.top1;
          line["online_knn_k" + std::to_string(k) + "_top5"] = a.top5;
        }
        line["online_knn_seconds"] = seconds_since(knn_start);
        const int64_t first_k = recipe.probe.knn.options.k.front();
        last_knn = scores.at(first_k).top1;
        said = ", kNN (k=" + std::to_string(first_k) + ") " + percent(*last_knn) + " (eval data)";
      }
      log.leave_out(seconds_since(eval_start));  // images per second are the training's
    };
    if (job.comm && !recipe.probe.eval_data.is_null() && (trainer.probing() || knn_epoch))  // the same on every rank
      distributed::on_rank0_long(job.comm.get(), score, "score online_probe.eval_data");
    else
      score([] {});
    if (trainer.probing())
      said = ", online probe " + percent(*last_probe) + (on_eval_data ? " (eval data)" : " (training views)") + said;
    if (!said.empty()) log.say("epoch " + std::to_string(at.epoch + 1) + ":" + said.substr(1));
    log.append(line);
    ++at.epoch, at.batch = 0;
    result.epochs_completed = at.epoch;
    stop = job.comm ? job.comm->any(g_stop.load()) : g_stop.load();
    if (tc.checkpoint_every_epochs > 0 && at.epoch % tc.checkpoint_every_epochs == 0 && at.epoch < tc.epochs && !stop)
      save_checkpoint();
  }

  // The final checkpoint (also when interrupted) and, when finished, the backbone.
  result.checkpoint_path = save_checkpoint().string();
  result.steps = trainer.steps_taken();
  result.interrupted = stop;
  result.main_rank = job.main_rank;
  result.wall_seconds = seconds_since(start_time);
  const double train_seconds = log.seconds();
  result.images_per_second = static_cast<double>(log.images()) / std::max(1e-9, train_seconds);
  result.online_probe_top1 = last_probe;
  result.online_knn_top1 = last_knn;
  result.skipped_samples = job.comm ? job.comm->sum(loader.skipped()) : loader.skipped();
  if (!stop && job.main_rank)
    result.backbone_path = write_results(trainer, recipe, views[0], out_dir, result.steps, eval_features);
  json summary = {{"summary", true},
                  {"steps", result.steps},
                  {"epochs_completed", result.epochs_completed},
                  {"wall_s", result.wall_seconds},
                  {"train_s", train_seconds},
                  {"images_per_s", result.images_per_second},
                  {"data_wait", log.data_wait_fraction()},
                  {"device", job.device.str()},
                  {"precision", to_string(trainer.precision())},
                  {"interrupted", stop},
                  {"peak_rss_mb", detail::RunLog::peak_rss_mb()}};
  if (job.device.is_cuda()) summary["gpu_hours"] = train_seconds / 3600.0;
  if (last_probe) summary["online_probe_top1"] = *last_probe;
  if (last_knn) summary["online_knn_top1"] = *last_knn;
  summary["skipped_samples"] = result.skipped_samples;
  log.append(summary);
  if (result.skipped_samples > 0)
    log.say("warning: " + std::to_string(result.skipped_samples) +
            " bad sample(s) were replaced by the next good ones (on_bad_sample: skip); see the warnings above");
  if (stop) {
    log.say("interrupted at step " + std::to_string(result.steps) + "; checkpoint " + result.checkpoint_path);
    if (!options.command_line.empty()) log.say("resume with: " + options.command_line + " --resume");
  } else {
    std::ostringstream s;
    s << "done: " << result.steps << " steps in " << detail::format_duration(result.wall_seconds) << ", " << std::fixed
      << std::setprecision(1) << result.images_per_second << " img/s; backbone: " << result.backbone_path;
    log.say(s.str());
  }
  return result;
}

}  // namespace twins::train

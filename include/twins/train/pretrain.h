#pragma once
// `twins pretrain` as a library call: trains a recipe and writes the run folder:
//   config.json        the resolved config
//   metrics.jsonl      one JSON object per line: step lines, epoch lines, a final summary
//   checkpoints/       step-<N>.safetensors, the last train.keep_checkpoints kept
//   backbone.safetensors   the backbone's weights under torchvision's names (at the end)
#include <nlohmann/json_fwd.hpp>

#include <optional>
#include <string>

#include "twins/profiler.h"

namespace twins::train {

struct PretrainOptions {
  /// The run folder (created if needed).
  std::string out_dir = "runs/pretrain";
  /// Continue from the latest valid checkpoint of out_dir (its stored config is used).
  bool resume = false;
  /// Continue as `resume` when out_dir holds a checkpoint, else start: one command for the first
  /// start and every restart (torchrun --max-restarts, a requeued SLURM job). The run there must
  /// be of the given config (std::invalid_argument naming the first key that differs). Without
  /// either, a folder that holds checkpoints is refused (a second run would mix with the first).
  bool auto_resume = false;
  /// Overrides train.device when not empty.
  std::string device;
  /// Print progress (a bar on a terminal, periodic lines otherwise).
  bool progress = true;
  /// Stop as if interrupted after this many steps of this invocation (0: never). For jobs with
  /// a time slot (a SLURM limit): run a slice, resume later.
  int64_t stop_after = 0;
  /// When not empty, an interrupted run prints "resume with: <command_line> --resume" (the
  /// `twins` command prints its own, launcher included).
  std::string command_line;
};

struct PretrainResult {
  int64_t steps = 0;
  int64_t epochs_completed = 0;
  double wall_seconds = 0;
  double images_per_second = 0;
  bool interrupted = false;
  /// Whether this process is the one that wrote the run folder (rank 0, or the only process):
  /// the one that should speak for the job.
  bool main_rank = true;
  /// Path of backbone.safetensors (empty when interrupted).
  std::string backbone_path;
  /// The last checkpoint written (also when interrupted).
  std::string checkpoint_path;
  /// Bad samples replaced by the next good ones (on_bad_sample "skip"), over every rank.
  int64_t skipped_samples = 0;
  /// Online-probe accuracy of the last epoch (on eval_data if given, else on training views).
  std::optional<double> online_probe_top1;
  /// The kNN monitor's top-1 (its first k) on eval_data at its last scoring (online_probe.knn).
  std::optional<double> online_knn_top1;
};

/// Trains: a loop over Trainer::step (<twins/train/trainer.h>). Throws std::invalid_argument
/// for config errors, std::runtime_error for data, I/O and non-finite losses (naming the step
/// and the term).
PretrainResult pretrain(const nlohmann::json& config, const PretrainOptions& options);

struct StepBenchmark {
  int64_t batch_size = 0, steps = 0;
  double seconds_per_step = 0, images_per_second = 0;
  /// CUDA: the most memory tensors took over warm-up and timed steps (0 on the CPU).
  double peak_memory_gib = 0;
  std::string device;
  /// The timed steps replayed a CUDA graph (train.cuda_graph).
  bool cuda_graph = false;
  /// With profile_steps > 0: those steps' operators (run after the timed ones, so that the
  /// profiler's own cost stays out of the rates above).
  std::optional<profiler::Profile> profile;
};

/// Times Trainer::step, the step pretrain() runs (forward of all views, loss, backward, the fp16
/// scaler, optimizer, momentum target, online probe), on synthetic uint8 batches already on the
/// device: no loader, so it is the model-only bound that end-to-end images/s is judged against.
/// `device` empty: train.device. `profile_steps` > 0: that many more steps under the profiler
/// (<twins/profiler.h>). A step that replays a CUDA graph (train.cuda_graph) is one operator to
/// the profiler: profile with train.cuda_graph off to see its parts.
StepBenchmark bench_step(const nlohmann::json& config, int64_t steps, int64_t warmup, const std::string& device,
                         int64_t profile_steps = 0);

/// Asks a running pretrain() to finish its step, write a checkpoint and return (interrupted).
/// Async-signal-safe: SIGINT/SIGTERM handlers call it.
void request_stop();
/// Clears a previous request (tests run several trainings in one process).
void clear_stop();

}  // namespace twins::train

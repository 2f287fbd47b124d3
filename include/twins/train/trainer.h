#pragma once
// The one training step of every method, and the state it owns.
//
// A Trainer holds the model of a recipe (backbone, heads, momentum target, online probe), its
// optimizer and learning-rate schedule, the fp16 gradient scaler and, under data parallelism, the
// gradient reducer. step() is the only training step in twins: `twins pretrain` is a loop over
// it (train/pretrain.cpp), `twins bench step` times it, and the tests call it.
//
//   Trainer trainer(recipe, {device, num_classes, steps_per_epoch, total_steps});
//   while (auto batch = loader.next()) { StepResult r = trainer.step(*batch); ... }
//
// Light on purpose: the model lives behind a pointer, so this header needs no LibTorch module.
#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "twins/data/loader.h"
#include "twins/models/safetensors.h"
#include "twins/train/recipe.h"

namespace twins::distributed {
class Communicator;
}
namespace twins::models {
class Network;
}

namespace twins::train {

struct TrainerOptions {
  /// The device the model runs on (see twins::resolve_device).
  c10::Device device{c10::kCPU};
  /// Classes of the training data; > 0 (and online_probe.enabled) adds the online linear probe.
  int64_t num_classes = 0;
  /// Optimizer steps per epoch: schedule.warmup_epochs in steps.
  int64_t steps_per_epoch = 1;
  /// Optimizer steps of the whole run: the cosine schedules end there.
  int64_t total_steps = 1;
  /// The ranks of a data-parallel job; null: this process holds the whole batch.
  std::shared_ptr<distributed::Communicator> communicator;
  /// A backbone file or run folder (model.backbone_init) whose weights replace the backbone's
  /// random initialisation, and the momentum target's; read by rank 0 only (every rank starts
  /// from rank 0's state). `pretrain` sets it when a run starts, not when it resumes.
  std::string backbone_init;
};

/// What one step did, identical on every rank.
struct StepResult {
  /// Steps taken so far, this one included.
  int64_t step = 0;
  /// The loss and its unweighted terms, averaged over micro-batches and ranks.
  double loss = 0;
  std::vector<std::pair<std::string, double>> terms;
  /// The learning rate of the weights' group, and the momentum target's decay (if any).
  double lr = 0;
  std::optional<double> tau;
  /// Images of every rank in this step.
  int64_t images = 0;
  /// Some rank asked to stop (every rank gets the same answer at the same step).
  bool stop = false;
  /// fp16 only: the gradients overflowed, so the update was skipped and the scale halved.
  bool skipped = false;
};

/// The step's loss was NaN or infinite; nothing was updated. The message names the step and
/// the terms.
class NonFiniteLoss : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class Trainer {
 public:
  /// Builds the model (parameters from the current torch seed), its optimizer and scaler on
  /// `options.device`; with a communicator, every rank starts from rank 0's parameters.
  Trainer(const Recipe& recipe, TrainerOptions options);
  ~Trainer();
  Trainer(const Trainer&) = delete;
  Trainer& operator=(const Trainer&) = delete;

  /// One optimizer step over train.grad_accumulation loader batches (each with one uint8
  /// tensor per view, on any device): forward of all views under the recipe's precision, loss,
  /// backward, gradients averaged over ranks, the optimizer, the momentum target, the online
  /// probe. `stop_requested`: this rank wants to stop; the answer (any rank) is in the result.
  /// Throws NonFiniteLoss before updating anything if the loss is not finite.
  StepResult step(const std::vector<data::Batch>& micro_batches, bool stop_requested = false);
  /// The same with one batch (train.grad_accumulation == 1).
  StepResult step(const data::Batch& batch, bool stop_requested = false);

  /// Steps taken (restored by load_state).
  int64_t steps_taken() const;
  /// The precision in effect (train.precision "auto" resolved for the device).
  Precision precision() const;
  const c10::Device& device() const;
  /// Learning rates of the weights' and the 1-D parameters' groups at step 0 of the schedule
  /// (base lr scaled by the global batch).
  std::pair<double, double> base_learning_rates() const;
  /// train.cuda_graph: whether steps replay a CUDA graph (a step whose capture fails throws
  /// std::runtime_error naming train.cuda_graph), and why not when it was asked for and cannot
  /// be used ("" otherwise).
  bool cuda_graph() const;
  const std::string& cuda_graph_note() const;
  /// Input channels of the backbone.
  int in_channels() const;
  /// The online network's backbone (what backbone.safetensors holds).
  models::Network& backbone();

  /// Online probe: whether there is one, its accuracy counts since the last call of
  /// end_probe_epoch() summed over ranks, and its logits for backbone features.
  bool probing() const;
  struct ProbeCounts {
    int64_t correct = 0, seen = 0;
    double top1() const { return seen ? 100.0 * static_cast<double>(correct) / static_cast<double>(seen) : 0.0; }
  };
  /// Sums the counts over ranks (a collective: every rank calls it), returns and resets them.
  ProbeCounts end_probe_epoch();
  /// The same sum, the counts left as they are (a collective too).
  ProbeCounts probe_counts();
  /// Probe logits for features [N, D] (no gradients), on the CPU.
  at::Tensor probe_logits(const at::Tensor& features);

  /// Everything a checkpoint holds: model parameters and buffers (prefixed "backbone.",
  /// "projector.", ...), the optimizer states as bytes, and the scalars (`state_info`).
  models::NamedTensors state() const;
  /// {"step", "probe_correct", "probe_seen", "fp16_scale", "fp16_good"}; the probe counts are
  /// this process's: a data-parallel checkpoint holds probe_counts() instead, the job's.
  nlohmann::json state_info() const;
  /// Restores what state() and state_info() saved; throws std::runtime_error naming a missing
  /// or misshapen entry. The probe counts are the job's: with a communicator, rank 0 takes them
  /// and the other ranks start from zero, so that the next sum over ranks counts them once.
  void load_state(const models::SafeTensorsFile& file, const nlohmann::json& info);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace twins::train

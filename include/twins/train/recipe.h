#pragma once
// A pretraining recipe: the JSON config of `twins pretrain`, read strictly.
//
// {
//   "method": a loss type (optional: an alias of loss.type, which names the method),
//   "data": {dataset, see <twins/data/dataset.h>},   "views": [views] or "views/<preset>.json",
//   "model": {"backbone": {...}, "projector": {...}, "predictor": {...}  (when the loss needs one),
//             "backbone_init": "a backbone file or run folder" (optional)},
//   "loss": {"type": ..., ...},     "byol": {"tau_base": 0.996}  (any loss with a momentum target),
//   "optimizer": {"type": "lars" | "sgd" | "adamw", "base_lr", "bias_base_lr", "weight_decay",
//                 "momentum", "eta", "clip", "exclude_1d", "betas", "eps", "fixed_predictor_lr",
//                 "lars_variant", "lars_eps", "lars_exclude"},
//   "schedule": {"warmup_epochs": 10, "final_lr_ratio": 0.001, "warmup_start_lr": 0},
//   "online_probe": {"enabled": true, "lr": 0.1, "eval_data": {dataset} (optional),
//                    "knn": {"k": 20, "temperature": 0.07, "every_epochs": 1, "bank_size": 0,
//                            "bank_data": {dataset}} (optional: a kNN monitor on eval_data)},
//   "train": {"epochs", "max_steps", "batch_size", "workers", "device", "seed", "log_every",
//             "checkpoint_every_steps", "checkpoint_every_epochs", "keep_checkpoints",
//             "deterministic", "precision", "channels_last", "threads", "sync_batchnorm",
//             "dist_backend", "dist_timeout_s", "dist_heartbeat_timeout_s", "bucket_mb", "grad_accumulation",
//             "grad_cache", "cuda_graph", "tensorboard", "float32_matmul_precision"}
// }
// Keys starting with "_" (e.g. "_comment") are ignored everywhere at the top level.
#include <nlohmann/json.hpp>

#include <string>
#include <vector>

#include "twins/eval/knn_options.h"

namespace twins::train {

/// Mixed precision of the training step. The losses always run in fp32.
enum class Precision {
  automatic,  ///< bf16 autocast on CUDA, fp32 on the CPU
  fp32,
  bf16,  ///< bf16 autocast (CUDA, or CPU: faster on CPUs with AVX512-BF16 or AMX)
  fp16,  ///< fp16 autocast with a dynamic gradient scaler (CUDA)
};
/// "auto", "fp32", "bf16", "fp16"; anything else throws std::invalid_argument naming `path`.
Precision parse_precision(const std::string& name, const std::string& path);
const char* to_string(Precision precision);
/// `automatic` made concrete for a device.
Precision resolve_precision(Precision precision, bool cuda);

/// The registered optimizer types (lars, sgd, adamw), in registration order.
std::vector<std::string> optimizer_names();

struct OptimizerConfig {
  /// A registered optimizer: lars, sgd or adamw (see optimizer_names()).
  std::string type = "lars";
  /// Learning rate for a batch of 256; scaled by global batch / 256.
  double base_lr = 0.3;
  /// Separate base lr for 1-D parameters (Barlow Twins: 0.0048); < 0: same as base_lr.
  double bias_base_lr = -1;
  double weight_decay = 1e-4;
  double momentum = 0.9;
  /// LARS trust coefficient.
  double eta = 0.001;
  /// LARS: clip the adaptive rate at the learning rate (solo-learn).
  bool clip = false;
  /// Exclude 1-D parameters from weight decay (and LARS adaptation).
  bool exclude_1d = true;
  /// AdamW betas and epsilon.
  std::vector<double> betas{0.9, 0.999};
  double eps = 1e-8;
  /// Keep the predictor's learning rate at the scaled base lr, without warm-up or decay
  /// (SimSiam's fix_pred_lr; solo-learn's static_lr).
  bool fixed_predictor_lr = false;
  /// LARS's trust ratio: "official" (facebookresearch's VICReg/Barlow Twins code) or
  /// "solo_learn" (solo-learn's and lightly's form; see <twins/train/lars.h>).
  std::string lars_variant = "official";
  /// Denominator epsilon of the solo_learn form.
  double lars_eps = 1e-8;
  /// Which parameters LARS leaves alone: "1d" (biases and norms: official, solo-learn) or
  /// "zero_weight_decay" (the group without weight decay, lightly: biases and norms get wd 0).
  std::string lars_exclude = "1d";
};

struct ScheduleConfig {
  double warmup_epochs = 10;
  /// The learning rate of the last step, as a fraction of the base (official: 0.001; solo-learn: 0).
  double final_lr_ratio = 0.001;
  /// The learning rate the warm-up starts from, in absolute terms (official: 0; solo-learn: 3e-5).
  double warmup_start_lr = 0.0;
};

/// online_probe.knn: the kNN classifier (DINO's protocol, as `twins knn`) scored on
/// online_probe.eval_data during pretraining, its bank the training data's features under the
/// evaluation transform (solo-learn's and lightly's kNN monitors).
struct KnnMonitorConfig {
  bool enabled = false;  ///< true when the recipe has online_probe.knn (and its "enabled" is not false)
  eval::KnnOptions options{{20}, 0.07};
  /// Scored after every this many epochs, and after the last.
  int64_t every_epochs = 1;
  /// Samples of the bank, drawn at random (with train.seed, the same every epoch) from the bank
  /// data (0: all of it).
  int64_t bank_size = 0;
  /// The bank's labelled dataset; null: the training data ("data").
  nlohmann::json bank_data;
};

struct ProbeConfig {
  bool enabled = true;
  double lr = 0.1;
  double weight_decay = 0.0;
  /// A labelled dataset evaluated at the end of every epoch (e.g. the test split); null: none.
  nlohmann::json eval_data;
  KnnMonitorConfig knn;
};

struct TrainConfig {
  int64_t epochs = 100;
  /// Stop after this many optimizer steps (0: run all epochs). The schedules still span epochs.
  int64_t max_steps = 0;
  /// Per-rank batch size (the global batch is batch_size x world size; lr scales with it).
  int64_t batch_size = 256;
  /// Loader threads per rank; "auto" (kAutoWorkers): every core of the rank's share but one on
  /// CUDA, 2 on the CPU (twins::loader_workers).
  int workers = 2;
  /// auto, cpu, cuda, cuda:N.
  std::string device = "auto";
  uint64_t seed = 0;
  int64_t log_every = 20;
  int64_t checkpoint_every_steps = 0;
  int64_t checkpoint_every_epochs = 1;
  int keep_checkpoints = 2;
  /// Deterministic algorithms (bit-identical resume on the CPU).
  bool deterministic = false;
  /// auto (bf16 autocast on CUDA, fp32 on CPU), fp32, bf16 (CUDA or CPU), fp16 (CUDA, with a
  /// gradient scaler).
  Precision precision = Precision::automatic;
  bool channels_last = false;
  /// PyTorch's torch.set_float32_matmul_precision for the matmuls that run in float32 (fp32
  /// training, the losses): "highest" (IEEE float32, PyTorch's default), "high" (TF32 on CUDA
  /// from Ampere on) or "medium" (bf16 where supported).
  std::string float32_matmul_precision = "highest";
  /// Intra-op threads for the model (0: every core, or OMP_NUM_THREADS when set).
  int threads = 0;
  /// Data parallelism: BatchNorm statistics over every rank's batch (the official recipes').
  bool sync_batchnorm = false;
  /// Collectives: auto (NCCL on CUDA, Gloo on the CPU), nccl or gloo.
  std::string dist_backend = "auto";
  /// A rank that does not answer a collective within this time fails the job.
  double dist_timeout_s = 1800;
  /// A rank that fails, or whose heartbeats stop for this long, stops the other ranks within a
  /// few seconds instead of dist_timeout_s (0: only dist_timeout_s); see
  /// distributed::CommunicatorOptions::heartbeat_timeout_s.
  double dist_heartbeat_timeout_s = 60;
  /// Loader batches per optimizer step (gradients summed locally, averaged over ranks once).
  /// Without grad_cache the losses' batch statistics stay those of one batch_size x world size
  /// batch.
  int64_t grad_accumulation = 1;
  /// With grad_accumulation > 1: the loss over the step's whole batch (GradCache, Gao et al.
  /// 2021): every batch's embeddings first without the autograd graph, the loss and its
  /// gradient over all of them, then each batch again with the graph, backpropagating its share
  /// of that gradient. VICReg's and Barlow Twins' batch statistics are then those of the
  /// batch_size x grad_accumulation x world size batch (BatchNorm's stay per batch); costs one
  /// more forward per batch. Per-sample losses (BYOL, SimSiam) get the same result either way.
  bool grad_cache = false;
  /// Gradient all-reduce bucket size (DDP's bucket_cap_mb).
  double bucket_mb = 25;
  /// CUDA only: capture the step's forward and backward in a CUDA graph after three eager
  /// steps and replay it (one launch per step instead of one per kernel). For one process per
  /// job without gradient accumulation; otherwise, and on the CPU, the step stays eager.
  bool cuda_graph = false;
  /// A TensorBoard events file in the run folder beside metrics.jsonl (the same numbers).
  bool tensorboard = true;
};

struct Recipe {
  /// The method: loss.type ("method" in the JSON is an alias that must agree with it).
  std::string method;
  nlohmann::json data, views, backbone, projector, predictor, loss;
  /// model.backbone_init: a backbone file or run folder (twins' or torchvision's names) whose
  /// weights start the backbone instead of a random initialisation ("": random).
  std::string backbone_init;
  double tau_base = 0.996;
  OptimizerConfig optimizer;
  ScheduleConfig schedule;
  ProbeConfig probe;
  TrainConfig train;
  /// The config as given (after --set), stored in run folders and checkpoints.
  nlohmann::json resolved;

  /// Reads and validates a config; unknown keys and bad values throw std::invalid_argument
  /// naming their path. The loss decides which heads the model needs (a predictor, a momentum
  /// target), so a recipe whose model.predictor does not fit its loss is refused here.
  static Recipe parse(const nlohmann::json& config);
  /// Input channels of the backbone (model.backbone.in_channels, 3 by default).
  int in_channels() const;
};

}  // namespace twins::train

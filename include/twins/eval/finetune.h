#pragma once
// Fine-tuning evaluation (`twins finetune`): the backbone and a new linear classifier trained
// together on labelled images, as the official VICReg and Barlow Twins evaluate.py do with
// `--weights finetune`; with `train_percent` 1 or 10 (or a file list such as SimCLR's ImageNet
// 1%/10% subsets) it is their semi-supervised evaluation.
//
// The protocol (official evaluate.py): random resized crop + horizontal flip of the training
// images, the backbone in training mode (BatchNorm statistics of the batch), a Linear head
// initialised N(0, 0.01) with zero bias, cross-entropy, SGD with momentum over two parameter
// groups (head at lr_head, backbone at lr_backbone), both decayed by a cosine over epochs
// (PyTorch's CosineAnnealingLR stepped once per epoch); scored on the test set's centre crops
// (the evaluation transform of <twins/eval/transform.h>) after the last epoch.
// lr_backbone = 0 freezes the backbone (evaluation mode, no gradients): the official
// `--weights freeze` linear evaluation, with its unstandardised features.
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "twins/eval/probe.h"
#include "twins/models/network.h"

namespace twins::data {
class Dataset;
}
namespace twins::distributed {
class Communicator;
}

namespace twins::eval {

struct EvalConfig;

struct FinetuneOptions {
  int64_t epochs = 20;
  /// The global batch (the official script's --batch-size): split evenly over the ranks of a
  /// data-parallel run, which must divide it.
  int64_t batch_size = 256;
  /// The defaults are VICReg's ImageNet 1% settings (its README).
  double lr_backbone = 0.03;
  double lr_head = 0.08;
  double weight_decay = 0.0;
  double momentum = 0.9;
  /// Percentage of each class's labelled training samples used (at least one per class).
  double train_percent = 100;
  /// A file naming the training samples to use, one per line (an image's file name, as
  /// SimCLR's imagenet_subsets/1percent.txt, or a sample id as `twins embed` writes them);
  /// replaces train_percent.
  std::string subset;
  std::vector<double> crop_scale{0.08, 1.0};
  /// "fp32" (the official script's), "bf16" (autocast for the backbone; the head and the loss
  /// in fp32) or "auto" (bf16 on CUDA, fp32 on the CPU).
  std::string precision = "fp32";
  uint64_t seed = 0;
  /// Also score the test set after every this many epochs (and the last), as the official
  /// evaluate.py does after each epoch to report the best; 0: after the last epoch only. Not part
  /// of the protocol's settings (a checkpoint resumes under another value).
  int64_t eval_every_epochs = 0;
  /// Also checkpoint after every this many batches (counted over the whole run), within epochs;
  /// 0: after each epoch only. A run resumed from such a checkpoint continues at the next batch
  /// with the result an uninterrupted run gives. Not part of the protocol's settings either.
  int64_t checkpoint_every_steps = 0;
};

/// The training samples fine-tuning uses, as sorted indices of `dataset`: with `subset_file`,
/// those whose id, or whose id's file name, is listed (every listed name must match exactly one
/// sample); else round(train_percent% of each class's labelled samples), at least one per class,
/// drawn with `seed`. Unlabelled samples are never chosen. Errors name the file or the value.
std::vector<int64_t> select_train_samples(const data::Dataset& dataset, double train_percent,
                                          const std::string& subset_file, uint64_t seed);

/// How one call of run_finetune runs (not part of the protocol).
struct FinetuneControl {
  /// Where the state is kept after every epoch, every finetune.checkpoint_every_steps batches and
  /// when stopped (weights, classifier, optimizer, the epoch's place and loss so far; written
  /// atomically); empty: nowhere. A file there from the same backbone and settings is resumed
  /// from where it was written, with the result an uninterrupted run gives; one from other settings is
  /// an error naming it. The caller removes it once it has kept the results.
  std::string checkpoint;
  /// Stop after this many epochs of this call, checkpointed (0: run to the end).
  int64_t stop_after_epochs = 0;
  /// A stop request (a signal handler's flag, a scheduler's preemption notice), or null. Read
  /// after every batch (with several ranks on CUDA, where agreeing waits for the GPU: after every
  /// 16th batch of the run and each epoch's last); once it is set on any rank, every rank stops
  /// after the same batch, the state is checkpointed there (mid-epoch too) and run_finetune
  /// returns unfinished (unless that batch was the run's last: then it finishes).
  const std::atomic<bool>* stop = nullptr;
  /// Rank 0 appends a line per epoch to this JSON Lines file as the run goes: {"epoch"
  /// (1-based), "epochs", "loss", "lr_head", "lr_backbone", "epoch_seconds", and "test_top1",
  /// "test_top5" after a scored epoch}. A run that starts afresh replaces the file; a resumed one
  /// keeps the lines of the checkpoint's epochs. Empty: none.
  std::string metrics;
  /// Rank 0 writes the same numbers (step: the epoch; tags "finetune/<key>") to a TensorBoard
  /// events file in this folder, a new file per call (a resumed call's supersedes the epochs
  /// after the checkpoint's). Give the run a folder of its own: TensorBoard shows a folder as
  /// one run, and a resumed file's restart would hide other writers' later steps. Empty: none.
  std::string tensorboard_dir;
  /// A data-parallel run: this process is one rank of `communicator` (null: a single process).
  /// Every rank loads the backbone and trains on its share of each epoch (finetune.batch_size /
  /// world size per rank, PyTorch's DistributedSampler order); gradients are averaged over the
  /// ranks (DDP without SyncBatchNorm, as the official script), BatchNorm statistics are rank 0's
  /// (DDP's broadcast_buffers); rank 0 alone writes the checkpoint, which every rank reads to
  /// resume; each rank scores its share of the test set and the counts are summed (tar shards,
  /// read in their own order: rank 0 all of them, the others waiting as distributed::on_rank0_long).
  std::shared_ptr<distributed::Communicator> communicator;
};

struct FinetuneRun {
  /// False when stopped (FinetuneControl::stop_after_epochs or stop) before the end: then nothing
  /// was scored.
  bool finished = false;
  /// The epoch this call started from (0, or the checkpoint's), and the epochs done in all.
  int64_t start_epoch = 0, epochs_done = 0;
  /// Where in an epoch this call started (a checkpoint written mid-epoch), and where it stopped
  /// (FinetuneControl::stop): the batches of epoch start_epoch + 1 / epochs_done + 1 done before.
  int64_t start_batch = 0, stopped_at_batch = 0;
  Accuracy test;
  /// Loss averaged over each epoch's batches (the epochs of this call and, resumed, the
  /// checkpoint's).
  std::vector<double> epoch_loss;
  /// With eval_every_epochs: the test accuracy after those epochs (1-based), resumed ones too.
  struct EpochScore {
    int64_t epoch = 0;
    Accuracy test;
  };
  std::vector<EpochScore> test_per_epoch;
  int64_t num_classes = 0, feature_dim = 0, train_samples = 0, test_samples = 0;
  /// Ranks of the run (1 without a communicator); whether this process is rank 0, which speaks
  /// for the run (every rank's result holds the same numbers and weights).
  int world_size = 1;
  bool main_rank = true;
  double seconds = 0;
  /// What produced the numbers, for finetune.json and the output.
  std::string protocol;
  /// The fine-tuned backbone (evaluation mode, on the CPU) and the classifier's weight [C, D]
  /// and bias [C] (CPU, float32).
  std::shared_ptr<models::Network> backbone;
  at::Tensor head_weight, head_bias;
};

/// `twins finetune` as a library call. `backbone`: a file, a run folder, or random:<...> (the
/// same protocol from random initialisation: the supervised baseline on the same labels).
/// Applies the process-wide compute settings of a training run (configure_compute: every core,
/// cuDNN's autotuner on CUDA). Every labelled training sample is used each epoch (no sample is
/// dropped), except a last batch of a single image when fine-tuning, which BatchNorm cannot take.
FinetuneRun run_finetune(const std::string& backbone, const EvalConfig& config, const FinetuneControl& control = {});

}  // namespace twins::eval

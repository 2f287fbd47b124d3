#pragma once
// The two standard measures of a frozen representation, on stored features.
//
// Linear probe: a linear classifier trained with SGD (momentum 0.9, cosine schedule) on the
// training features, scored on the test features. Features are standardised with the training
// set's mean and standard deviation first (a BatchNorm without affine parameters, as MAE's probe
// does), which makes one learning rate work across backbones.
//
// kNN (DINO's protocol): L2-normalised features, cosine similarity, the k nearest training
// samples vote for their class with weight exp(sim / T). lightly's variant is k = 200, T = 0.1.
#include <ATen/core/Tensor.h>

#include <map>
#include <memory>
#include <utility>
#include <vector>

#include "twins/eval/features.h"
#include "twins/eval/knn_options.h"

namespace twins::eval {

struct Accuracy {
  double top1 = 0, top5 = 0;  ///< percentages
};

/// Top-1 and top-5 accuracy of logits [N, C] for labels [N] (top-5 is top-C when C < 5).
Accuracy accuracy_of(const at::Tensor& logits, const at::Tensor& labels);

struct LinearProbeOptions {
  int64_t epochs = 100;
  int64_t batch_size = 256;
  double lr = 0.1;
  double weight_decay = 0.0;
  double momentum = 0.9;
  uint64_t seed = 0;
  /// The published protocol (official VICReg, Barlow Twins, BYOL and solo-learn evaluations):
  /// the classifier trains on random resized crops + flips of the training images through the
  /// frozen backbone, a new view of every image each epoch (a backbone forward per epoch).
  /// false: on the centre-crop features extracted once (fast; the default).
  bool augment = false;
  /// Scale range of the random resized crops of the augmented protocol.
  std::vector<double> crop_scale{0.08, 1.0};
  /// The augmented protocol's state is also checkpointed after every this many batches (counted
  /// over the whole run), within epochs; 0: after each epoch only. Not part of the protocol's
  /// settings (a checkpoint resumes under another value).
  int64_t checkpoint_every_steps = 0;
};

struct LinearProbeResult {
  Accuracy train, test;
  int64_t num_classes = 0;
  double seconds = 0;
};

/// Trains on `train`, scores `train` and `test` (samples with label < 0 are ignored).
LinearProbeResult linear_probe(const Features& train, const Features& test, int64_t num_classes,
                               const LinearProbeOptions& options, const at::Device& device);

/// The linear classifier of both protocols: features standardised with fixed statistics (a
/// BatchNorm without affine parameters, as MAE's probe), one Linear layer, SGD with momentum and
/// a cosine schedule over `total_steps`.
class ProbeHead {
 public:
  /// `mean`, `std`: the statistics of the training features (centre crops).
  ProbeHead(const at::Tensor& mean, const at::Tensor& std, int64_t num_classes, const LinearProbeOptions& options,
            int64_t total_steps, const at::Device& device);
  ~ProbeHead();
  /// One SGD step on features [B, D] and labels [B] (rows with label < 0 are left out).
  void step(const at::Tensor& features, const at::Tensor& labels);
  /// Standardises float features on the head's device in place, with the head's statistics.
  void standardise_(at::Tensor& features) const;
  /// step() for rows already standardised and all labelled (labels >= 0 on the head's device):
  /// the same update without the per-step filtering and conversion (the cached-feature probe).
  void step_standardised(const at::Tensor& standardised, const at::Tensor& labels);
  /// Top-1/top-5 on stored features (labelled rows only).
  Accuracy score(const Features& features);
  /// The classifier's weight [C, D] and bias [C] (copies on the CPU), over standardised features.
  std::pair<at::Tensor, at::Tensor> parameters() const;
  /// The classifier, its optimizer's state and its place in the schedule as named tensors (CPU
  /// copies, "probe.*"), for a checkpoint; load_state() takes them back (throws
  /// std::runtime_error naming a missing or misshapen one), and the head then steps on as the
  /// saved one would have.
  std::vector<std::pair<std::string, at::Tensor>> state() const;
  void load_state(const std::vector<std::pair<std::string, at::Tensor>>& state);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// Top-1/top-5 for each k (k larger than the training set is clamped to it).
std::map<int64_t, Accuracy> knn(const Features& train, const Features& test, int64_t num_classes,
                                const KnnOptions& options, const at::Device& device);

}  // namespace twins::eval

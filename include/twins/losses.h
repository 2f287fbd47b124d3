#pragma once
// The non-contrastive objectives, as functions of embeddings, and the registry of losses (methods).
//
// Each returns the weighted total and its *unweighted* terms, in a fixed order, for logging.
// Shapes: embeddings are [N, D] (N samples of the local batch, D features), floating point,
// on any device. All reductions give 0-d tensors that carry gradients.
#include <ATen/core/Tensor.h>
#include <nlohmann/json_fwd.hpp>

#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace twins::distributed {
/// Collectives across ranks (multi-GPU issue). A null communicator means "this process holds
/// the whole batch"; losses that need global-batch statistics take one through their options.
class Communicator;
}  // namespace twins::distributed

namespace twins::losses {

/// A loss value and its named, unweighted terms (e.g. {"invariance", 0.31}).
struct LossOutput {
  at::Tensor total;
  std::vector<std::pair<std::string, at::Tensor>> terms;
  /// The term called `name`; throws std::out_of_range if there is none.
  const at::Tensor& term(const std::string& name) const;
};

/// VICReg (Bardes, Ponce, LeCun 2022), as in facebookresearch/vicreg main_vicreg.py:
///   invariance = mean_{n,d} (z_a - z_b)^2
///   variance   = 1/2 [mean_d relu(1 - sqrt(Var(z_a)_d + eps)) + same for z_b]
///                (unbiased variance over the batch)
///   covariance = sum_{i!=j} C(z_a)_ij^2 / D + sum_{i!=j} C(z_b)_ij^2 / D,
///                C(z) = (z - mean)^T (z - mean) / (N - 1)
///   total = sim_coeff invariance + std_coeff variance + cov_coeff covariance
struct VICRegOptions {
  /// Weight of the invariance (MSE) term.
  double sim_coeff = 25.0;
  /// Weight of the variance (hinge on the standard deviation) term.
  double std_coeff = 25.0;
  /// Weight of the covariance term.
  double cov_coeff = 1.0;
  /// Added to the variance before the square root (official: 1e-4).
  double eps = 1e-4;
  /// true: the variance term averages the two branches (official code, /2 each);
  /// false: sums them, as solo-learn's vicreg_loss_func does (twice the official term).
  bool average_variance_branches = true;
  /// Global-batch statistics for variance and covariance (null: the local batch).
  std::shared_ptr<distributed::Communicator> communicator;
};
LossOutput vicreg_loss(const at::Tensor& z_a, const at::Tensor& z_b, const VICRegOptions& options = {});

/// Barlow Twins (Zbontar et al. 2021), as in facebookresearch/barlowtwins main.py:
///   n(z) = (z - mean) / sqrt(biased Var(z) + eps)   (BatchNorm1d(affine=False), training mode)
///   c = n(z_a)^T n(z_b) / N
///   on_diagonal = sum_i (1 - c_ii)^2, off_diagonal = sum_{i!=j} c_ij^2
///   total = scale (on_diagonal + lambda off_diagonal)
struct BarlowTwinsOptions {
  /// Weight of the off-diagonal (redundancy reduction) term.
  double lambda = 0.0051;
  /// Overall factor on the total (solo-learn's scale_loss; 1 in the official code).
  double scale = 1.0;
  /// BatchNorm epsilon of the normalisation.
  double eps = 1e-5;
  /// Reproduce the official distributed code's plain all_reduce(c), whose gradients are
  /// 1/world_size of the exact ones (multi-GPU only; no effect in one process).
  bool reference_compatible = false;
  /// Over several ranks: false normalises and correlates over the global batch (the official
  /// code); true normalises each rank's batch on its own and averages the ranks' c, with the
  /// gradient reaching only this rank's c, as solo-learn and lightly do ("normalize":
  /// "per_rank" in JSON). No effect in one process.
  bool per_rank = false;
  /// Global-batch normalisation and cross-correlation (null: the local batch).
  std::shared_ptr<distributed::Communicator> communicator;
};
LossOutput barlow_twins_loss(const at::Tensor& z_a, const at::Tensor& z_b, const BarlowTwinsOptions& options = {});

/// BYOL (Grill et al. 2020): l(p, t) = 2 - 2 cos(p, t) per sample, t detached (stop-gradient);
///   total = mean_n l(online_pred_a, target_proj_b) + mean_n l(online_pred_b, target_proj_a)
/// Terms: "view_a" (the first mean) and "view_b" (the second). Under data parallelism each rank
/// takes the mean over its own samples; averaging the ranks' gradients gives the global mean's.
LossOutput byol_loss(const at::Tensor& online_pred_a, const at::Tensor& online_pred_b, const at::Tensor& target_proj_a,
                     const at::Tensor& target_proj_b);

/// What a method's encoder produced for one view: the projector output, and for BYOL the
/// predictor output and the target network's projection.
struct ViewEmbeddings {
  at::Tensor projection;
  at::Tensor prediction;         ///< undefined unless the method has a predictor
  at::Tensor target_projection;  ///< undefined unless the method has a momentum target
};

/// The structure a loss asks of the model: the heads the trainer builds for it.
struct LossNeeds {
  /// A predictor head on the projector (ViewEmbeddings::prediction).
  bool predictor = false;
  /// A momentum (EMA) copy of backbone and projector (ViewEmbeddings::target_projection).
  bool momentum_target = false;
  /// The loss of a sample depends on the other samples of the batch (variances, covariance or
  /// cross-correlation matrices): a larger batch is a different loss, not an average of losses.
  bool batch_statistics = false;
};

/// A loss chosen by name from JSON, and with it the method: a new method is a Loss in its own
/// file (losses/<name>.cpp) plus one line in losses/registry.cpp.
/// Contract: `compute` takes the embeddings of two views of the same samples, in the same
/// order, with the fields needs() asks for, and returns a LossOutput whose terms are always
/// the same names in the same order for a given loss.
class Loss {
 public:
  virtual ~Loss() = default;
  /// The registered name ("vicreg", ...).
  virtual std::string name() const = 0;
  /// The method's name for people ("VICReg", "Barlow Twins", ...).
  virtual std::string title() const { return name(); }
  /// Which heads compute() needs besides the projector.
  virtual LossNeeds needs() const {
    const bool both = needs_predictor_and_target();
    return {both, both};
  }
  /// Whether compute() needs ViewEmbeddings::prediction and ::target_projection (twins 0.1's
  /// form of needs(), kept for losses written against it).
  virtual bool needs_predictor_and_target() const { return false; }
  virtual LossOutput compute(const ViewEmbeddings& a, const ViewEmbeddings& b) const = 0;
  /// The hyper-parameters, as a JSON object that create_loss() accepts.
  virtual nlohmann::json to_json() const = 0;
  /// Data parallelism: batch statistics over every rank of `communicator` (null: this rank's
  /// batch). Losses without batch statistics (BYOL) ignore it.
  virtual void set_communicator(std::shared_ptr<distributed::Communicator> communicator) { (void)communicator; }
};

/// Builds a loss from {"type": "vicreg"|"barlow_twins"|"byol"|..., ...options} (see
/// loss_names()). Unknown types and keys throw std::invalid_argument naming them under `path`.
std::shared_ptr<Loss> create_loss(const nlohmann::json& spec, const std::string& path = "loss");
/// The registered loss names, sorted.
std::vector<std::string> loss_names();

}  // namespace twins::losses

#pragma once
// Collectives across the ranks of a data-parallel job, on c10d (the layer under PyTorch's DDP):
// NCCL for CUDA tensors, Gloo for CPU tensors.
//
// A job is W processes (ranks), usually one per GPU, on one or several nodes. Every rank calls
// the same collectives in the same order with tensors of the same shapes; a rank that dies or
// hangs makes the others' collectives fail within CommunicatorOptions::timeout_s, with an error
// naming this rank, the operation, and from the ranks' heartbeats the ones that stopped or lag;
// with a job failure handler, a rank that failed or went silent stops the others within
// seconds (CommunicatorOptions::heartbeat_timeout_s).
#include <ATen/core/Tensor.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace twins::distributed {

/// Where this process sits in a job, as its launcher described it.
struct Environment {
  int rank = 0;
  int world_size = 1;
  /// Rank within this node (the GPU index to use).
  int local_rank = 0;
  /// Address and port of rank 0's rendezvous store.
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  /// "torchrun" (RANK, WORLD_SIZE, ...; also `twins pretrain --nproc-per-node`), "slurm",
  /// "openmpi", or "none" (a single process).
  std::string launcher = "none";
  /// torchrun's elastic agent serves the store at MASTER_ADDR:MASTER_PORT itself
  /// (TORCHELASTIC_USE_AGENT_STORE=True, its static and c10d rendezvous): every rank, rank 0
  /// too, is a client of it, and the job's keys live under the attempt
  /// (TORCHELASTIC_RESTART_COUNT), so that a job torchrun restarts (--max-restarts) forms afresh.
  bool agent_store = false;
  int restart_count = 0;
};

/// Reads the launcher's variables: torchrun's (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
/// MASTER_PORT, TORCHELASTIC_USE_AGENT_STORE, TORCHELASTIC_RESTART_COUNT), then those of an srun
/// step of several tasks (SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID; master from
/// MASTER_ADDR or the first host of SLURM_JOB_NODELIST, port from MASTER_PORT or one derived from
/// SLURM_JOB_ID; a batch script or salloc shell outside srun is no launcher), then OpenMPI's
/// (OMPI_COMM_WORLD_RANK, _SIZE, _LOCAL_RANK; MASTER_ADDR required when the job spans nodes).
/// Throws std::invalid_argument naming a variable whose value is malformed or inconsistent
/// (RANK >= WORLD_SIZE, ...).
Environment detect_environment();

/// The first host of a SLURM node list: "gpu[03-05,09],cpu1" -> "gpu03".
std::string first_slurm_host(const std::string& nodelist);

/// The collective backends this build has, of "gloo" (CPU tensors) and "nccl" (CUDA tensors), in
/// that order: those the LibTorch it was built against has headers for (a PyTorch wheel may lack
/// Gloo's; a CPU LibTorch has no NCCL).
std::vector<std::string> collective_backends();

struct CommunicatorOptions {
  /// "auto" (NCCL when the device is CUDA, Gloo otherwise), "gloo" or "nccl".
  std::string backend = "auto";
  /// Rendezvous and every collective fail after this long (a dead or hung rank).
  double timeout_s = 1800;
  /// Every rank posts a heartbeat (and its progress, see Communicator::note_progress) to the
  /// rendezvous store this often, from a thread of its own, so that a failed collective can name
  /// the ranks that stopped (no heartbeat) or lag behind (alive, at an earlier step). 0: none.
  double heartbeat_s = 2;
  /// The watch over the heartbeats (0: none; needs heartbeat_s > 0). A rank that fails with an
  /// error posts that it failed: a communicator destroyed while an exception unwinds the thread
  /// that drops its last reference is taken for a failed rank, one destroyed otherwise for a rank
  /// that left without an error (a caller that catches a rank's error and carries on must not
  /// keep the job's communicator: the others would wait for it until timeout_s); rank 0
  /// posts it for a rank whose heartbeats stopped for this long (killed, frozen, its machine
  /// down) and has not left; a rank that cannot reach rank 0's store for this long concludes
  /// the same of rank 0. Every rank that learns it calls on_job_failure once, within a heartbeat,
  /// instead of waiting timeout_s in its next collective (NCCL does not see a peer die). A rank
  /// that leaves without an error (finished, or returned early) is not taken for a silent one.
  /// A rank whose collective fails posts the heartbeats' analysis as the job's stop (unless one
  /// stands) and no longer acts on stops itself: after a failed collective, the job is over.
  double heartbeat_timeout_s = 60;
  /// Called from the heartbeat thread with the reason ("rank 2 of 8: stopping: rank 5 failed
  /// with an error ..."), never once this communicator is being destroyed; empty: the
  /// process-wide handler (set_job_failure_handler); none at all: the watch only posts, and this
  /// rank waits for its collectives' timeout. It must not throw (what it throws is dropped) and
  /// what it refers to must outlive the communicator.
  std::function<void(const std::string& reason)> on_job_failure;
};

/// The process-wide on_job_failure of communicators created afterwards without one of their own.
/// The twins command sets one that prints the reason and ends the process (status 1), as
/// torchrun stops the other ranks of a failed one; a library caller chooses its own.
void set_job_failure_handler(std::function<void(const std::string& reason)> handler);

/// Rank 0's process hosts the job's rendezvous store. When rank 0 fails (its communicator
/// destroyed while an exception unwinds), the store is kept up past the communicator for 2.5
/// heartbeats (5 s) so that the other ranks' watches can read why; call this after reporting the
/// error, before the process ends: it waits for those 5 s (nothing when no store was kept). The
/// twins command calls it after printing its error.
void linger_after_failure();

/// Tells the job that this rank failed before Communicator::create joined it (a missing config
/// file or device on its node), so that the ranks waiting in the rendezvous stop within a second
/// or so ("rank 0 of 8: stopping before the job formed: rank 5 failed before it joined the job")
/// instead of after CommunicatorOptions::timeout_s: a non-zero rank posts it to rank 0's store
/// (waiting up to wait_s for it to answer); rank 0 hosts its store until the other ranks have
/// read it, or wait_s passed. Nothing at world size 1, once this process has joined a job (its
/// heartbeats tell its failures) or already learnt that the job stopped, or after a first call.
/// The twins command calls it when a job command (pretrain, linear-probe, knn, finetune) fails.
void report_failure_before_join(const Environment& env, double wait_s = 15) noexcept;

/// A group of ranks and its collectives. Thread-compatible: one thread issues collectives at a
/// time (asynchronous ones complete on the backend's own threads).
class Communicator {
 public:
  /// Joins the job `env` describes: rendezvous through a TCP store at master_addr:master_port
  /// (rank 0 hosts it, or torchrun's agent: Environment::agent_store), then a process group on
  /// `device`'s backend. Blocks until every
  /// rank has joined; throws std::runtime_error naming the address and the ranks missing when the
  /// timeout passes, or at once when a rank reported that it failed first
  /// (report_failure_before_join). Rank 0 says on stderr every minute which ranks it waits for.
  static std::shared_ptr<Communicator> create(const Environment& env, const at::Device& device,
                                              const CommunicatorOptions& options = {});
  /// `world_size` ranks inside this process, sharing an in-memory store, each with its own Gloo
  /// group: for tests and for simulating a job on one machine. Element r is rank r.
  static std::vector<std::shared_ptr<Communicator>> create_local_group(int world_size,
                                                                       const CommunicatorOptions& options = {});
  ~Communicator();
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  int rank() const;
  int world_size() const;
  /// "gloo" or "nccl".
  std::string backend() const;
  /// Where the collectives' tensors live: the rank's GPU for NCCL, the CPU for Gloo.
  at::Device device() const;
  /// A number unique to this communicator within the process.
  int64_t id() const;
  /// The bound on one collective's wait (CommunicatorOptions::timeout_s).
  double timeout_s() const;

  /// Sum over ranks, in place. Blocks.
  void all_reduce(at::Tensor& tensor);
  /// Whether any rank passed true (every rank gets the same answer). Blocks.
  bool any(bool flag);
  /// The sum of `value` over ranks. Blocks.
  int64_t sum(int64_t value);
  /// Every rank's `values` (as many on every rank), rank after rank: world_size() x values.size()
  /// numbers. Blocks.
  std::vector<int64_t> gather(const std::vector<int64_t>& values);
  /// Starts a sum over ranks in place and returns a function that waits for it (and throws if
  /// it failed). The tensor must stay alive and untouched until then.
  std::function<void()> all_reduce_async(at::Tensor& tensor);
  /// Every rank's `tensor` (same shape on all ranks), concatenated along dim 0 in rank order.
  at::Tensor all_gather(const at::Tensor& tensor);
  /// Rank `root`'s values into `tensor` on every rank, in place.
  void broadcast(at::Tensor& tensor, int root = 0);
  /// Returns when every rank has called it.
  void barrier();

  /// Where this rank is (the training step it works on): posted with its heartbeats, and named
  /// by the others when a collective fails ("rank 3 alive but at step 41, this rank at 42").
  void note_progress(int64_t step);

  /// The communicator whose id() is `id`, if it is still alive (autograd functions hold ids,
  /// not owners). Throws std::runtime_error otherwise.
  static std::shared_ptr<Communicator> find(int64_t id);

  struct Impl;

 private:
  explicit Communicator(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

/// Runs `work` on rank 0 alone (or, without a `communicator`, in this process) and tells every
/// rank whether it failed, so that none goes on to wait in a later collective for a rank 0 that
/// has left: rank 0 rethrows its own error, the others throw std::runtime_error("rank 2: rank 0
/// could not <what> (its error says why)"). A collective: every rank calls it.
void on_rank0(const std::shared_ptr<Communicator>& communicator, const std::function<void()>& work,
              const std::string& what);
/// on_rank0 for work that may outlast the communicator's timeout (rank 0 reading a stream of
/// shards alone, embedding a large kNN bank): `work` gets a keep-alive to call between pieces of
/// its work, and the other ranks wait in collectives of a quarter of the timeout each (rank 0
/// taking part through the keep-alive), not in one as long as the work, which dist_timeout_s
/// would end. Failures are told as by on_rank0. A collective: every rank calls it.
void on_rank0_long(Communicator* communicator, const std::function<void(const std::function<void()>& keep_alive)>& work,
                   const std::string& what);

// ---- differentiable collectives --------------------------------------------------------------
// Under data parallelism the objective is J = (1/W) sum_r loss_r and gradients are averaged over
// ranks; so each backward below returns this rank's share of the gradient of sum_r loss_r, and
// a one-process run over the union batch gets the same parameter gradients.

/// All ranks' x concatenated along dim 0 (forward: all-gather; backward: all-reduce of the
/// gradient, then this rank's slice), the semantics of the official VICReg FullGatherLayer.
at::Tensor all_gather_with_grad(const at::Tensor& x, const std::shared_ptr<Communicator>& communicator);

/// Sum of x over ranks with the exact gradient (backward: all-reduce of the gradient).
at::Tensor all_reduce_with_grad(const at::Tensor& x, const std::shared_ptr<Communicator>& communicator);

/// Sum of x over ranks whose gradient reaches only this rank's x, unchanged: the official
/// Barlow Twins code's plain torch.distributed.all_reduce(c) (1/W of the exact gradient).
at::Tensor all_reduce_local_grad(const at::Tensor& x, const std::shared_ptr<Communicator>& communicator);

/// Batch normalisation in training mode with statistics over every rank's batch, as PyTorch's
/// SyncBatchNorm: x [N, C, ...]; weight, bias [C] (or undefined); running_mean/var [C] updated in
/// place (undefined: not tracked) with `momentum` (unbiased variance, like BatchNorm).
at::Tensor sync_batch_norm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                           at::Tensor running_mean, at::Tensor running_var, double momentum, double eps,
                           const std::shared_ptr<Communicator>& communicator);

}  // namespace twins::distributed

namespace twins {
/// The namespace's name in twins 0.1 (<twins/dist/...>), kept for code written against it.
namespace dist = distributed;
}  // namespace twins

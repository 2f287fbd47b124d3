#pragma once
// While an evaluation trains for epochs (the augmented probe, fine-tuning): a progress line on
// stderr at most every 10 s ("  <what>: epoch e/E, batch b/B, ETA s"), and after each batch,
// whether to stop or checkpoint there. Private to eval/.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <iostream>
#include <string>
#include <utility>

#include "twins/distributed/communicator.h"
#include "twins/io.h"

namespace twins::eval::detail {

/// Seconds from `start` to now.
inline double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

class EpochProgress {
 public:
  /// This call trains epochs first_epoch .. epochs - 1, of `batches` batches each, starting at
  /// batch first_batch of first_epoch (a run resumed mid-epoch).
  EpochProgress(std::string what, int64_t first_epoch, int64_t epochs, int64_t batches, int64_t first_batch = 0)
      : what_(std::move(what)),
        first_(first_epoch),
        epochs_(epochs),
        batches_(std::max<int64_t>(1, batches)),
        skipped_(first_batch) {}

  /// After batch `batch` (1-based) of epoch `epoch` (0-based).
  void batch_done(int64_t epoch, int64_t batch) {
    const auto now = std::chrono::steady_clock::now();
    if (std::chrono::duration<double>(now - last_).count() <= 10) return;
    last_ = now;
    const double elapsed = std::chrono::duration<double>(now - start_).count();
    const double fraction = static_cast<double>((epoch - first_) * batches_ + batch - skipped_) /
                            static_cast<double>(std::max<int64_t>(1, (epochs_ - first_) * batches_ - skipped_));
    std::cerr << "  " << what_ << ": epoch " << epoch + 1 << "/" << epochs_ << ", batch " << batch << "/" << batches_
              << ", ETA " << static_cast<int64_t>(elapsed / std::max(1e-9, fraction) - elapsed) << " s\n";
  }

 private:
  std::string what_;
  int64_t first_, epochs_, batches_, skipped_;
  std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now(), last_ = start_;
};

/// What follows a batch of epochs of `batches` batches: a stop request (`stop`, or null), agreed
/// by `ranks` (null: one process) so that every rank stops after the same batch (a collective,
/// which waits for the GPU: on CUDA after every 16th batch of the run and each epoch's last), and
/// a checkpoint every `checkpoint_every_steps` batches of the run (0: none within epochs).
class AfterBatch {
 public:
  AfterBatch(const std::atomic<bool>* stop, distributed::Communicator* ranks, bool cuda, int64_t batches,
             int64_t checkpoint_every_steps, const char* fault_point)
      : stop_(stop),
        ranks_(ranks),
        poll_(cuda ? 16 : 1),
        batches_(batches),
        every_(checkpoint_every_steps),
        fault_point_(fault_point) {}

  struct Next {
    bool stop = false;        ///< stop after this batch, mid-epoch (checkpoint true too)
    bool checkpoint = false;  ///< checkpoint this place within the epoch
  };
  /// After batch `done` (1-based) of epoch `epoch` (0-based). At an epoch's last batch, nothing
  /// happens mid-epoch: a stop request then shows in stop_after_epoch() (the epoch's end
  /// checkpoints). Reaches io::fault_point(fault_point, the batch number over the run).
  Next operator()(int64_t epoch, int64_t done) {
    const int64_t step = epoch * batches_ + done;
    io::fault_point(fault_point_, std::to_string(step));
    const bool mine = stop_ != nullptr && stop_->load();
    const bool stop = ranks_ == nullptr ? mine : (step % poll_ == 0 || done >= batches_) && ranks_->any(mine);
    if (done >= batches_) {
      stop_after_epoch_ = stop_after_epoch_ || stop;
      return {};
    }
    return {stop, stop || (every_ > 0 && step % every_ == 0)};
  }
  /// A stop was requested in an epoch's last batch: stop once that epoch is done.
  bool stop_after_epoch() const { return stop_after_epoch_; }

 private:
  const std::atomic<bool>* stop_;
  distributed::Communicator* ranks_;
  int64_t poll_, batches_, every_;
  const char* fault_point_;
  bool stop_after_epoch_ = false;
};

}  // namespace twins::eval::detail

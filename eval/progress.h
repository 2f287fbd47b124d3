#pragma once
// A progress line on stderr at most every 10 s while an evaluation trains for epochs (the
// augmented probe, fine-tuning): "  <what>: epoch e/E, batch b/B, ETA s". Private to eval/.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <iostream>
#include <string>
#include <utility>

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

}  // namespace twins::eval::detail

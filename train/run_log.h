#pragma once
// What a training run tells the world: config.json and metrics.jsonl in the run folder (one
// JSON object per line: step lines, epoch lines, a final summary), and the progress line on
// stderr (rewritten in place on a terminal, one line per report otherwise). Only the rank that
// writes the run folder (rank 0) writes or prints; the others count silently.
#include <nlohmann/json.hpp>

#include <chrono>
#include <filesystem>
#include <memory>
#include <string>

#include "twins/io.h"
#include "twins/train/trainer.h"

namespace twins::detail {
class EventFile;
}  // namespace twins::detail

namespace twins::train::detail {

/// Where a step sits in the run, for the progress line.
struct RunPosition {
  int64_t epoch = 0, epochs = 1;
  /// Steps done in this epoch, of steps_per_epoch.
  int64_t epoch_step = 0, steps_per_epoch = 1;
  /// Steps done in the run, of max_steps; start_step: where this invocation started.
  int64_t step = 0, max_steps = 1, start_step = 0;
};

class RunLog {
 public:
  /// `writer`: this process writes the run folder; `progress`: print progress on stderr;
  /// `tensorboard`: also a TensorBoard events file in the run folder, with the numbers of every
  /// step line ("train/<key>") and epoch line ("epoch/<key>") at their step.
  /// `first_step`: the first step this run will log (a resumed run's checkpoint step + 1).
  /// `resumed_epoch`: for a resumed run, the epoch it resumes in (its end not yet logged): the
  /// step lines from first_step on and the epoch lines from that epoch on, which a run that died
  /// after the checkpoint logged, are dropped from metrics.jsonl (with any torn line), so that
  /// every step and epoch appears once; -1: a new run.
  RunLog(std::filesystem::path out_dir, bool writer, bool progress, bool tensorboard = false, int64_t first_step = 1,
         int64_t resumed_epoch = -1);
  ~RunLog();

  /// config.json (replaced atomically).
  void write_config(const nlohmann::json& config) const;
  /// Appends one line to metrics.jsonl, every write checked (a full disk is an error), and its
  /// numbers to the events file when the line has a step.
  void append(const nlohmann::json& line);
  /// Forces metrics.jsonl (and the events file) to the disk (at checkpoints, so both agree after a crash).
  void sync();

  /// Counts a step's images and the seconds spent waiting for its data; `skipped`: bad samples
  /// replaced so far (reported in the step lines when not 0).
  void count(int64_t images, double data_wait_seconds, int64_t skipped = 0);
  /// The step line of `r` (loss, terms, lr, tau, images/s and data-wait fraction since the
  /// last step line, peak memory): appended to metrics.jsonl and shown as the progress line.
  void step(const StepResult& r, const RunPosition& position);
  /// Ends a progress line rewritten in place (before other output).
  void end_progress();
  /// A line for the user (stderr, when printing progress).
  void say(const std::string& text);

  /// Leaves `seconds` just spent on something else than training (the evaluation at an epoch's
  /// end) out of seconds(), the images per second and the ETA.
  void leave_out(double seconds);

  /// Seconds since construction (less those left out), images counted, and the fraction of it
  /// spent waiting for data.
  double seconds() const;
  int64_t images() const { return images_; }
  double data_wait_fraction() const;
  /// The process's peak resident memory in MB.
  static double peak_rss_mb();

 private:
  std::filesystem::path out_dir_;
  bool writer_, progress_, tty_ = false, line_open_ = false;
  std::unique_ptr<io::AppendFile> metrics_;
  std::unique_ptr<::twins::detail::EventFile> events_;
  std::chrono::steady_clock::time_point start_, window_start_;
  int64_t images_ = 0, window_images_ = 0, skipped_ = 0;
  double wait_ = 0, window_wait_ = 0, left_out_ = 0;
};

/// "1h05m" or "4m07s".
std::string format_duration(double seconds);

}  // namespace twins::train::detail

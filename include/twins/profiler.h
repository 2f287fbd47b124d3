#pragma once
// Where a step's time goes, operator by operator: every ATen operator and autograd function
// timed through LibTorch's RecordFunction hooks (what torch.profiler is built on) over a span of
// work, reduced to per-operator totals as torch.profiler's key_averages() table reduces them, and
// written as a Chrome trace for Perfetto or chrome://tracing. Needs no torch header.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace twins::profiler {

/// One operator's (or autograd function's) totals over the recorded span.
struct OpTotals {
  std::string name;
  int64_t calls = 0;
  /// Time inside the operator less the time inside the operators it called (torch.profiler's
  /// "Self CPU"), and including it ("CPU total"), in milliseconds.
  double self_ms = 0, total_ms = 0;
};

struct Profile {
  /// Every operator, by self time, largest first.
  std::vector<OpTotals> ops;
  /// The recorded span's length.
  double wall_ms = 0;
  /// Calls recorded.
  int64_t calls = 0;
  /// Recorded with `cuda`: each call's time includes its kernels.
  bool cuda = false;
  /// A Chrome trace (JSON): one complete event per call, by thread (numbered from 1 in order of
  /// their first call), times in microseconds from the span's start.
  std::string chrome_trace;
};

/// Records every operator the calling thread runs, and the threads it hands work to (the autograd
/// engine's among them), from construction to stop(). One recorder per process at a time (a
/// second throws std::logic_error).
class Recorder {
 public:
  /// `cuda`: the GPU is synchronized at every call's end, so that a call's time is its kernels'
  /// (as under CUDA_LAUNCH_BLOCKING=1: the GPU never runs ahead, so the span is longer than the
  /// same work unprofiled, but each operator is charged with its own GPU time).
  explicit Recorder(bool cuda);
  ~Recorder();
  Recorder(const Recorder&) = delete;
  Recorder& operator=(const Recorder&) = delete;
  /// Ends the span (once) and reduces its calls.
  Profile stop();

 private:
  bool active_ = false, cuda_ = false;
};

/// The `rows` operators with the most self time as a text table, torch.profiler's columns: name,
/// self time and its share of all self time, total time, calls; then the totals.
std::string format_table(const Profile& profile, size_t rows);

}  // namespace twins::profiler

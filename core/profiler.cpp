// Operators as RecordFunction sees them (the hooks torch.profiler itself is built on), each call
// timed from its start to its end into a buffer reserved up front, then nested by interval on its
// thread: an operator's self time is its time less its direct children's, as torch.profiler
// computes it. Not LibTorch's own (legacy) profiler: that one allocates its event blocks while the
// steps run, and with the twins command's allocator settings (no mmap, no trim) each small block
// splits a freed activation's hole, so the next activation of that size takes fresh pages: the
// ViT-S/16 step ran 2-3x slower under it, its time in zeroing and page faults.
#include "twins/profiler.h"

#include <ATen/record_function.h>
#include <torch/cuda.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <sstream>
#include <stdexcept>
#include <unordered_map>

namespace twins::profiler {

namespace {

using Clock = std::chrono::steady_clock;

struct Call {
  uint32_t name = 0, thread = 0;
  int64_t start_ns = 0, end_ns = 0;
};

// What a recording collects: one recording at a time per process, in storage that outlives it
// (a call still ending on another thread when the recording stops finds it there).
struct Recording {
  std::mutex mutex;
  std::vector<Call> calls;
  std::unordered_map<std::string, uint32_t> ids;
  std::vector<std::string> names;
  Clock::time_point origin;
  bool cuda = false;
  at::CallbackHandle handle = 0;
};

Recording& storage() {
  static Recording* r = new Recording;  // never destroyed: callbacks may run during exit
  return *r;
}
std::atomic<Recording*> g_recording{nullptr};
std::atomic<bool> g_busy{false};
std::atomic<uint32_t> g_threads{0};

// Threads in order of their first recorded call, from 1 (the trace's tids).
uint32_t this_thread() {
  thread_local const uint32_t id = ++g_threads;
  return id;
}

struct Started : at::ObserverContext {
  int64_t start_ns = 0;
};

int64_t since(Clock::time_point origin) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - origin).count();
}

std::unique_ptr<at::ObserverContext> on_start(const at::RecordFunction&) {
  Recording* r = g_recording.load();
  if (!r) return nullptr;
  auto started = std::make_unique<Started>();
  started->start_ns = since(r->origin);
  return started;
}

void on_end(const at::RecordFunction& fn, at::ObserverContext* context) {
  Recording* r = g_recording.load();
  if (!r || !context) return;
  if (r->cuda) torch::cuda::synchronize();  // the operator's kernels inside its span
  Call c;
  c.start_ns = static_cast<Started*>(context)->start_ns;
  c.end_ns = since(r->origin);
  c.thread = this_thread();
  std::lock_guard<std::mutex> lock(r->mutex);
  if (g_recording.load() != r) return;  // stopped meanwhile
  const char* name = fn.name();
  auto [it, added] = r->ids.try_emplace(name ? name : "?", static_cast<uint32_t>(r->names.size()));
  if (added) r->names.push_back(it->first);
  c.name = it->second;
  r->calls.push_back(c);
}

}  // namespace

Recorder::Recorder(bool cuda) : cuda_(cuda) {
  if (g_busy.exchange(true)) throw std::logic_error("profiler: a recording is already running in this process");
  Recording& r = storage();
  {
    std::lock_guard<std::mutex> lock(r.mutex);
    r.calls.clear();
    r.calls.reserve(size_t{1} << 21);  // 2M calls (48 MB) before the buffer has to grow
    r.ids.clear();
    r.names.clear();
    r.cuda = cuda;
  }
  if (cuda) torch::cuda::synchronize();
  r.origin = Clock::now();
  g_recording.store(&r);
  r.handle = at::addThreadLocalCallback(at::RecordFunctionCallback(on_start, on_end));
  active_ = true;
}

Recorder::~Recorder() {
  if (!active_) return;
  at::removeCallback(storage().handle);
  g_recording.store(nullptr);
  g_busy.store(false);
}

Profile Recorder::stop() {
  if (!active_) throw std::logic_error("profiler: stop() called twice");
  active_ = false;
  Recording& r = storage();
  at::removeCallback(r.handle);
  g_recording.store(nullptr);
  const double span_ns = static_cast<double>(since(r.origin));
  std::vector<Call> calls;
  std::vector<std::string> names;
  {
    std::lock_guard<std::mutex> lock(r.mutex);
    calls.swap(r.calls);
    names.swap(r.names);
    r.ids.clear();
  }
  g_busy.store(false);

  // Nesting on each thread: sorted by start (the longer first on a tie), a call is the child of
  // the innermost open call that has not ended before it starts.
  std::vector<size_t> order(calls.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    const Call &x = calls[a], &y = calls[b];
    if (x.thread != y.thread) return x.thread < y.thread;
    if (x.start_ns != y.start_ns) return x.start_ns < y.start_ns;
    return x.end_ns > y.end_ns;
  });
  std::vector<int64_t> children_ns(calls.size(), 0);
  std::vector<size_t> stack;
  uint32_t thread = 0;
  for (size_t i : order) {
    const Call& c = calls[i];
    if (c.thread != thread) stack.clear(), thread = c.thread;
    while (!stack.empty() && calls[stack.back()].end_ns <= c.start_ns) stack.pop_back();
    if (!stack.empty()) children_ns[stack.back()] += c.end_ns - c.start_ns;
    stack.push_back(i);
  }

  Profile p;
  p.cuda = cuda_;
  p.wall_ms = span_ns / 1e6;
  p.calls = static_cast<int64_t>(calls.size());
  std::vector<OpTotals> totals(names.size());
  nlohmann::json trace = nlohmann::json::array();
  for (size_t i = 0; i < calls.size(); ++i) {
    const Call& c = calls[i];
    OpTotals& t = totals[c.name];
    const double ms = static_cast<double>(c.end_ns - c.start_ns) / 1e6;
    t.calls += 1;
    t.total_ms += ms;
    t.self_ms += std::max(0.0, ms - static_cast<double>(children_ns[i]) / 1e6);
    trace.push_back({{"name", names[c.name]},
                     {"ph", "X"},
                     {"ts", static_cast<double>(c.start_ns) / 1e3},
                     {"dur", static_cast<double>(c.end_ns - c.start_ns) / 1e3},
                     {"pid", cuda_ ? "CPU and CUDA" : "CPU"},
                     {"tid", c.thread}});
  }
  for (size_t i = 0; i < totals.size(); ++i) {
    totals[i].name = names[i];
    if (totals[i].calls > 0) p.ops.push_back(std::move(totals[i]));
  }
  std::sort(p.ops.begin(), p.ops.end(), [](const OpTotals& a, const OpTotals& b) {
    return a.self_ms != b.self_ms ? a.self_ms > b.self_ms : a.name < b.name;
  });
  p.chrome_trace = nlohmann::json{{"traceEvents", std::move(trace)}, {"displayTimeUnit", "ms"}}.dump();
  return p;
}

std::string format_table(const Profile& profile, size_t rows) {
  double self_total = 0;
  for (const auto& op : profile.ops) self_total += op.self_ms;
  const size_t n = std::min(rows, profile.ops.size());
  size_t width = 4;
  for (size_t i = 0; i < n; ++i) width = std::max(width, std::min<size_t>(profile.ops[i].name.size(), 60));
  auto shown = [&](const std::string& s) { return s.size() <= width ? s : s.substr(0, width - 3) + "..."; };
  const char* unit = profile.cuda ? "ms (with its kernels)" : "ms";
  std::ostringstream out;
  char line[512];
  std::snprintf(line, sizeof line, "%-*s %12s %7s %12s %9s   times in %s\n", static_cast<int>(width), "name", "self",
                "self %", "total", "calls", unit);
  out << line;
  for (size_t i = 0; i < n; ++i) {
    const OpTotals& op = profile.ops[i];
    std::snprintf(line, sizeof line, "%-*s %12.1f %6.1f%% %12.1f %9lld\n", static_cast<int>(width),
                  shown(op.name).c_str(), op.self_ms, self_total > 0 ? 100.0 * op.self_ms / self_total : 0.0,
                  op.total_ms, static_cast<long long>(op.calls));
    out << line;
  }
  std::snprintf(line, sizeof line, "self time of all %lld calls (%zu operators, every thread) %.1f ms, span %.1f ms\n",
                static_cast<long long>(profile.calls), profile.ops.size(), self_total, profile.wall_ms);
  out << line;
  return out.str();
}

}  // namespace twins::profiler

// Launcher environments, rendezvous and the c10d process groups behind distributed::Communicator.
#include "twins/distributed/communicator.h"

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/HashStore.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
// The process group's class (compat::ProcessGroupBackend: 2.x's Backend, which this header
// includes, or 1.13's ProcessGroup), whatever backends this build has: a LibTorch without Gloo's
// headers (a PyTorch wheel) gets it from nowhere else.
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#if TWINS_WITH_GLOO
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif
#if TWINS_WITH_NCCL
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <functional>
#include <future>
#include <iostream>
#include <map>
#include <mutex>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <thread>

#include "core/compat.h"
#include "distributed/heartbeat_watch.h"

namespace twins::distributed {
namespace {

std::mutex g_handler_mutex;
std::function<void(const std::string&)> g_job_failure_handler;

const char* env(const char* name) {
  const char* v = std::getenv(name);
  return v && *v ? v : nullptr;
}

int env_int(const char* name, int fallback, bool required = false) {
  const char* v = env(name);
  if (!v) {
    if (required) throw std::invalid_argument(std::string(name) + ": not set");
    return fallback;
  }
  try {
    size_t used = 0;
    const long value = std::stol(v, &used);
    if (used != std::string(v).size() || value < 0 || value > (1 << 30)) throw std::out_of_range(v);
    return static_cast<int>(value);
  } catch (const std::exception&) {
    throw std::invalid_argument(std::string(name) + "=\"" + v + "\": not a non-negative integer");
  }
}

std::chrono::milliseconds to_ms(double seconds) {
  return std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000.0));
}

// (Gloo's device; unused in a build without Gloo)
[[maybe_unused]] bool is_loopback(const std::string& host) {
  return host == "localhost" || host.rfind("127.", 0) == 0 || host == "::1";
}

std::mutex g_registry_mutex;
std::map<int64_t, std::weak_ptr<Communicator>> g_registry;
std::atomic<int64_t> g_next_id{1};

}  // namespace

std::string first_slurm_host(const std::string& nodelist) {
  const size_t comma = nodelist.find(',');
  const size_t bracket = nodelist.find('[');
  if (bracket == std::string::npos || (comma != std::string::npos && comma < bracket)) return nodelist.substr(0, comma);
  // prefix[03-05,09] -> prefix03
  const std::string prefix = nodelist.substr(0, bracket);
  size_t end = nodelist.find_first_of("-,]", bracket + 1);
  if (end == std::string::npos) throw std::invalid_argument("SLURM_JOB_NODELIST=\"" + nodelist + "\": unbalanced '['");
  return prefix + nodelist.substr(bracket + 1, end - bracket - 1);
}

Environment detect_environment() {
  Environment e;
  if (env("RANK") || env("WORLD_SIZE")) {
    e.launcher = "torchrun";
    e.rank = env_int("RANK", 0, true);
    e.world_size = env_int("WORLD_SIZE", 1, true);
    e.local_rank = env_int("LOCAL_RANK", e.rank);
    const char* agent = env("TORCHELASTIC_USE_AGENT_STORE");  // Python's str(True)
    e.agent_store =
        agent && (std::string(agent) == "True" || std::string(agent) == "true" || std::string(agent) == "1");
    e.restart_count = env_int("TORCHELASTIC_RESTART_COUNT", 0);
  } else if (env("SLURM_PROCID") && env("SLURM_STEP_NUM_TASKS") && env_int("SLURM_STEP_NUM_TASKS", 1, true) > 1) {
    // The tasks of an srun step. A batch script (sbatch) or salloc's shell has SLURM_PROCID 0 and
    // the allocation's SLURM_NTASKS too, but no step: there twins is one process (which may start
    // its own ranks with --nproc-per-node), not rank 0 of tasks that will never come.
    e.launcher = "slurm";
    e.rank = env_int("SLURM_PROCID", 0, true);
    e.world_size = env_int("SLURM_STEP_NUM_TASKS", 1, true);
    e.local_rank = env_int("SLURM_LOCALID", 0);
    // Rank 0 runs on the step's first node (srun -w, --relative, steps side by side in one job), and
    // steps running at once in one job each need their own port.
    const char* nodes = env("SLURM_STEP_NODELIST") ? env("SLURM_STEP_NODELIST") : env("SLURM_JOB_NODELIST");
    if (!env("MASTER_ADDR") && nodes) e.master_addr = first_slurm_host(nodes);
    if (!env("MASTER_PORT"))
      e.master_port = static_cast<int>(
          10000 +
          (static_cast<int64_t>(env_int("SLURM_JOB_ID", 0)) + 1009 * int64_t{env_int("SLURM_STEP_ID", 0)}) % 20000);
  } else if (env("OMPI_COMM_WORLD_RANK") && env("OMPI_COMM_WORLD_SIZE")) {
    e.launcher = "openmpi";
    e.rank = env_int("OMPI_COMM_WORLD_RANK", 0, true);
    e.world_size = env_int("OMPI_COMM_WORLD_SIZE", 1, true);
    e.local_rank = env_int("OMPI_COMM_WORLD_LOCAL_RANK", 0);
    const int local_size = env_int("OMPI_COMM_WORLD_LOCAL_SIZE", e.world_size);
    if (!env("MASTER_ADDR") && local_size < e.world_size)
      throw std::invalid_argument("MASTER_ADDR: not set, and this OpenMPI job spans " +
                                  std::to_string((e.world_size + local_size - 1) / local_size) +
                                  " nodes; export MASTER_ADDR=<host of rank 0> (mpirun -x MASTER_ADDR)");
  } else {
    return e;
  }
  if (const char* a = env("MASTER_ADDR")) e.master_addr = a;
  e.master_port = env_int("MASTER_PORT", e.master_port);
  if (e.world_size < 1) throw std::invalid_argument("world size must be >= 1 (from " + e.launcher + "'s variables)");
  if (e.rank >= e.world_size)
    throw std::invalid_argument("rank " + std::to_string(e.rank) + " is not below the world size " +
                                std::to_string(e.world_size) + " (from " + e.launcher + "'s variables)");
  if (e.master_port < 1 || e.master_port > 65535)
    throw std::invalid_argument("MASTER_PORT=" + std::to_string(e.master_port) + ": not a port (1-65535)");
  return e;
}

namespace detail {

std::string format_beat(int64_t count, int64_t progress, BeatState state) {
  return std::to_string(count) + " " + std::to_string(progress) +
         (state == BeatState::left        ? " left"
          : state == BeatState::unwatched ? " unwatched"
                                          : "");
}

Beat parse_beat(const std::string& text) {
  std::istringstream in(text);
  Beat b;
  b.seen = static_cast<bool>(in >> b.count >> b.progress);
  std::string word;
  if (b.seen && in >> word) b.left = word == "left", b.unwatched = word == "unwatched";
  return b;
}

SilenceWatch::SilenceWatch(int world_size, int self, double timeout_s, double now_s, double max_gap_s)
    : self_(self),
      timeout_s_(timeout_s),
      max_gap_s_(max_gap_s),
      last_reading_(now_s),
      seen_(static_cast<size_t>(world_size)) {
  for (auto& s : seen_) s.since = now_s;
}

void SilenceWatch::observe(const std::vector<Beat>& beats, double now_s) {
  if (now_s - last_reading_ > max_gap_s_)  // this watcher was not watching: no silence is known
    for (auto& s : seen_) s.since = now_s;
  last_reading_ = now_s;
  for (size_t r = 0; r < seen_.size() && r < beats.size(); ++r) {
    Seen& s = seen_[r];
    const Beat& b = beats[r];
    if (!b.seen) continue;  // never posted yet: silent since the watch began
    if (!s.beat.seen || b.count != s.beat.count) s.since = now_s;
    s.beat = b;
  }
}

std::optional<std::string> SilenceWatch::verdict(double now_s) const {
  for (size_t r = 0; r < seen_.size(); ++r) {
    const Seen& s = seen_[r];
    if (static_cast<int>(r) == self_ || s.beat.left || s.beat.unwatched || now_s - s.since < timeout_s_) continue;
    return "rank " + std::to_string(r) + " sent no heartbeat for " +
           std::to_string(static_cast<int64_t>(now_s - s.since)) + " s " +
           (s.beat.seen ? "(last at step " + std::to_string(s.beat.progress) + ")" : "(it never sent one)");
  }
  return std::nullopt;
}

}  // namespace detail

void set_job_failure_handler(std::function<void(const std::string& reason)> handler) {
  std::lock_guard<std::mutex> lock(g_handler_mutex);
  g_job_failure_handler = std::move(handler);
}

namespace {

std::string beat_key(int rank) { return "twins_heartbeat/" + std::to_string(rank); }
// Set by the first rank that fails with an error, by a rank whose collective failed (the heartbeat
// analysis, diagnose), by rank 0 when a rank went silent, by a rank that failed before it joined
// (report_failure_before_join), or by rank 0 giving up on ranks that never joined (join_all): why
// the job cannot go on. The first stop posted stays (post_stop): the ranks that fail after it,
// often because of it, must not hide the cause.
const char* const kStopKey = "twins_job_stopped";

// Posts `why` as the job's stop unless one is there already; returns the stop that stands.
std::string post_stop(c10d::Store& store, const std::string& why) {
  const std::vector<uint8_t> stands = store.compareSet(kStopKey, {}, std::vector<uint8_t>(why.begin(), why.end()));
  return std::string(stands.begin(), stands.end());
}

using StoreFactory = std::function<c10::intrusive_ptr<c10d::Store>()>;
using detail::Beat;

double seconds_now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

std::vector<Beat> read_beats(c10d::Store& store, int world_size) {
  std::vector<std::string> keys;
  for (int r = 0; r < world_size; ++r) keys.push_back(beat_key(r));
  const bool all = store.check(keys);  // one request when every rank has posted
  std::vector<Beat> out(static_cast<size_t>(world_size));
  for (int r = 0; r < world_size; ++r) {
    if (!all && !store.check({keys[static_cast<size_t>(r)]})) continue;
    const std::vector<uint8_t> bytes = store.get(keys[static_cast<size_t>(r)]);
    out[static_cast<size_t>(r)] = detail::parse_beat(std::string(bytes.begin(), bytes.end()));
  }
  return out;
}

// What a rank's heartbeat thread watches besides posting its beats (CommunicatorOptions).
struct WatchSettings {
  int world_size = 1;
  double timeout_s = 0;                          // 0: no watch
  std::function<void(const std::string&)> stop;  // empty: the watch posts, never acts
  // The store outlives rank 0 (torchrun's agent serves it): the other ranks watch rank 0's beats,
  // since the store answering no longer says that rank 0 is alive.
  bool store_outlives_rank0 = false;
};

// A thread that posts "<count> <progress>" under beat_key(rank) every interval through a store
// client of its own (the process group's may be busy in a long wait), and watches the job: a
// stop posted by another rank, on rank 0 the other ranks' silence, elsewhere rank 0's store
// stopping to answer, call WatchSettings::stop once (never once this rank is leaving). Its state
// is shared with the thread, which the destructor leaves behind if it does not end in time
// (blocked on a store that stopped answering): a failing job must not wait for it.
class Heartbeat {
 public:
  Heartbeat(c10::intrusive_ptr<c10d::Store> store, StoreFactory reader, int rank, double interval_s,
            WatchSettings watch)
      : state_(std::make_shared<State>()), reader_(std::move(reader)) {
    state_->store = std::move(store), state_->reconnect = reader_, state_->rank = rank;
    state_->interval = to_ms(interval_s), state_->watch = std::move(watch);
    thread_ = std::thread([state = state_] { state->run(); });
  }
  // Leaving during an exception's unwinding (the rank failed): the others are told to stop;
  // else the last beat says this rank left, which the watch does not take for silence.
  ~Heartbeat() {
    {
      std::lock_guard<std::mutex> lock(state_->mutex);
      state_->stop = true;
      state_->failed = std::uncaught_exceptions() > 0;
    }
    state_->wake.notify_all();
    std::unique_lock<std::mutex> lock(state_->mutex);
    const auto limit = std::chrono::seconds(2) + state_->interval;  // its last word, then it is left behind
    const bool ended = state_->wake.wait_for(lock, limit, [this] { return state_->ended; });
    lock.unlock();
    if (ended)
      thread_.join();
    else
      thread_.detach();
  }
  void note(int64_t progress) { state_->progress.store(progress); }
  int64_t progress() const { return state_->progress.load(); }
  /// This rank is about to fail (a collective failed, and it posts why itself): its watch no
  /// longer acts on a stop, which may be its own.
  void failing() {
    std::lock_guard<std::mutex> lock(state_->mutex);
    state_->failing = true;
  }
  std::chrono::milliseconds interval() const { return state_->interval; }
  /// A store client for reading the beats (a new one for a TCP store).
  const StoreFactory& reader() const { return reader_; }

 private:
  struct State {
    c10::intrusive_ptr<c10d::Store> store;
    StoreFactory reconnect;  // a new client when the store's connection broke
    int rank = 0;
    std::chrono::milliseconds interval{2000};
    WatchSettings watch;
    std::atomic<int64_t> progress{0};
    std::mutex mutex;
    std::condition_variable wake;
    bool stop = false, failed = false, ended = false, stopped_job = false, failing = false;

    void set(const std::string& key, const std::string& value) {
      store->set(key, std::vector<uint8_t>(value.begin(), value.end()));
    }
    // Rank 0's store lives in its process: before rank 0 acts (ends), the others get about two
    // beats to read why from it.
    void serve_a_while() {
      if (rank != 0 || watch.world_size < 2) return;
      std::unique_lock<std::mutex> lock(mutex);
      wake.wait_for(lock, interval * 5 / 2, [this] { return stop; });
    }
    void stop_job(const std::string& why) {
      if (stopped_job || !watch.stop) return;
      {
        std::lock_guard<std::mutex> lock(mutex);
        if (stop || failing) return;  // this rank is leaving, with its own error if any
      }
      stopped_job = true;
      serve_a_while();
      {
        // Meanwhile this rank may have begun to leave: with an error of its own (every rank
        // refusing the same bad setting at once), which says more than another rank's failure
        // and is printed by the rank itself.
        std::lock_guard<std::mutex> lock(mutex);
        if (stop || failing) return;
      }
      try {
        watch.stop("rank " + std::to_string(rank) + " of " + std::to_string(watch.world_size) + ": stopping: " + why);
      } catch (...) {  // a handler's own failure must not end the process here
      }
    }
    void run() {
      const double began = seconds_now();
      const double interval_s = std::chrono::duration<double>(interval).count();
      std::optional<detail::SilenceWatch> silence;
      // Rank 0 watches every rank; the others, where the store outlives rank 0, rank 0 alone.
      const int watched = rank == 0 ? watch.world_size : 1;
      if (watch.timeout_s > 0 && (rank == 0 || watch.store_outlives_rank0))
        silence.emplace(watched, rank == 0 ? 0 : -1, watch.timeout_s, began,
                        std::max(3 * interval_s, watch.timeout_s / 4));
      double answered = began;  // when the store last answered
      std::unique_lock<std::mutex> lock(mutex);
      int64_t count = 1;
      for (; !stop; ++count) {
        lock.unlock();
        try {
          set(beat_key(rank), detail::format_beat(count, progress.load()));
          answered = seconds_now();
          if (watch.timeout_s > 0) {
            if (store->check({kStopKey})) {
              const std::vector<uint8_t> why = store->get(kStopKey);
              stop_job(std::string(why.begin(), why.end()));
            } else if (silence) {
              const double now = seconds_now();
              silence->observe(read_beats(*store, watched), now);
              if (auto verdict = silence->verdict(now)) {
                stop_job(post_stop(
                    *store, *verdict + ": stopped, killed, or its machine unreachable (dist_heartbeat_timeout_s)"));
              }
            }
          }
        } catch (const std::exception&) {  // a store that fails shows in the collectives, and below
          try {
            if (reconnect) store = reconnect();
          } catch (const std::exception&) {
          }
        }
        if (watch.timeout_s > 0 && rank != 0 && seconds_now() - answered >= watch.timeout_s)
          stop_job("rank 0's rendezvous store has not answered for " +
                   std::to_string(static_cast<int64_t>(seconds_now() - answered)) +
                   " s: rank 0 or its machine stopped, or the network to it failed");
        lock.lock();
        wake.wait_for(lock, interval, [this] { return stop; });
      }
      const bool left_failed = failed;
      lock.unlock();
      try {  // the last word: failed, or left
        if (left_failed) {
          // (Rank 0's store, in its process, is kept up by linger_after_failure.)
          post_stop(*store, "rank " + std::to_string(rank) + " failed with an error (its own output says which)");
        } else {
          set(beat_key(rank), detail::format_beat(count, progress.load(), detail::BeatState::left));
        }
      } catch (const std::exception&) {
      }
      lock.lock();
      ended = true;
      wake.notify_all();
    }
  };
  std::shared_ptr<State> state_;
  StoreFactory reader_;
  std::thread thread_;
};

// `names` joined, the first 8 of them.
std::string first_names(const std::vector<std::string>& names) {
  std::string out;
  for (size_t i = 0; i < names.size() && i < 8; ++i) out += (i ? ", " : "") + names[i];
  if (names.size() > 8) out += " and " + std::to_string(names.size() - 8) + " more";
  return out;
}

// ---- joining the job ---------------------------------------------------------------------------
// Every rank marks itself under joined_key and counts itself in kJoinedCount once it reached rank
// 0's store; the process group forms only when all have, so that a rank that fails before it
// joins can tell the waiting ones (kStopKey) instead of leaving them in c10d's rendezvous until
// dist_timeout_s. kStopRead counts the other ranks that read (or posted) such a stop: rank 0, whose
// process hosts the store, serves it until they all have.
std::string joined_key(int rank) { return "twins_joined/" + std::to_string(rank); }
const char* const kJoinedCount = "twins_joined_count";
const char* const kStopRead = "twins_stop_read";
// This process joined a job (its failures are told by the heartbeats), or learnt that the job
// stopped before it formed (nothing left to tell).
std::atomic<bool> g_joined{false}, g_told{false};
// Until when rank 0's store is kept up after a failure (linger_after_failure waits for it).
std::mutex g_linger_mutex;
double g_linger_until = 0;
// How long a rank that failed before it joined spends telling the others.
constexpr double kTellSeconds = 15;

std::string store_text(c10d::Store& store, const std::string& key) {
  const std::vector<uint8_t> bytes = store.get(key);
  return std::string(bytes.begin(), bytes.end());
}

// The ranks not yet marked as joined: "rank 3", "ranks 3, 5 and 6 more".
std::string ranks_not_joined(c10d::Store& store, int world_size) {
  std::vector<std::string> missing;
  for (int r = 0; r < world_size; ++r)
    if (!store.check({joined_key(r)})) missing.push_back(std::to_string(r));
  if (missing.empty()) return "no rank";
  return (missing.size() == 1 ? "rank " : "ranks ") + first_names(missing);
}

// Rank 0 keeps its store up until `readers` other ranks have read the stop (or posted it), or
// `limit_s` passed.
void serve_stop(c10d::Store& store, const std::function<int64_t()>& readers, double limit_s) {
  const double until = seconds_now() + limit_s;
  while (seconds_now() < until && store.add(kStopRead, 0) < readers())
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
}

// The job cannot form: a rank failed before it joined, or some never came.
struct JoinRefused : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Marks this rank as joined and waits until every rank has, or one posted that it failed first,
// or timeout_s passed. Rank 0 says every minute whom it waits for (a node not started, a wrong
// MASTER_ADDR); that is what a user of a stuck multi-node job needs to see.
void join_all(c10d::Store& store, int rank, int world_size, double timeout_s, const std::string& address,
              bool agent_store) {
  const std::string me = "rank " + std::to_string(rank) + " of " + std::to_string(world_size);
  // This store must be this job's: a second process of this rank, or another job on this port
  // (torchrun's default 29500 is common), would otherwise be taken for the ranks of this one.
  const bool taken = store.check({joined_key(rank)});
  store.set(joined_key(rank), std::vector<uint8_t>{'1'});
  const int64_t count = store.add(kJoinedCount, 1);
  if (taken || count > world_size) {
    g_told = true;  // the job there is not this rank's to stop
    throw JoinRefused(me + ": the rendezvous at " + address + " already has " +
                      (taken ? "a rank " + std::to_string(rank) : std::to_string(count - 1) + " ranks") +
                      ": this rank was started twice, or another job uses that port (set MASTER_PORT)" +
                      (agent_store ? ", or torchrun's agents on several nodes restarted as different attempts "
                                     "(TORCHELASTIC_RESTART_COUNT)"
                                   : ""));
  }
  const double began = seconds_now();
  double next_word = began + 30;
  auto pause = std::chrono::milliseconds(10);
  for (;;) {
    if (store.check({kStopKey})) {
      const std::string why = store_text(store, kStopKey);
      g_told = true;
      if (rank == 0)  // every rank, or those come by then
        serve_stop(
            store, [world_size] { return world_size - 1; }, kTellSeconds);
      else
        store.add(kStopRead, 1);
      throw JoinRefused(me + ": stopping before the job formed: " + why);
    }
    if (store.add(kJoinedCount, 0) >= world_size) return;
    const double now = seconds_now();
    if (now - began >= timeout_s) {
      g_told = true;  // nothing to tell those that did not come in all this time
      const std::string why = ranks_not_joined(store, world_size) + " did not join the job at " + address + " within " +
                              std::to_string(static_cast<int64_t>(timeout_s)) +
                              " s (dist_timeout_s): not started, or cannot reach that address (MASTER_ADDR, "
                              "MASTER_PORT, a firewall)";
      if (rank == 0) {  // the ranks that came read why before the store goes
        post_stop(store, "rank 0 gave up: " + why);
        serve_stop(
            store, [&store] { return store.add(kJoinedCount, 0) - 1; }, 5);
      }
      throw JoinRefused(me + ": " + why);
    }
    if (rank == 0 && now >= next_word) {
      std::cerr << (me + ": waiting for " + ranks_not_joined(store, world_size) + " to join the job at " + address +
                    " (" + std::to_string(static_cast<int64_t>(now - began)) + " s so far, dist_timeout_s " +
                    std::to_string(static_cast<int64_t>(timeout_s)) + ")\n");
      next_word += 60;
    }
    std::this_thread::sleep_for(pause);
    pause = std::min(pause * 2, std::chrono::milliseconds(250));
  }
}

// A TCP store at `host`, the classic one where LibTorch 2.4+'s libuv default is refused ("use_libuv
// was requested but PyTorch was build without libuv support").
c10::intrusive_ptr<c10d::Store> tcp_store(const std::string& host, c10d::TCPStoreOptions so) {
  try {
    return c10::make_intrusive<c10d::TCPStore>(host, so);
  } catch (const std::exception& ex) {
    if (std::string(ex.what()).find("libuv") == std::string::npos || !compat::set_store_libuv(so, false)) throw;
    return c10::make_intrusive<c10d::TCPStore>(host, so);
  }
}

// The job's store: rank 0's TCP store (`so.isServer` on rank 0), or under torchrun's agent store a
// client of that, the keys under this attempt's prefix (as PyTorch's own env:// rendezvous does).
c10::intrusive_ptr<c10d::Store> job_store(const Environment& e, c10d::TCPStoreOptions so) {
  if (!e.agent_store) return tcp_store(e.master_addr, so);
  so.isServer = false;
  return c10::make_intrusive<c10d::PrefixStore>("twins/attempt_" + std::to_string(e.restart_count),
                                                tcp_store(e.master_addr, so));
}

// What the heartbeats say about the other ranks after this rank's collective `op` failed: the
// stop a rank that failed with an error posted (`stop`, then nothing else), else those silent for
// 2.5 intervals and those alive at an earlier step than this rank's. That analysis is posted as
// the job's stop (unless one stands already), so that the ranks whose collectives fail later, and
// the watches of those still running (the one stuck, say), repeat it rather than "rank R failed
// with an error". Bounded in time: the reading runs on a thread of its own (with its own store
// client), left behind if the store does not answer.
struct Diagnosis {
  std::optional<std::string> stop;
  std::string text;
};
Diagnosis diagnose(const Heartbeat& heartbeat, int rank, int world_size, const std::string& op) {
  auto result = std::make_shared<std::promise<Diagnosis>>();
  std::future<Diagnosis> answer = result->get_future();
  const auto settle = heartbeat.interval() * 5 / 2;
  const auto limit = settle + std::chrono::seconds(15);
  std::thread([result, reader = heartbeat.reader(), settle, rank, world_size, op, mine = heartbeat.progress()] {
    try {
      const c10::intrusive_ptr<c10d::Store> store = reader();
      // A rank that failed with an error posted why (its heartbeats stop too: not "silent").
      auto stopped = [&store]() -> std::optional<std::string> {
        if (!store->check({kStopKey})) return std::nullopt;
        const std::vector<uint8_t> bytes = store->get(kStopKey);
        return std::string(bytes.begin(), bytes.end());
      };
      // Only a stop there when the collective failed: it failed because of that rank's error. One
      // posted during the wait below may come from a rank that timed out in the same hang as this
      // one (its stop says it "failed with an error"), for which the beats are the diagnosis.
      if (auto why = stopped()) return result->set_value(Diagnosis{why, {}});
      const std::vector<Beat> before = read_beats(*store, world_size);
      std::this_thread::sleep_for(settle);
      const std::vector<Beat> after = read_beats(*store, world_size);
      std::vector<std::string> silent, behind, gone;
      for (int r = 0; r < world_size; ++r) {
        const Beat &a = before[static_cast<size_t>(r)], &b = after[static_cast<size_t>(r)];
        if (r == rank) continue;
        if (!b.seen)
          silent.push_back("rank " + std::to_string(r) + " (never posted one)");
        else if (b.left)
          gone.push_back("rank " + std::to_string(r) + " at step " + std::to_string(b.progress));
        else if (b.unwatched)
          continue;  // no heartbeats to tell
        else if (a.seen && a.count == b.count)
          silent.push_back("rank " + std::to_string(r) + " (last at step " + std::to_string(b.progress) + ")");
        else if (b.progress < mine)
          behind.push_back("rank " + std::to_string(r) + " at step " + std::to_string(b.progress));
      }
      std::string text;
      if (!silent.empty())
        text = "no heartbeat from " + first_names(silent) + ": stopped, killed, or its machine unreachable";
      if (!behind.empty())
        text += (text.empty() ? "" : "; ") + first_names(behind) + " alive but behind this rank's step " +
                std::to_string(mine) + ": stuck before this collective (its data, or a deadlock)";
      if (!gone.empty())
        text += (text.empty() ? "" : "; ") + first_names(gone) +
                " left the job without an error: it finished, or called fewer collectives (diverged)";
      if (text.empty())
        text = "every rank is alive at step " + std::to_string(mine) +
               " or later: they called different collectives (diverged), or one is busy outside the steps";
      std::string told = text;  // as the other ranks read it
      const std::string who = "rank " + std::to_string(rank) + "'s";
      for (const auto& [here, there] : {std::pair<std::string, std::string>{"this rank's step", who + " step"},
                                        {"this collective", who + " " + op}})
        if (const size_t at = told.find(here); at != std::string::npos) told.replace(at, here.size(), there);
      try {  // (the collective may also have failed for a reason of this rank's own: a GPU error)
        post_stop(*store, who + " " + op + " failed (its own output says how); heartbeats: " + told);
      } catch (const std::exception&) {  // the analysis still reaches this rank's error
      }
      result->set_value(Diagnosis{std::nullopt, text});
    } catch (const std::exception& e) {
      result->set_value(Diagnosis{std::nullopt, std::string("the heartbeats could not be read: ") + e.what()});
    }
  }).detach();  // owns what it uses
  if (answer.wait_for(limit) != std::future_status::ready)
    return Diagnosis{std::nullopt, "the rendezvous store (rank 0's) did not answer within " +
                                       std::to_string(std::chrono::duration_cast<std::chrono::seconds>(limit).count()) +
                                       " s: rank 0 or its machine may have stopped"};
  return answer.get();
}

}  // namespace

struct Communicator::Impl {
  int rank = 0, world_size = 1;
  std::string backend;
  at::Device device{at::kCPU};  // where collectives' own tensors live (NCCL: the rank's GPU)
  double timeout_s = 1800;
  int64_t id = 0;
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<compat::ProcessGroupBackend> group;
  std::unique_ptr<Heartbeat> heartbeat;  // none at world size 1 or heartbeat_s 0
  double heartbeat_s = 0;
  bool hosts_store = false;  // rank 0 of a job formed through a TCP store: the store lives here
  bool watched = false;      // the other ranks' heartbeats read a stop (heartbeat_timeout_s > 0)

  // Waits for `work`, turning a failure into an error that says where to look.
  void wait(const c10::intrusive_ptr<c10d::Work>& work, const char* op) const {
    try {
      work->wait();
    } catch (const std::exception& e) {
      const std::string me = "rank " + std::to_string(rank) + " of " + std::to_string(world_size) + ": ";
      std::optional<std::string> stop;
      std::string heartbeats;
      try {
        if (heartbeat) {
          heartbeat->failing();
          Diagnosis d = diagnose(*heartbeat, rank, world_size, op);
          stop = std::move(d.stop), heartbeats = "; heartbeats: " + d.text;
        }
      } catch (...) {  // the collective's own error matters more
      }
      if (stop)  // the cause, in the heartbeat watch's words; the collective's failure follows from it
        throw std::runtime_error(me + "stopping: " + *stop + " (" + op + " failed: " + e.what() + ")");
      throw std::runtime_error(me + op + " failed: another rank died, hung or diverged (timeout " +
                               std::to_string(static_cast<int64_t>(timeout_s)) + " s)" + heartbeats + ": " + e.what());
    }
  }
};

std::vector<std::string> collective_backends() {
  std::vector<std::string> names;
  if (TWINS_WITH_GLOO) names.emplace_back("gloo");
  if (TWINS_WITH_NCCL) names.emplace_back("nccl");
  return names;
}

namespace {

using GroupMaker =
    std::function<c10::intrusive_ptr<compat::ProcessGroupBackend>(const c10::intrusive_ptr<c10d::Store>&)>;

// The backend's process group, prepared before the ranks join: what can fail on one node alone
// (the Gloo device of GLOO_SOCKET_IFNAME or of this host's name, a backend this build lacks)
// fails while that rank can still tell the others (report_failure_before_join).
GroupMaker prepare_group(const std::string& backend, int rank, int world_size, double timeout_s,
                         const std::string& host) {
  if (backend == "gloo") {
#if TWINS_WITH_GLOO
    auto o = c10d::ProcessGroupGloo::Options::create(to_ms(timeout_s));
    const char* ifname = env("GLOO_SOCKET_IFNAME");
    if (ifname)
      o->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
    else if (is_loopback(host))
      o->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
    else
      o->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    o->threads = 2;
    return [o, rank, world_size](const c10::intrusive_ptr<c10d::Store>& store) {
      return c10::intrusive_ptr<compat::ProcessGroupBackend>(
          c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world_size, o));
    };
#else
    (void)rank, (void)world_size, (void)timeout_s, (void)host;
    throw std::runtime_error(
        "this twins was built without Gloo (CPU collectives): the LibTorch it was built "
        "against has no Gloo headers");
#endif
  }
  if (backend == "nccl") {
#if TWINS_WITH_NCCL
    auto o = c10d::ProcessGroupNCCL::Options::create();
    o->timeout = to_ms(timeout_s);
    return [o, rank, world_size](const c10::intrusive_ptr<c10d::Store>& store) {
      return c10::intrusive_ptr<compat::ProcessGroupBackend>(
          c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world_size, o));
    };
#else
    throw std::runtime_error(
        "this twins was built without NCCL (GPU collectives): build against a CUDA "
        "LibTorch with NCCL, or use train.dist_backend gloo");
#endif
  }
  throw std::invalid_argument("train.dist_backend: \"" + backend + "\" is not auto, gloo or nccl");
}

WatchSettings watch_settings(const CommunicatorOptions& o, int world_size) {
  WatchSettings w;
  w.world_size = world_size, w.timeout_s = o.heartbeat_timeout_s, w.stop = o.on_job_failure;
  if (!w.stop) {
    std::lock_guard<std::mutex> lock(g_handler_mutex);
    w.stop = g_job_failure_handler;
  }
  return w;
}

}  // namespace

Communicator::Communicator(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Communicator::~Communicator() {
  {
    std::lock_guard<std::mutex> lock(g_registry_mutex);
    g_registry.erase(impl_->id);
  }
  // Rank 0 failing: its process hosts the store where its heartbeats are about to post why (the
  // Heartbeat's destructor, below) for the others' watches to read. A thread of its own keeps the
  // store up a while past this object (and past linger_after_failure's wait, so that it is never
  // torn down while the process exits); then the port is free again.
  if (impl_->hosts_store && impl_->watched && impl_->heartbeat && std::uncaught_exceptions() > 0) {
    const double until = seconds_now() + 2.5 * impl_->heartbeat_s;
    {
      std::lock_guard<std::mutex> lock(g_linger_mutex);
      g_linger_until = std::max(g_linger_until, until);
    }
    std::thread([store = impl_->store, until]() mutable {
      std::this_thread::sleep_for(std::chrono::duration<double>(until + 2 - seconds_now()));
      store.reset();
    }).detach();
  }
#if TWINS_WITH_NCCL
  if (auto* nccl = dynamic_cast<c10d::ProcessGroupNCCL*>(impl_->group.get())) {
    // The last heartbeat first (why this rank leaves: failed, or finished), so that the others
    // hear of it however long NCCL's abort takes.
    impl_->heartbeat.reset();
    try {
      compat::close_nccl_group(*nccl);
    } catch (const std::exception& e) {  // (a destructor: nothing may leave it)
      std::cerr << ("rank " + std::to_string(impl_->rank) + ": closing the NCCL group: " + e.what() + "\n");
    }
  }
#endif
}

void linger_after_failure() {
  double until = 0;
  {
    std::lock_guard<std::mutex> lock(g_linger_mutex);
    until = g_linger_until;
  }
  const double wait = until - seconds_now();
  if (wait > 0) std::this_thread::sleep_for(std::chrono::duration<double>(wait));
}

static std::shared_ptr<Communicator> registered(std::shared_ptr<Communicator> c) {
  std::lock_guard<std::mutex> lock(g_registry_mutex);
  g_registry[c->id()] = c;
  return c;
}

std::shared_ptr<Communicator> Communicator::find(int64_t id) {
  std::lock_guard<std::mutex> lock(g_registry_mutex);
  auto it = g_registry.find(id);
  std::shared_ptr<Communicator> c = it == g_registry.end() ? nullptr : it->second.lock();
  if (!c)
    throw std::runtime_error("dist: communicator " + std::to_string(id) +
                             " no longer exists (a backward "
                             "ran after its communicator was destroyed)");
  return c;
}

std::shared_ptr<Communicator> Communicator::create(const Environment& e, const at::Device& device,
                                                   const CommunicatorOptions& options) {
  if (options.timeout_s <= 0) throw std::invalid_argument("train.dist_timeout_s: must be > 0");
  if (options.heartbeat_timeout_s < 0) throw std::invalid_argument("train.dist_heartbeat_timeout_s: must be >= 0");
  auto impl = std::make_unique<Impl>();
  impl->rank = e.rank, impl->world_size = e.world_size, impl->timeout_s = options.timeout_s;
  impl->backend = options.backend == "auto" ? (device.is_cuda() ? "nccl" : "gloo") : options.backend;
  impl->device = impl->backend == "nccl" ? device : at::Device(at::kCPU);
  if (impl->backend == "nccl") {
    // NCCL takes one GPU per rank, named: its collectives' own tensors and any call on the current
    // device (NCCL's guess for a barrier) must be on this rank's GPU, not on GPU 0 for every rank.
    if (!device.is_cuda() || !device.has_index())
      throw std::invalid_argument("train.dist_backend: nccl needs this rank's GPU as cuda:<index>, not \"" +
                                  device.str() + "\" (gloo runs on the CPU)");
#if TWINS_WITH_NCCL
    c10::cuda::set_device(device.index());
#endif
  }
  impl->id = g_next_id++;
  c10d::TCPStoreOptions so;
  so.port = static_cast<uint16_t>(e.master_port);
  so.isServer = e.rank == 0;
  so.numWorkers = e.world_size;
  so.waitWorkers = false;  // join_all waits, and hears of a rank that failed first
  so.timeout = to_ms(options.timeout_s);
  const std::string address = e.master_addr + ":" + std::to_string(e.master_port);
  GroupMaker make_group;
  try {
    make_group = prepare_group(impl->backend, e.rank, e.world_size, options.timeout_s, e.master_addr);
  } catch (const std::invalid_argument&) {
    throw;
  } catch (const std::exception& ex) {
    throw std::runtime_error("rank " + std::to_string(e.rank) + ": cannot prepare the " + impl->backend +
                             " group: " + ex.what());
  }
  try {
    impl->store = job_store(e, so);
  } catch (const std::exception& ex) {
    g_told = true;  // no store to tell the job through
    throw std::runtime_error("rank " + std::to_string(e.rank) + ": rendezvous at " + address +
                             " failed (is rank 0 up, and the port free?): " + ex.what());
  }
  try {
    join_all(*impl->store, e.rank, e.world_size, options.timeout_s, address, e.agent_store);
  } catch (const JoinRefused&) {
    throw;
  } catch (const std::exception& ex) {  // the store stopped answering (rank 0 ended)
    g_told = true;
    throw std::runtime_error("rank " + std::to_string(e.rank) + ": rendezvous at " + address +
                             " failed while the ranks joined: " + ex.what());
  }
  try {
    impl->group = make_group(impl->store);
  } catch (const std::exception& ex) {
    throw std::runtime_error("rank " + std::to_string(e.rank) + ": could not form the " + impl->backend + " group of " +
                             std::to_string(e.world_size) + " ranks: " + ex.what());
  }
  if (options.heartbeat_s > 0 && e.world_size > 1) {
    c10d::TCPStoreOptions client = so;
    client.isServer = false, client.waitWorkers = false;
    client.numWorkers.reset();
    client.timeout = std::max(to_ms(10), to_ms(5 * options.heartbeat_s));
    try {
      impl->heartbeat_s = options.heartbeat_s, impl->hosts_store = e.rank == 0 && !e.agent_store;
      impl->watched = options.heartbeat_timeout_s > 0;
      WatchSettings watch = watch_settings(options, e.world_size);
      watch.store_outlives_rank0 = e.agent_store;
      impl->heartbeat = std::make_unique<Heartbeat>(
          job_store(e, client), [e, client] { return job_store(e, client); }, e.rank, options.heartbeat_s,
          std::move(watch));
    } catch (const std::exception& ex) {  // the job runs; only its failures are told less well
      std::cerr << "warning: rank " << e.rank << ": no heartbeat store client: " << ex.what() << "\n";
      try {  // rank 0's watch must not take a rank without heartbeats for a silent one
        const std::string beat = detail::format_beat(0, 0, detail::BeatState::unwatched);
        impl->store->set(beat_key(e.rank), std::vector<uint8_t>(beat.begin(), beat.end()));
      } catch (const std::exception&) {
      }
    }
  }
  g_joined = true;
  return registered(std::shared_ptr<Communicator>(new Communicator(std::move(impl))));
}

void report_failure_before_join(const Environment& e, double wait_s) noexcept {
  if (e.world_size <= 1 || g_joined.exchange(true) || g_told.exchange(true)) return;
  try {
    c10d::TCPStoreOptions so;
    so.port = static_cast<uint16_t>(e.master_port);
    so.isServer = e.rank == 0;
    so.numWorkers = e.world_size;
    so.waitWorkers = false;
    so.timeout = to_ms(wait_s);
    const c10::intrusive_ptr<c10d::Store> store = job_store(e, so);
    if (store->add(kJoinedCount, 0) >= e.world_size) return;  // a job that formed: not this rank's
    post_stop(*store, "rank " + std::to_string(e.rank) + " failed before it joined the job (its own output says why)");
    if (e.rank == 0)
      serve_stop(
          *store, [&e] { return e.world_size - 1; }, wait_s);
    else
      store->add(kStopRead, 1);
  } catch (...) {  // rank 0's store unreachable: the others wait for dist_timeout_s, as before
  }
}

std::vector<std::shared_ptr<Communicator>> Communicator::create_local_group(int world_size,
                                                                            const CommunicatorOptions& options) {
  if (world_size < 1) throw std::invalid_argument("create_local_group: world size must be >= 1");
  auto store = c10::make_intrusive<c10d::HashStore>();
  const int64_t group_id = g_next_id++;
  std::vector<std::shared_ptr<Communicator>> out(static_cast<size_t>(world_size));
  std::vector<std::exception_ptr> errors(static_cast<size_t>(world_size));
  std::vector<std::thread> threads;
  // Each group's constructor waits for the others: build them concurrently.
  for (int r = 0; r < world_size; ++r)
    threads.emplace_back([&, r] {
      try {
        auto impl = std::make_unique<Impl>();
        impl->rank = r, impl->world_size = world_size, impl->timeout_s = options.timeout_s, impl->backend = "gloo";
        impl->id = g_next_id++;
        impl->store = c10::make_intrusive<c10d::PrefixStore>("local" + std::to_string(group_id), store);
        impl->group = prepare_group("gloo", r, world_size, options.timeout_s, "127.0.0.1")(impl->store);
        if (options.heartbeat_s > 0 && world_size > 1)
          impl->heartbeat = std::make_unique<Heartbeat>(
              impl->store, [store = impl->store] { return store; }, r, options.heartbeat_s,
              watch_settings(options, world_size));
        out[static_cast<size_t>(r)] = registered(std::shared_ptr<Communicator>(new Communicator(std::move(impl))));
      } catch (...) {
        errors[static_cast<size_t>(r)] = std::current_exception();
      }
    });
  for (auto& t : threads) t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
  return out;
}

int Communicator::rank() const { return impl_->rank; }
int Communicator::world_size() const { return impl_->world_size; }
std::string Communicator::backend() const { return impl_->backend; }
at::Device Communicator::device() const { return impl_->device; }
int64_t Communicator::id() const { return impl_->id; }
double Communicator::timeout_s() const { return impl_->timeout_s; }

void Communicator::all_reduce(at::Tensor& tensor) { all_reduce_async(tensor)(); }

int64_t Communicator::sum(int64_t value) {
  at::Tensor t = at::full({1}, value, at::TensorOptions().dtype(at::kLong).device(impl_->device));
  all_reduce(t);
  return t.item<int64_t>();
}

std::vector<int64_t> Communicator::gather(const std::vector<int64_t>& values) {
  const at::Tensor mine = at::tensor(at::ArrayRef<int64_t>(values), at::kLong).to(impl_->device);
  const at::Tensor all = all_gather(mine).cpu().contiguous();
  return {all.data_ptr<int64_t>(), all.data_ptr<int64_t>() + all.numel()};
}

bool Communicator::any(bool flag) {
  at::Tensor t = at::full({1}, flag ? 1.0 : 0.0, at::TensorOptions().dtype(at::kDouble).device(impl_->device));
  all_reduce(t);
  return t.item<double>() > 0;
}

void on_rank0(const std::shared_ptr<Communicator>& communicator, const std::function<void()>& work,
              const std::string& what) {
  on_rank0_long(
      communicator.get(), [&](const std::function<void()>&) { work(); }, what);
}

void on_rank0_long(Communicator* communicator, const std::function<void(const std::function<void()>& keep_alive)>& work,
                   const std::string& what) {
  // Every rank adds to sum(): the others 0, rank 0 0 while it works (the keep-alive), then 1 when
  // it is done or 2 when it failed; the others wait until the sum is no longer 0.
  constexpr int64_t kWorking = 0, kDone = 1, kFailed = 2;
  std::exception_ptr failed;
  bool broken = false;  // a keep-alive's collective failed
  if (!communicator || communicator->rank() == 0) {
    const double every_s = communicator ? communicator->timeout_s() / 4 : 0;
    double last = seconds_now();
    const std::function<void()> keep_alive = [&] {
      if (!communicator || communicator->world_size() == 1 || seconds_now() - last < every_s) return;
      try {
        communicator->sum(kWorking);
      } catch (...) {
        broken = true;  // its own error goes up through the work; no verdict on a failed group
        throw;
      }
      last = seconds_now();
    };
    try {
      work(keep_alive);
    } catch (...) {
      failed = std::current_exception();
    }
  }
  int64_t verdict = failed ? kFailed : kDone;
  if (communicator && !broken) try {
      if (communicator->rank() == 0)
        verdict = communicator->sum(verdict);
      else
        do verdict = communicator->sum(kWorking);
        while (verdict == kWorking);
    } catch (...) {
      if (failed) std::rethrow_exception(failed);  // rank 0's own error says more
      throw;
    }
  if (failed) std::rethrow_exception(failed);
  if (verdict == kFailed)
    throw std::runtime_error("rank " + std::to_string(communicator->rank()) + ": rank 0 could not " + what +
                             " (its error says why)");
}

std::function<void()> Communicator::all_reduce_async(at::Tensor& tensor) {
  TORCH_CHECK(tensor.is_contiguous(), "all_reduce: the tensor must be contiguous");
  std::vector<at::Tensor> ts{tensor};
  auto work = impl_->group->allreduce(ts);
  const Impl* impl = impl_.get();
  return [work, impl] { impl->wait(work, "all_reduce"); };
}

at::Tensor Communicator::all_gather(const at::Tensor& tensor) {
  std::vector<at::Tensor> in{tensor.contiguous()};
  std::vector<std::vector<at::Tensor>> out(1);
  for (int r = 0; r < impl_->world_size; ++r) out[0].push_back(at::empty_like(in[0]));
  impl_->wait(impl_->group->allgather(out, in), "all_gather");
  return at::cat(out[0], 0);
}

void Communicator::broadcast(at::Tensor& tensor, int root) {
  TORCH_CHECK(tensor.is_contiguous(), "broadcast: the tensor must be contiguous");
  std::vector<at::Tensor> ts{tensor};
  c10d::BroadcastOptions o;
  o.rootRank = root;
  impl_->wait(impl_->group->broadcast(ts, o), "broadcast");
}

void Communicator::barrier() {
  c10d::BarrierOptions o;  // NCCL otherwise guesses the GPU from the rank (rank % GPUs)
  if (impl_->device.is_cuda()) o.device_ids = {impl_->device.index()};
  impl_->wait(impl_->group->barrier(o), "barrier");
}

void Communicator::note_progress(int64_t step) {
  if (impl_->heartbeat) impl_->heartbeat->note(step);
}

}  // namespace twins::distributed

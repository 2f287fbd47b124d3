#pragma once
// Internal to the communicator (not installed): what the ranks' heartbeats say, and rank 0's
// watch over them, kept apart from the threads and stores so that tests can drive it with a clock.
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace twins::distributed::detail {

/// One rank's heartbeat as posted to the store: "<count> <progress>", then " left" once it
/// has left the job without an error (a finished rank, or one that returned early), or
/// " unwatched" from a rank that could not start its heartbeats (no store client of its own).
struct Beat {
  bool seen = false;  // posted at least once (and readable)
  int64_t count = 0, progress = 0;
  bool left = false, unwatched = false;
};
enum class BeatState { alive, left, unwatched };
std::string format_beat(int64_t count, int64_t progress, BeatState state = BeatState::alive);
Beat parse_beat(const std::string& text);

/// Rank 0's watch: fed with readings of every rank's beat at times `now_s` (any monotonic
/// clock, in seconds), it names the first rank whose count has not changed for `timeout_s`
/// (or that never posted one since the watch began) and has not left: killed, frozen, or its
/// machine unreachable, so the job cannot go on. A reading that failed is not fed: a slow
/// store is never mistaken for silent ranks; and readings more than `max_gap_s` apart (the
/// watcher itself was suspended, as the whole job under Ctrl-Z or `scontrol suspend`) start
/// every rank's silence afresh.
class SilenceWatch {
 public:
  SilenceWatch(int world_size, int self, double timeout_s, double now_s, double max_gap_s);
  void observe(const std::vector<Beat>& beats, double now_s);
  /// "rank 3 sent no heartbeat for 60 s (last at step 41)", or nothing.
  std::optional<std::string> verdict(double now_s) const;

 private:
  struct Seen {
    Beat beat;
    double since = 0;  // when `beat.count` was first read (or when the watch began)
  };
  int self_;
  double timeout_s_, max_gap_s_, last_reading_;
  std::vector<Seen> seen_;
};

}  // namespace twins::distributed::detail

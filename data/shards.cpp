// Tar shards: sources (local files, pipe: commands), the libarchive reader that groups members
// into samples, the shard index, the streaming dataset and its epoch plan, and the writer.
#include "twins/data/shards.h"

#include <ATen/ATen.h>
#ifdef TWINS_HAVE_LIBARCHIVE
#include <archive.h>
#include <archive_entry.h>
#endif
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <numeric>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>
#include <optional>
#include <thread>

#include "twins/augment/random.h"
#include "twins/config.h"
#include "twins/data/image_io.h"
#include "twins/io.h"

namespace twins::data {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr int64_t kMaxMemberBytes = int64_t{1} << 30;
constexpr size_t kMaxUrls = 10000000;
// Of names from one pattern, with each string's own ~48 bytes: 1.3M shards of 80-byte paths (the
// largest public web datasets) take ~170 MB.
constexpr size_t kMaxUrlBytes = size_t{256} << 20;

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return s;
}

bool is_pipe(const std::string& url) { return url.rfind("pipe:", 0) == 0; }

// Cancellation of a read in progress (the epoch ended, the loader is going away).
struct Cancelled : std::runtime_error {
  Cancelled() : std::runtime_error("reading cancelled") {}
};

// ---------------------------------------------------------------------------------------------
// Sources: a local file, or the standard output of a shell command run in its own process group
// (so it and its children can be stopped together). Reads wait at most `timeout` seconds for a
// byte, so a dead network command is an error, not a hang.
class Source {
 public:
  Source(const std::string& url, double timeout, const std::atomic<bool>* cancelled)
      : url_(url), timeout_(timeout), cancelled_(cancelled) {
    if (!is_pipe(url)) {
      fd_ = ::open(url.c_str(), O_RDONLY | O_CLOEXEC);
      if (fd_ < 0) throw std::runtime_error(url + ": cannot open (" + std::strerror(errno) + ")");
      struct stat st {};
      if (::fstat(fd_, &st) != 0 || S_ISDIR(st.st_mode)) {
        ::close(fd_);
        throw std::runtime_error(url + ": not a file");
      }
      return;
    }
    const std::string command = url.substr(5);
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0)
      throw std::runtime_error(url + ": cannot create a pipe (" + std::strerror(errno) + ")");
    const pid_t pid = ::fork();
    if (pid < 0) {
      ::close(fds[0]), ::close(fds[1]);
      throw std::runtime_error(url + ": cannot start the command (" + std::strerror(errno) + ")");
    }
    if (pid == 0) {  // the child: only async-signal-safe calls until exec
      ::setpgid(0, 0);
      struct sigaction dfl {};
      dfl.sa_handler = SIG_DFL;
      ::sigaction(SIGPIPE, &dfl, nullptr);
      ::sigaction(SIGXFSZ, &dfl, nullptr);
      ::dup2(fds[1], STDOUT_FILENO);
      const int null = ::open("/dev/null", O_RDONLY);
      if (null >= 0) ::dup2(null, STDIN_FILENO);
      ::execl("/bin/sh", "sh", "-c", command.c_str(), static_cast<char*>(nullptr));
      ::_exit(127);
    }
    ::setpgid(pid, pid);  // also here: whichever runs first
    ::close(fds[1]);
    fd_ = fds[0];
    pid_ = pid;
  }
  ~Source() {
    if (fd_ >= 0) ::close(fd_);
    if (pid_ > 0) {
      int status = 0;
      if (::waitpid(pid_, &status, WNOHANG) == 0) {  // still running: stop it and its children
        ::kill(-pid_, SIGKILL);
        ::waitpid(pid_, &status, 0);
      }
    }
  }
  Source(const Source&) = delete;
  Source& operator=(const Source&) = delete;

  // Up to n bytes; 0 at the end. Throws on a read error, a timeout or cancellation.
  size_t read(void* buffer, size_t n) {
    double waited = 0;
    while (true) {
      if (cancelled_ && cancelled_->load()) throw Cancelled();
      pollfd p{fd_, POLLIN, 0};
      const int tick_ms = 200;
      const int r = ::poll(&p, 1, tick_ms);
      if (r < 0 && errno == EINTR) continue;
      if (r < 0) throw std::runtime_error(url_ + ": poll failed (" + std::strerror(errno) + ")");
      if (r == 0) {
        waited += tick_ms / 1000.0;
        if (waited >= timeout_) {
          char t[32];
          std::snprintf(t, sizeof t, "%g", timeout_);
          throw std::runtime_error(url_ + ": no data for " + t + " s (read_timeout): the source is dead or stalled");
        }
        continue;
      }
      const ssize_t got = ::read(fd_, buffer, n);
      if (got < 0 && errno == EINTR) continue;
      if (got < 0) throw std::runtime_error(url_ + ": read failed (" + std::strerror(errno) + ")");
      return static_cast<size_t>(got);
    }
  }

  // For a command: "" when it exited with status 0, else what went wrong (waiting at most
  // `wait` seconds for it to exit).
  std::string exit_problem(double wait) {
    if (pid_ <= 0) return "";
    int status = 0;
    pid_t r = 0;
    for (double waited = 0; (r = ::waitpid(pid_, &status, WNOHANG)) == 0 && waited < wait; waited += 0.05)
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    if (r == 0) return "the command has not exited";
    pid_ = -1;
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0) return "";
    if (WIFEXITED(status)) return "the command exited with status " + std::to_string(WEXITSTATUS(status));
    return "the command was killed by signal " + std::to_string(WTERMSIG(status));
  }

  const std::string& url() const { return url_; }

 private:
  std::string url_;
  double timeout_;
  const std::atomic<bool>* cancelled_;
  int fd_ = -1;
  pid_t pid_ = -1;
};

// ---------------------------------------------------------------------------------------------
// A sample as read from a tar: its key and the members twins uses.
struct RawSample {
  std::string key;
  std::string image_ext;
  std::vector<uint8_t> image;
  std::string cls, json_text;
  bool has_cls = false, has_json = false;
};

#ifdef TWINS_HAVE_LIBARCHIVE
// Reads a tar (any compression libarchive detects) from a Source and groups consecutive members
// that share a key: the member name up to the first dot of its last path component.
class TarReader {
 public:
  TarReader(Source& source, bool want_json) : source_(source), want_json_(want_json), buffer_(1 << 16) {
    if (!a_) throw std::bad_alloc();
    archive_read_support_format_tar(a_.get());
    archive_read_support_filter_gzip(a_.get());
    archive_read_support_filter_bzip2(a_.get());
    archive_read_support_filter_xz(a_.get());
    archive_read_support_filter_zstd(a_.get());
    if (archive_read_open(a_.get(), this, nullptr, &TarReader::read_cb, nullptr) != ARCHIVE_OK) fail("cannot open");
  }
  TarReader(const TarReader&) = delete;
  TarReader& operator=(const TarReader&) = delete;

  // The next sample, false at the end of the archive. Throws std::runtime_error naming the
  // source and the member for a corrupt or truncated tar (Cancelled when cancelled).
  bool next(RawSample& out) {
    out = RawSample{};
    while (true) {
      if (!pending_) {
        if (eof_) return !out.key.empty();
        archive_entry* entry = nullptr;
        const int r = archive_read_next_header(a_.get(), &entry);
        if (r == ARCHIVE_EOF) {
          eof_ = true;
          return !out.key.empty();
        }
        if (r < ARCHIVE_WARN) fail(last_member_.empty() ? "at the start" : "after member " + last_member_);
        if (archive_entry_filetype(entry) != AE_IFREG) continue;  // folders, links
        pending_name_ = archive_entry_pathname(entry) ? archive_entry_pathname(entry) : "";
        pending_size_ = archive_entry_size(entry);
        pending_ = true;
      }
      const size_t slash = pending_name_.rfind('/');
      const size_t dot = pending_name_.find('.', slash == std::string::npos ? 0 : slash + 1);
      const std::string key = pending_name_.substr(0, dot);
      const std::string ext = dot == std::string::npos ? "" : lower(pending_name_.substr(dot + 1));
      if (!out.key.empty() && key != out.key) return true;  // the header starts the next sample
      out.key = key;
      pending_ = false;
      last_member_ = pending_name_;
      const bool image = out.image.empty() && is_image_extension(ext);
      const bool cls = ext == "cls", js = want_json_ && ext == "json";
      if (!image && !cls && !js) continue;  // libarchive skips unread data itself
      if (pending_size_ > kMaxMemberBytes)
        throw std::runtime_error(source_.url() + ": member " + pending_name_ + " is larger than 1 GiB");
      std::vector<uint8_t> data(static_cast<size_t>(std::max<int64_t>(pending_size_, 0)));
      size_t got = 0;
      while (got < data.size()) {
        const la_ssize_t n = archive_read_data(a_.get(), data.data() + got, data.size() - got);
        if (n < 0) fail("in member " + pending_name_);
        if (n == 0) break;
        got += static_cast<size_t>(n);
      }
      if (got != data.size()) fail("in member " + pending_name_ + " (cut short)");
      if (image) out.image = std::move(data), out.image_ext = ext;
      if (cls) out.cls.assign(data.begin(), data.end()), out.has_cls = true;
      if (js) out.json_text.assign(data.begin(), data.end()), out.has_json = true;
    }
  }

 private:
  static la_ssize_t read_cb(archive* a, void* self, const void** buffer) {
    auto* t = static_cast<TarReader*>(self);
    try {
      *buffer = t->buffer_.data();
      return static_cast<la_ssize_t>(t->source_.read(t->buffer_.data(), t->buffer_.size()));
    } catch (...) {  // no exception through libarchive's C frames: kept and rethrown in fail()
      t->error_ = std::current_exception();
      archive_set_error(a, EIO, "read failed");
      return -1;
    }
  }
  [[noreturn]] void fail(const std::string& where) {
    if (error_) std::rethrow_exception(error_);
    const char* why = archive_error_string(a_.get());
    throw std::runtime_error(source_.url() + ": corrupt or truncated tar " + where + " (" +
                             (why ? why : "unknown error") + ")");
  }

  Source& source_;
  bool want_json_;
  std::vector<uint8_t> buffer_;
  // Owned here, so that a constructor that throws frees it too.
  std::unique_ptr<archive, int (*)(archive*)> a_{archive_read_new(), &archive_read_free};
  std::exception_ptr error_;
  bool pending_ = false, eof_ = false;
  std::string pending_name_, last_member_;
  int64_t pending_size_ = 0;
};

#else
[[noreturn]] void no_libarchive() {
  throw std::runtime_error(
      "tar shards: this twins was built without libarchive (Debian: apt-get install libarchive-dev, "
      "then rebuild)");
}
class TarReader {
 public:
  TarReader(Source&, bool) { no_libarchive(); }
  bool next(RawSample&) { no_libarchive(); }
};
#endif

// The label of a sample, -1 if it has none (the caller decides whether that is an error).
int64_t parse_label(const RawSample& s, const LabelSource& label, const std::string& where) {
  auto check = [&](long long v) {
    if (v < 0 || v >= kMaxClasses)
      throw std::runtime_error(where + ": label " + std::to_string(v) + " is not in [0, " +
                               std::to_string(kMaxClasses) + ")");
    return static_cast<int64_t>(v);
  };
  if (label.json_key.empty()) {
    if (!s.has_cls) return -1;
    std::string t = s.cls;
    while (!t.empty() && std::isspace(static_cast<unsigned char>(t.back()))) t.pop_back();
    size_t start = 0;
    while (start < t.size() && std::isspace(static_cast<unsigned char>(t[start]))) ++start;
    t = t.substr(start);
    const auto v = config::parse_integer(t);
    if (!v) throw std::runtime_error(where + ".cls: \"" + t.substr(0, 40) + "\" is not an integer label");
    return check(*v);
  }
  if (!s.has_json) return -1;
  const json j = json::parse(s.json_text, nullptr, false);
  if (j.is_discarded()) throw std::runtime_error(where + ".json: not valid JSON");
  if (!j.is_object() || !j.contains(label.json_key)) return -1;
  const json& v = j.at(label.json_key);
  if (!v.is_number_integer()) throw std::runtime_error(where + ".json: \"" + label.json_key + "\" is not an integer");
  return check(v.get<long long>());
}

// ---------------------------------------------------------------------------------------------
// Brace expansion.
// A pattern is literal text and brace groups, each a comma list ({train,val}) or a range of
// non-negative integers ({000..127}, zero-padded to the first bound's width). Groups do not nest.
// The names' number and total size are known before any is made, so that a hostile pattern (a
// product of groups) is refused at once rather than after filling memory.
struct BraceGroup {
  std::string before;              // literal text before the group
  std::vector<std::string> items;  // a comma list, or
  long long lo = 0, hi = -1;       // a range
  size_t width = 0;
  bool range() const { return hi >= lo; }
  size_t size() const { return range() ? static_cast<size_t>(hi - lo + 1) : items.size(); }
  std::string at(size_t i) const {
    if (!range()) return items[i];
    std::string num = std::to_string(lo + static_cast<long long>(i));
    if (num.size() < width) num.insert(0, width - num.size(), '0');
    return num;
  }
  size_t longest() const {
    if (range()) return std::max(width, std::to_string(hi).size());
    size_t n = 0;
    for (const auto& item : items) n = std::max(n, item.size());
    return n;
  }
};

void expand_one(const std::string& pattern, std::vector<std::string>& out) {
  std::vector<BraceGroup> groups;
  std::string rest = pattern;
  for (size_t open; (open = rest.find('{')) != std::string::npos;) {
    const size_t close = rest.find('}', open);
    if (close == std::string::npos) throw std::invalid_argument(pattern + ": '{' without a closing '}'");
    BraceGroup g;
    g.before = rest.substr(0, open);
    const std::string body = rest.substr(open + 1, close - open - 1);
    if (body.find('{') != std::string::npos) throw std::invalid_argument(pattern + ": braces do not nest");
    rest = rest.substr(close + 1);
    const size_t dots = body.find("..");
    if (dots != std::string::npos) {
      const std::string a = body.substr(0, dots), b = body.substr(dots + 2);
      auto digits = [](const std::string& t) {
        return !t.empty() && t.size() <= 18 &&
               std::all_of(t.begin(), t.end(), [](unsigned char c) { return std::isdigit(c); });
      };
      if (!digits(a) || !digits(b))
        throw std::invalid_argument(pattern + ": {" + body + "} is not a range of non-negative integers");
      g.lo = std::stoll(a), g.hi = std::stoll(b), g.width = a.size();
      if (g.hi < g.lo) throw std::invalid_argument(pattern + ": {" + body + "} runs backwards");
    } else {
      for (size_t start = 0;;) {
        const size_t comma = body.find(',', start);
        g.items.push_back(body.substr(start, comma - start));
        if (comma == std::string::npos) break;
        start = comma + 1;
      }
    }
    groups.push_back(std::move(g));
  }
  // How many names, and at most how many bytes, before making them.
  size_t count = 1, longest = rest.size();
  for (const auto& g : groups) {
    if (count > kMaxUrls / g.size()) throw std::invalid_argument(pattern + ": expands to more than 10 million names");
    count *= g.size();
    longest += g.before.size() + g.longest();
  }
  if (out.size() + count > kMaxUrls) throw std::invalid_argument(pattern + ": expands to more than 10 million names");
  if (count > kMaxUrlBytes / (longest + 48))
    throw std::invalid_argument(pattern + ": expands to more than " + std::to_string(kMaxUrlBytes >> 20) +
                                " MiB of names");
  // Every combination, the last group varying fastest (as a shell's brace expansion).
  std::vector<size_t> index(groups.size(), 0);
  out.reserve(out.size() + count);
  for (size_t n = 0; n < count; ++n) {
    std::string name;
    name.reserve(longest);
    for (size_t i = 0; i < groups.size(); ++i) name.append(groups[i].before).append(groups[i].at(index[i]));
    out.push_back(std::move(name.append(rest)));
    for (size_t i = groups.size(); i-- > 0;) {
      if (++index[i] < groups[i].size()) break;
      index[i] = 0;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The epoch plan: which shard each position of a rank's stream comes from, and the order in which
// the shuffle buffer hands stream positions out.
struct EpochPlan {
  struct Visit {
    int64_t shard = 0;
    int slot = 0;
    std::vector<int64_t> positions;  // stream positions of the shard's samples 0, 1, 2, ...
  };
  std::vector<Visit> visits;
  std::vector<int64_t> stream_sample;  // stream position -> dataset index
  std::vector<int64_t> order;          // epoch position -> stream position
  int slots = 1;
};

struct ShardsSettings {
  ShardIndex index;
  std::vector<int64_t> offsets;  // first dataset index of each shard
  LabelSource label;
  int64_t shuffle_buffer = 1000;
  int shards_in_flight = 4;
  double read_timeout = 120;
  int64_t max_image_pixels = kDefaultMaxImagePixels;
};

EpochPlan make_plan(const ShardsSettings& s, const StreamPlan& p) {
  const auto& shards = s.index.shards;
  const int64_t n = static_cast<int64_t>(shards.size());
  if (n < p.world_size)
    throw std::runtime_error("shards: " + std::to_string(n) + " shard(s) for " + std::to_string(p.world_size) +
                             " ranks: every rank needs at least one; write more, smaller shards (twins shards create "
                             "--max-size)");
  std::vector<int64_t> perm(static_cast<size_t>(n));
  if (p.shuffle)
    perm = augment::permutation(n, augment::Rng(p.seed, static_cast<uint64_t>(p.epoch), ~uint64_t(0), ~uint64_t(1)));
  else
    std::iota(perm.begin(), perm.end(), int64_t{0});
  std::vector<int64_t> mine;
  int64_t mine_samples = 0;
  for (int64_t i = p.rank; i < n; i += p.world_size) {
    mine.push_back(perm[static_cast<size_t>(i)]);
    mine_samples += shards[static_cast<size_t>(perm[static_cast<size_t>(i)])].samples;
  }
  if (mine_samples == 0)
    throw std::runtime_error("shards: the shards of rank " + std::to_string(p.rank) + " in epoch " +
                             std::to_string(p.epoch) + " hold no samples");
  const int64_t per_rank = (s.index.samples + p.world_size - 1) / p.world_size;
  EpochPlan plan;
  plan.slots =
      p.shuffle ? static_cast<int>(std::min<int64_t>(s.shards_in_flight, static_cast<int64_t>(mine.size()))) : 1;
  const int64_t buffer = p.shuffle ? s.shuffle_buffer : 0;

  // The stream: passes over this rank's shards; in a pass, `slots` shards are read at once,
  // one sample from each in turn, and a slot whose shard ends opens the next unopened one.
  std::vector<int64_t> active;  // visit of each slot, -1 when idle
  size_t next_shard = 0;
  auto open_slot = [&](int slot) -> int64_t {
    while (next_shard < mine.size()) {
      const int64_t shard = mine[next_shard++];
      if (shards[static_cast<size_t>(shard)].samples == 0) continue;
      plan.visits.push_back({shard, slot, {}});
      return static_cast<int64_t>(plan.visits.size()) - 1;
    }
    return -1;
  };
  auto start_pass = [&] {
    next_shard = 0;
    active.assign(static_cast<size_t>(plan.slots), -1);
    for (int k = 0; k < plan.slots; ++k) active[static_cast<size_t>(k)] = open_slot(k);
  };
  size_t turn = 0;
  // The next stream position, or -1 at the end of a pass.
  auto next_item = [&]() -> int64_t {
    for (size_t tries = 0; tries < active.size(); ++tries, turn = (turn + 1) % active.size()) {
      const int64_t v = active[turn];
      if (v < 0) continue;
      auto& visit = plan.visits[static_cast<size_t>(v)];
      const int64_t pos = static_cast<int64_t>(plan.stream_sample.size());
      plan.stream_sample.push_back(s.offsets[static_cast<size_t>(visit.shard)] +
                                   static_cast<int64_t>(visit.positions.size()));
      visit.positions.push_back(pos);
      if (static_cast<int64_t>(visit.positions.size()) == shards[static_cast<size_t>(visit.shard)].samples)
        active[turn] = open_slot(static_cast<int>(turn));
      turn = (turn + 1) % active.size();
      return pos;
    }
    return -1;
  };

  // The shuffle buffer (WebDataset's): once full, each new sample takes the place of a random one,
  // which is handed out; at the end of a pass the rest are handed out in random order.
  augment::Rng rng(p.seed, static_cast<uint64_t>(p.epoch), static_cast<uint64_t>(p.rank), ~uint64_t(2));
  std::vector<int64_t> held;
  plan.order.reserve(static_cast<size_t>(per_rank));
  start_pass();
  while (static_cast<int64_t>(plan.order.size()) < per_rank) {
    const int64_t item = next_item();
    if (item < 0) {
      if (held.empty()) {
        start_pass();
        continue;
      }
      const auto j = static_cast<size_t>(rng.integer(0, static_cast<int64_t>(held.size()) - 1));
      plan.order.push_back(held[j]);
      held[j] = held.back();
      held.pop_back();
    } else if (static_cast<int64_t>(held.size()) < buffer) {
      held.push_back(item);
    } else if (buffer == 0) {
      plan.order.push_back(item);
    } else {
      const auto j = static_cast<size_t>(rng.integer(0, buffer - 1));
      plan.order.push_back(held[j]);
      held[j] = item;
    }
  }
  return plan;
}

// ---------------------------------------------------------------------------------------------
// One rank's epoch: a reader thread per slot reads its visits in order and keeps the samples the
// epoch still needs until they are taken.
class ShardEpochStream : public EpochStream {
 public:
  ShardEpochStream(std::shared_ptr<const ShardsSettings> settings, EpochPlan plan, const StreamPlan& p)
      : s_(std::move(settings)), plan_(std::move(plan)), read_ahead_(std::max<int64_t>(p.read_ahead, 1)) {
    const size_t n = plan_.order.size();
    prefix_max_.resize(n);
    int64_t m = -1;
    for (size_t i = 0; i < n; ++i) prefix_max_[i] = m = std::max(m, plan_.order[i]);
    needed_.assign(plan_.stream_sample.size(), false);
    for (size_t i = static_cast<size_t>(std::clamp<int64_t>(p.first, 0, static_cast<int64_t>(n))); i < n; ++i)
      needed_[static_cast<size_t>(plan_.order[i])] = true;
    first_ = p.first;
    update_limit(p.first);
    for (int slot = 0; slot < plan_.slots; ++slot) threads_.emplace_back([this, slot] { read_slot(slot); });
  }
  ~ShardEpochStream() override {
    cancel();
    for (auto& t : threads_) t.join();
  }

  Sample take(int64_t position) override {
    if (position < first_ || position >= static_cast<int64_t>(plan_.order.size()))
      throw std::out_of_range("shards: position " + std::to_string(position) + " outside this epoch");
    const int64_t q = plan_.order[static_cast<size_t>(position)];
    Raw raw;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      update_limit(position);
      read_cv_.notify_all();
      taken_cv_.wait(lock, [&] { return cancelled_.load() || stored_.count(q) != 0; });
      if (cancelled_) throw std::runtime_error("shards: the epoch's stream was stopped");
      raw = std::move(stored_[q]);
      stored_.erase(q);
    }
    const std::string name = raw.where + (raw.image_ext.empty() ? "" : "." + raw.image_ext);
    if (!raw.error.empty()) throw BadSample(raw.error);
    Sample out;
    out.label = raw.label;
    out.index = plan_.stream_sample[static_cast<size_t>(q)];
    try {
      out.image = decode_image(raw.image, name, s_->max_image_pixels);
    } catch (const std::bad_alloc&) {
      throw;
    } catch (const std::exception& e) {
      throw BadSample(e.what());
    }
    return out;
  }

  void cancel() override {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      cancelled_ = true;
    }
    read_cv_.notify_all();
    taken_cv_.notify_all();
  }

 private:
  struct Raw {
    std::vector<uint8_t> image;
    std::string image_ext, where, error;
    int64_t label = -1;
  };

  // Called with the lock held: stream positions up to limit_ may be read.
  void update_limit(int64_t position) {
    const int64_t n = static_cast<int64_t>(prefix_max_.size());
    if (n == 0) return;
    const int64_t hi = std::min(n - 1, std::max<int64_t>(position, 0) + read_ahead_);
    limit_ = std::max(limit_, prefix_max_[static_cast<size_t>(hi)]);
  }

  void store(int64_t q, Raw raw) {
    std::lock_guard<std::mutex> lock(mutex_);
    stored_[q] = std::move(raw);
    taken_cv_.notify_all();
  }

  void read_slot(int slot) {
    for (const auto& visit : plan_.visits) {
      if (visit.slot != slot) continue;
      if (cancelled_) return;
      if (std::none_of(visit.positions.begin(), visit.positions.end(),
                       [&](int64_t q) { return needed_[static_cast<size_t>(q)]; }))
        continue;  // a resumed epoch past this whole visit
      const auto& shard = s_->index.shards[static_cast<size_t>(visit.shard)];
      size_t k = 0;  // samples of the visit done
      try {
        Source source(shard.url, s_->read_timeout, &cancelled_);
        try {
          TarReader tar(source, !s_->label.json_key.empty());
          RawSample sample;
          for (; k < visit.positions.size(); ++k) {
            const int64_t q = visit.positions[k];
            {
              std::unique_lock<std::mutex> lock(mutex_);
              read_cv_.wait(lock, [&] { return cancelled_.load() || q <= limit_; });
              if (cancelled_) return;
            }
            if (!tar.next(sample)) {
              const std::string why = source.exit_problem(s_->read_timeout);
              throw std::runtime_error(
                  shard.url + ": ends after " + std::to_string(k) + " samples where the index says " +
                  std::to_string(shard.samples) +
                  (why.empty() ? " (a changed shard? rebuild the index: twins shards index)" : " (" + why + ")"));
            }
            if (!needed_[static_cast<size_t>(q)]) continue;
            Raw raw;
            raw.where = shard.url + "#" + sample.key;
            raw.image_ext = sample.image_ext;
            try {
              if (sample.image.empty()) throw std::runtime_error(raw.where + ": no image member (jpg, png, webp, ...)");
              raw.label = parse_label(sample, s_->label, raw.where);
              if (s_->index.num_classes == 0) {
                raw.label = -1;
              } else if (raw.label < 0) {
                throw std::runtime_error(raw.where + ": no label (" + s_->label.str() + ") where the index has " +
                                         std::to_string(s_->index.num_classes) + " classes");
              } else if (raw.label >= s_->index.num_classes) {
                throw std::runtime_error(raw.where + ": label " + std::to_string(raw.label) +
                                         " is not below the index's " + std::to_string(s_->index.num_classes) +
                                         " classes (rebuild the index)");
              }
              raw.image = std::move(sample.image);
            } catch (const std::exception& e) {
              raw.error = e.what();
            }
            store(q, std::move(raw));
          }
        } catch (const Cancelled&) {
          throw;
        } catch (const std::runtime_error& e) {  // a failed command says why its tar broke
          const std::string why = source.exit_problem(1.0);
          if (why.empty()) throw;
          throw std::runtime_error(std::string(e.what()) + " (" + why + ")");
        }
      } catch (const Cancelled&) {
        return;
      } catch (const std::exception& e) {
        // The rest of the visit is lost: each needed sample of it becomes a bad sample.
        if (cancelled_) return;
        for (; k < visit.positions.size(); ++k) {
          const int64_t q = visit.positions[k];
          if (!needed_[static_cast<size_t>(q)]) continue;
          Raw raw;
          raw.where = shard.url;
          raw.error = std::string(e.what()) + " (sample " + std::to_string(k) + " of the shard lost)";
          store(q, std::move(raw));
        }
      }
    }
  }

  std::shared_ptr<const ShardsSettings> s_;
  EpochPlan plan_;
  int64_t read_ahead_, first_ = 0;
  std::vector<int64_t> prefix_max_;
  std::vector<bool> needed_;  // written before the threads start, then only read

  std::mutex mutex_;
  std::condition_variable read_cv_, taken_cv_;
  std::atomic<bool> cancelled_{false};
  int64_t limit_ = -1;
  std::map<int64_t, Raw> stored_;
  std::vector<std::thread> threads_;
};

class ShardDataset : public Dataset {
 public:
  explicit ShardDataset(std::shared_ptr<const ShardsSettings> s) : s_(std::move(s)) {}
  int64_t size() const override { return s_->index.samples; }
  at::Tensor image(int64_t index) const override {
    throw std::logic_error("shards: sample " + id(index) +
                           " cannot be read alone: tar shards are read as streams, through the loader");
  }
  int64_t label(int64_t) const override { return -1; }
  std::string id(int64_t index) const override {
    const auto it = std::upper_bound(s_->offsets.begin(), s_->offsets.end(), index);
    const auto shard = static_cast<size_t>(std::max<std::ptrdiff_t>(it - s_->offsets.begin() - 1, 0));
    return s_->index.shards.at(shard).url + "#" + std::to_string(index - s_->offsets[shard]);
  }
  int64_t num_classes() const override { return s_->index.num_classes; }
  std::vector<std::string> source_files() const override {
    std::vector<std::string> out;
    for (const auto& shard : s_->index.shards)
      if (!is_pipe(shard.url)) out.push_back(shard.url);
    return out;
  }
  bool streaming() const override { return true; }
  std::vector<int64_t> stream_order(const StreamPlan& p) const override {
    const EpochPlan plan = make_plan(*s_, p);
    std::vector<int64_t> out;
    out.reserve(plan.order.size());
    for (int64_t q : plan.order) out.push_back(plan.stream_sample[static_cast<size_t>(q)]);
    return out;
  }
  std::unique_ptr<EpochStream> open_epoch(const StreamPlan& p) const override {
    return std::make_unique<ShardEpochStream>(s_, make_plan(*s_, p), p);
  }

 private:
  std::shared_ptr<const ShardsSettings> s_;
};

int64_t local_size(const std::string& url) {
  if (is_pipe(url)) return -1;
  std::error_code ec;
  const auto n = fs::file_size(url, ec);
  return ec ? -1 : static_cast<int64_t>(n);
}

// ---------------------------------------------------------------------------------------------
#ifdef TWINS_HAVE_LIBARCHIVE
// The writer.
class TarWriter {
 public:
  explicit TarWriter(const std::string& path) : path_(path), temp_(io::temporary_name(path)) {
    if (!a_) throw std::bad_alloc();
    archive_write_set_format_pax_restricted(a_.get());
    archive_write_set_bytes_in_last_block(a_.get(), 1);  // no padding of the last block to 10 KiB
    if (archive_write_open_filename(a_.get(), temp_.c_str()) != ARCHIVE_OK) fail("cannot create");
  }
  ~TarWriter() {
    if (a_) {  // not finished: the temporary goes
      a_.reset();
      std::error_code ec;
      fs::remove(temp_, ec);
    }
  }
  void add(const std::string& name, const void* data, size_t size) {
    archive_entry* e = archive_entry_new();
    archive_entry_set_pathname(e, name.c_str());
    archive_entry_set_size(e, static_cast<la_int64_t>(size));
    archive_entry_set_filetype(e, AE_IFREG);
    archive_entry_set_perm(e, 0644);
    archive_entry_set_mtime(e, 0, 0);  // the same bytes for the same input
    const int r = archive_write_header(a_.get(), e);
    archive_entry_free(e);
    if (r != ARCHIVE_OK) fail("cannot write member " + name + " to");
    if (size > 0 && archive_write_data(a_.get(), data, size) != static_cast<la_ssize_t>(size))
      fail("cannot write member " + name + " to");
    bytes_ += 512 + static_cast<int64_t>((size + 511) / 512 * 512);
  }
  // Completes the tar and renames it into place (fsync first: whole or absent after a crash).
  void finish() {
    if (archive_write_close(a_.get()) != ARCHIVE_OK) fail("cannot complete");
    a_.reset();
    const int fd = ::open(temp_.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0 || ::fsync(fd) != 0) {
      const int err = errno;
      if (fd >= 0) ::close(fd);
      throw std::runtime_error(path_ + ": cannot sync (" + io::describe_errno(err) + ")");
    }
    ::close(fd);
    fs::rename(temp_, path_);
  }
  int64_t bytes() const { return bytes_; }

 private:
  [[noreturn]] void fail(const std::string& what) {
    const char* why = archive_error_string(a_.get());
    throw std::runtime_error(what + " " + path_ + " (" + (why ? why : io::describe_errno(errno)) + ")");
  }
  std::string path_, temp_;
  // Owned here, so that a constructor that throws frees it too.
  std::unique_ptr<archive, int (*)(archive*)> a_{archive_write_new(), &archive_write_free};
  int64_t bytes_ = 1024;  // the end-of-archive blocks
};

#else
class TarWriter {
 public:
  explicit TarWriter(const std::string&) { no_libarchive(); }
  void add(const std::string&, const void*, size_t) {}
  void finish() {}
  int64_t bytes() const { return 0; }
};
#endif

// "out/train-%06d.tar" -> prefix, width, zero padding, suffix.
struct ShardPattern {
  std::string prefix, suffix;
  int width = 0;
  bool zeros = false;
  static ShardPattern parse(const std::string& p) {
    ShardPattern out;
    size_t conv = std::string::npos;
    for (size_t i = 0; i < p.size(); ++i) {
      if (p[i] != '%') continue;
      if (i + 1 < p.size() && p[i + 1] == '%') {
        ++i;
        continue;
      }
      if (conv != std::string::npos) throw std::invalid_argument("--output " + p + ": more than one % conversion");
      conv = i;
    }
    if (conv == std::string::npos)
      throw std::invalid_argument("--output " + p +
                                  ": needs one integer conversion for the shard number, e.g. train-%06d.tar");
    size_t i = conv + 1;
    if (i < p.size() && p[i] == '0') out.zeros = true, ++i;
    size_t w = i;
    while (w < p.size() && std::isdigit(static_cast<unsigned char>(p[w]))) ++w;
    if (w - i > 2) throw std::invalid_argument("--output " + p + ": field width too large");
    out.width = w > i ? std::stoi(p.substr(i, w - i)) : 0;
    if (w >= p.size() || p[w] != 'd' || (w > i && !out.zeros))
      throw std::invalid_argument("--output " + p + ": the conversion must be %d or %0Nd (e.g. %06d)");
    auto unescape = [](std::string t) {
      for (size_t k = t.find("%%"); k != std::string::npos; k = t.find("%%", k + 1)) t.erase(k, 1);
      return t;
    };
    out.prefix = unescape(p.substr(0, conv));
    out.suffix = unescape(p.substr(w + 1));
    return out;
  }
  std::string number(int64_t k) const {
    std::string n = std::to_string(k);
    if (static_cast<int>(n.size()) < width) n.insert(0, static_cast<size_t>(width) - n.size(), '0');
    return n;
  }
  std::string name(int64_t k) const { return prefix + number(k) + suffix; }
};

}  // namespace

// ---------------------------------------------------------------------------------------------

std::vector<std::string> expand_urls(const std::vector<std::string>& patterns) {
  std::vector<std::string> out;
  for (const auto& p : patterns) expand_one(p, out);
  return out;
}

LabelSource LabelSource::parse(const std::string& text, const std::string& path) {
  LabelSource l;
  if (text == "cls") return l;
  if (text.rfind("json:", 0) == 0 && text.size() > 5) {
    l.json_key = text.substr(5);
    return l;
  }
  throw std::invalid_argument(path + ": \"" + text + "\": must be \"cls\" or \"json:<key>\"");
}

json ShardIndex::to_json() const {
  json list = json::array();
  for (const auto& s : shards) {
    json j = {{"url", s.url}, {"samples", s.samples}};
    if (s.bytes >= 0) j["bytes"] = s.bytes;
    list.push_back(std::move(j));
  }
  return {{"format", "twins-shard-index/1"},
          {"samples", samples},
          {"num_classes", num_classes},
          {"label", label},
          {"shards", std::move(list)}};
}

namespace {
// A count of the index: a JSON integer within int64 (a float such as 1e93, or an integer beyond
// int64, is an error rather than an undefined conversion).
int64_t index_integer(const json& v, const std::string& key) {
  if (!v.is_number_integer() || (v.is_number_unsigned() && v.get<uint64_t>() > uint64_t{INT64_MAX}))
    throw std::runtime_error("\"" + key + "\" is not an integer in int64's range: " + v.dump().substr(0, 40));
  return v.get<int64_t>();
}
}  // namespace

ShardIndex ShardIndex::from_json(const json& j, const std::string& path) {
  ShardIndex x;
  try {
    if (!j.is_object() || j.value("format", "") != "twins-shard-index/1")
      throw std::runtime_error("not a twins shard index (format twins-shard-index/1)");
    x.num_classes = index_integer(j.at("num_classes"), "num_classes");
    x.label = j.value("label", "cls");
    for (const auto& s : j.at("shards")) {
      Shard sh;
      sh.url = s.at("url").get<std::string>();
      sh.samples = index_integer(s.at("samples"), "samples");
      sh.bytes = s.contains("bytes") ? index_integer(s.at("bytes"), "bytes") : -1;
      if (sh.samples < 0) throw std::runtime_error(sh.url + ": negative sample count");
      if (sh.samples > INT64_MAX - x.samples) throw std::runtime_error(sh.url + ": the sample counts overflow");
      x.samples += sh.samples;
      x.shards.push_back(std::move(sh));
    }
    if (x.samples != index_integer(j.at("samples"), "samples"))
      throw std::runtime_error("\"samples\" is not the sum over the shards");
    if (x.num_classes < 0 || x.num_classes > kMaxClasses) throw std::runtime_error("bad num_classes");
  } catch (const json::exception& e) {
    throw std::runtime_error(path + ": malformed shard index (" + e.what() + ")");
  } catch (const std::runtime_error& e) {
    throw std::runtime_error(path + ": " + e.what());
  }
  return x;
}

ShardIndex build_shard_index(const std::vector<std::string>& urls, const IndexOptions& o) {
  if (urls.empty()) throw std::invalid_argument("shards: no urls");
  ShardIndex index;
  index.label = o.label.str();
  index.shards.resize(urls.size());
  std::vector<int64_t> max_label(urls.size(), -1);
  std::vector<std::exception_ptr> errors(urls.size());
  std::atomic<size_t> next{0};
  std::atomic<int64_t> done{0}, samples{0};
  std::mutex progress_mutex;
  auto work = [&] {
    for (size_t i; (i = next.fetch_add(1)) < urls.size();) {
      try {
        auto& shard = index.shards[i];
        shard.url = urls[i];
        shard.bytes = local_size(urls[i]);
        Source source(urls[i], o.read_timeout, nullptr);
        auto with_status = [&](const std::exception& e) {  // a failed command says why the tar broke
          const std::string why = source.exit_problem(1.0);
          return std::runtime_error(std::string(e.what()) + (why.empty() ? "" : " (" + why + ")"));
        };
        std::optional<TarReader> tar;
        try {
          tar.emplace(source, !o.label.json_key.empty());
        } catch (const std::runtime_error& e) {
          throw with_status(e);
        }
        RawSample s;
        int64_t unlabeled = 0;
        auto next = [&] {
          try {
            return tar->next(s);
          } catch (const std::runtime_error& e) {
            throw with_status(e);
          }
        };
        while (next()) {
          const std::string where = urls[i] + "#" + s.key;
          if (s.image.empty()) throw std::runtime_error(where + ": no image member (jpg, png, webp, ...)");
          const int64_t label = parse_label(s, o.label, where);
          if (label < 0) ++unlabeled;
          if (label >= 0 && unlabeled > 0)
            throw std::runtime_error(where + ": some samples have a label (" + o.label.str() + ") and others not");
          max_label[i] = std::max(max_label[i], label);
          ++shard.samples;
        }
        if (unlabeled > 0 && max_label[i] >= 0)
          throw std::runtime_error(urls[i] + ": some samples have a label (" + o.label.str() + ") and others not");
        const std::string why = source.exit_problem(o.read_timeout);
        if (!why.empty()) throw std::runtime_error(urls[i] + ": " + why);
        samples += shard.samples;
      } catch (...) {
        errors[i] = std::current_exception();
      }
      const int64_t d = ++done;
      if (o.progress) {
        std::lock_guard<std::mutex> lock(progress_mutex);
        o.progress(d, static_cast<int64_t>(urls.size()), samples.load());
      }
    }
  };
  std::vector<std::thread> pool;
  const int threads = std::max(1, std::min<int>(o.threads, static_cast<int>(urls.size())));
  for (int t = 0; t < threads; ++t) pool.emplace_back(work);
  for (auto& t : pool) t.join();
  for (const auto& e : errors)
    if (e) std::rethrow_exception(e);
  int64_t top = -1;
  bool some_labeled = false, some_unlabeled = false;
  for (size_t i = 0; i < urls.size(); ++i) {
    index.samples += index.shards[i].samples;
    top = std::max(top, max_label[i]);
    if (index.shards[i].samples > 0) (max_label[i] >= 0 ? some_labeled : some_unlabeled) = true;
  }
  if (some_labeled && some_unlabeled)
    throw std::runtime_error("shards: some shards have labels (" + o.label.str() + ") and others not");
  index.num_classes = top + 1;
  return index;
}

ShardIndex read_shard_index(const std::string& path) {
  return ShardIndex::from_json(config::read_json_file(path), path);
}

void write_shard_index(const std::string& path, const ShardIndex& index) {
  io::write_file_atomic(path, index.to_json().dump(1) + "\n");
}

std::shared_ptr<Dataset> open_shards(const json& spec, const std::string& path) {
  config::ConfigReader r(spec, path);
  r.allow("type");
  auto settings = std::make_shared<ShardsSettings>();
  std::vector<std::string> patterns;
  if (spec.contains("urls") && spec.at("urls").is_string()) {
    std::string one;
    r.get("urls", one);
    patterns.push_back(one);
  } else {
    r.get("urls", patterns);
  }
  config::require(!patterns.empty(), r.path_of("urls"),
                  "required: shard paths, brace patterns (train-{000000..000127}.tar) or pipe: commands");
  std::string index_path, label = "cls", policy = "error";
  r.get("index", index_path);
  r.get("label", label);
  r.get("shuffle_buffer", settings->shuffle_buffer);
  r.get("shards_in_flight", settings->shards_in_flight);
  r.get("read_timeout", settings->read_timeout);
  r.get("max_image_pixels", settings->max_image_pixels);
  r.get("on_bad_sample", policy);
  r.finish();
  config::require(policy == "error" || policy == "skip", r.path_of("on_bad_sample"),
                  "must be error or skip, got \"" + policy + "\"");
  config::require(settings->shuffle_buffer >= 0 && settings->shuffle_buffer <= 10000000, r.path_of("shuffle_buffer"),
                  "must be in [0, 10^7]");
  config::require(settings->shards_in_flight >= 1 && settings->shards_in_flight <= 256, r.path_of("shards_in_flight"),
                  "must be in [1, 256]");
  config::require(settings->read_timeout > 0, r.path_of("read_timeout"), "must be > 0 seconds");
  config::require(settings->max_image_pixels >= 1, r.path_of("max_image_pixels"), "must be >= 1");
  settings->label = LabelSource::parse(label, r.path_of("label"));
  std::vector<std::string> urls;
  try {
    urls = expand_urls(patterns);
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(r.path_of("urls") + ": " + e.what());
  }

  ShardIndex& index = settings->index;
  if (!index_path.empty() && fs::exists(index_path)) {
    index = read_shard_index(index_path);
    bool same = index.shards.size() == urls.size();
    for (size_t i = 0; same && i < urls.size(); ++i) same = index.shards[i].url == urls[i];
    if (!same)
      throw std::runtime_error(index_path + ": the index lists other shards than " + r.path_of("urls") +
                               " (rebuild it: twins shards index)");
    if (index.label != settings->label.str())
      throw std::runtime_error(index_path + ": the index was built with label " + index.label + ", " +
                               r.path_of("label") + " is " + settings->label.str() + " (rebuild it)");
    for (const auto& s : index.shards) {
      const int64_t now = local_size(s.url);
      if (s.bytes >= 0 && now != s.bytes)
        throw std::runtime_error(index_path + ": " + s.url + " is " +
                                 (now < 0 ? "gone" : std::to_string(now) + " bytes") + ", the index says " +
                                 std::to_string(s.bytes) + " (rebuild it: twins shards index)");
    }
  } else {
    IndexOptions o;
    o.label = settings->label;
    o.read_timeout = settings->read_timeout;
    index = build_shard_index(urls, o);
    if (!index_path.empty()) write_shard_index(index_path, index);
  }
  if (index.samples == 0) throw std::runtime_error(r.path_of("urls") + ": the shards hold no samples");
  settings->offsets.resize(index.shards.size());
  int64_t offset = 0;
  for (size_t i = 0; i < index.shards.size(); ++i) settings->offsets[i] = offset, offset += index.shards[i].samples;
  auto d = std::make_shared<ShardDataset>(std::move(settings));
  d->on_bad_sample = policy == "skip" ? OnBadSample::skip : OnBadSample::error;
  return d;
}

int64_t parse_byte_size(const std::string& text, const std::string& what) {
  size_t used = 0;
  double v = 0;
  try {
    v = std::stod(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  std::string unit = lower(text.substr(used));
  static const std::pair<const char*, double> units[] = {{"", 1},
                                                         {"b", 1},
                                                         {"kb", 1e3},
                                                         {"mb", 1e6},
                                                         {"gb", 1e9},
                                                         {"tb", 1e12},
                                                         {"k", 1024.0},
                                                         {"m", 1048576.0},
                                                         {"g", 1073741824.0},
                                                         {"kib", 1024.0},
                                                         {"mib", 1048576.0},
                                                         {"gib", 1073741824.0},
                                                         {"tib", 1099511627776.0}};
  for (const auto& [name, scale] : units)
    if (used > 0 && unit == name && v > 0 && v * scale < 9e18) return static_cast<int64_t>(v * scale);
  throw std::invalid_argument(what + ": \"" + text + "\" is not a size such as 1GB, 500MB or 64KiB");
}

CreatedShards create_shards(const Dataset& dataset, const CreateShardsOptions& o) {
  if (dataset.streaming()) throw std::invalid_argument("shards create: the input is already a stream of shards");
  const ShardPattern pattern = ShardPattern::parse(o.pattern);
  if (o.max_bytes < 1) throw std::invalid_argument("--max-size: must be positive");
  if (o.max_count < 0) throw std::invalid_argument("--max-count: must be >= 0");
  const int64_t n = dataset.size();
  std::vector<int64_t> order(static_cast<size_t>(n));
  if (o.shuffle)
    order = augment::permutation(n, augment::Rng(o.seed, 0, ~uint64_t(0), ~uint64_t(3)));
  else
    std::iota(order.begin(), order.end(), int64_t{0});
  const int key_width = std::max<int>(6, static_cast<int>(std::to_string(std::max<int64_t>(n - 1, 0)).size()));
  const fs::path folder = fs::path(pattern.prefix).parent_path();
  if (!folder.empty()) fs::create_directories(folder);

  CreatedShards out;
  out.index.label = "cls";
  out.index.num_classes = dataset.num_classes();
  std::unique_ptr<TarWriter> writer;
  int64_t in_shard = 0;
  auto close_shard = [&] {
    if (!writer) return;
    writer->finish();
    writer.reset();
    const std::string& file = out.files.back();
    out.index.shards.push_back({file, in_shard, local_size(file)});
    out.index.samples += in_shard;
  };
  for (int64_t done = 0; done < n; ++done) {
    const int64_t i = order[static_cast<size_t>(done)];
    std::string key = std::to_string(i);
    key.insert(0, static_cast<size_t>(key_width) - key.size(), '0');
    // The image: a file's own bytes when it is one twins decodes, else PNG.
    std::vector<uint8_t> bytes;
    std::string ext;
    const std::string id = dataset.id(i);
    if (!dataset.in_memory() && fs::is_regular_file(id)) {
      ext = lower(fs::path(id).extension().string());
      if (!ext.empty()) ext.erase(0, 1);
      if (ext == "jpeg") ext = "jpg";
      if (is_image_extension(ext)) {
        std::ifstream in(id, std::ios::binary);
        bytes.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
        if (!in.good() && !in.eof()) throw std::runtime_error(id + ": cannot read");
        const auto size = image_header_size(bytes.data(), bytes.size());
        if (size.first <= 0)
          throw std::runtime_error(id + ": not an image file of a format twins decodes (or cut short)");
      }
    }
    if (bytes.empty()) {
      ext = "png";
      const at::Tensor img = dataset.image(i).contiguous();
      const int c = static_cast<int>(img.size(2));
      cv::Mat m(static_cast<int>(img.size(0)), static_cast<int>(img.size(1)), c == 1 ? CV_8UC1 : CV_8UC3,
                img.data_ptr());
      cv::Mat bgr;
      if (c == 3) cv::cvtColor(m, bgr, cv::COLOR_RGB2BGR);
      if (!cv::imencode(".png", c == 3 ? bgr : m, bytes)) throw std::runtime_error(id + ": cannot encode as PNG");
    }
    const int64_t label = dataset.label(i);
    const std::string cls = label >= 0 ? std::to_string(label) : "";
    const int64_t sample_bytes =
        512 + static_cast<int64_t>((bytes.size() + 511) / 512 * 512) + (cls.empty() ? 0 : 1024);
    if (writer && ((o.max_count > 0 && in_shard >= o.max_count) || writer->bytes() + sample_bytes > o.max_bytes))
      close_shard();
    if (!writer) {
      out.files.push_back(pattern.name(static_cast<int64_t>(out.files.size())));
      writer = std::make_unique<TarWriter>(out.files.back());
      in_shard = 0;
    }
    writer->add(key + "." + ext, bytes.data(), bytes.size());
    if (!cls.empty()) writer->add(key + ".cls", cls.data(), cls.size());
    ++in_shard;
    if (o.progress && ((done + 1) % 256 == 0 || done + 1 == n)) o.progress(done + 1, n);
  }
  close_shard();
  out.urls = out.files.size() == 1
                 ? out.files.front()
                 : pattern.prefix + "{" + pattern.number(0) + ".." +
                       pattern.number(static_cast<int64_t>(out.files.size()) - 1) + "}" + pattern.suffix;
  out.index_path = o.index_path.empty() ? pattern.prefix + "index.json" : o.index_path;
  write_shard_index(out.index_path, out.index);
  return out;
}

}  // namespace twins::data

#pragma once
// Files twins writes are whole or absent. Every file goes through one atomic writer (a
// temporary beside it, fsync, rename, fsync of the folder) or is appended with every write
// checked; a full disk (ENOSPC) or a file-size limit (EFBIG) is an error naming the file, never a
// truncated file and an exit code of 0. The `twins` command ignores SIGXFSZ, so a size limit
// reaches these checks instead of killing the process.
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace twins::io {

/// Writes the concatenation of `parts` to `path` atomically: a crash or a failure leaves the old
/// file (or none) and no temporary. Throws std::runtime_error naming the file and the reason.
void write_file_atomic(const std::string& path, const std::vector<std::string_view>& parts);
inline void write_file_atomic(const std::string& path, std::string_view data) {
  write_file_atomic(path, std::vector<std::string_view>{data});
}
/// write_file_atomic(path, {"a", "b"}): C++20's string_view also takes {"a", "b"} (an iterator
/// pair), which would make that call ambiguous without this overload.
inline void write_file_atomic(const std::string& path, std::initializer_list<std::string_view> parts) {
  write_file_atomic(path, std::vector<std::string_view>(parts));
}

/// A file appended to (created if absent), each append written whole or an exception.
class AppendFile {
 public:
  explicit AppendFile(const std::string& path);
  ~AppendFile();
  AppendFile(const AppendFile&) = delete;
  AppendFile& operator=(const AppendFile&) = delete;
  /// Appends `text`; throws std::runtime_error naming the file on a failed or short write.
  void append(std::string_view text);
  /// Forces what was appended to the disk (fdatasync); throws on failure.
  void sync();

 private:
  std::string path_;
  int fd_ = -1;
};

/// An exclusive lock on a folder (flock on `<dir>/.lock`, which records the holder's pid),
/// held while the object lives; the kernel releases it when the process dies, however it dies.
class FolderLock {
 public:
  /// Creates `dir` if needed. Throws std::runtime_error at once if another process holds the
  /// lock (naming its pid) or the folder cannot be written.
  explicit FolderLock(const std::string& dir);
  ~FolderLock();
  FolderLock(const FolderLock&) = delete;
  FolderLock& operator=(const FolderLock&) = delete;

 private:
  int fd_ = -1;
};

/// An exclusive lock on the file `path` (flock; the file is created if absent), taken if free and
/// held while the object lives; the kernel releases it when the process dies, however it dies.
/// The lock is on the file that `path` names when taken: one its holder removed meanwhile is
/// opened anew, so that a holder may remove it while it holds it.
class FileLock {
 public:
  /// Throws std::runtime_error naming the file if it cannot be created or locked (a file system
  /// without locks).
  explicit FileLock(const std::string& path);
  ~FileLock();
  FileLock(const FileLock&) = delete;
  FileLock& operator=(const FileLock&) = delete;
  /// False when another process holds the lock.
  bool held() const { return held_; }

 private:
  int fd_ = -1;
  bool held_ = false;
};

/// Rows of a fixed size appended to a file after a header, for long work a crash must not lose
/// (`twins embed`'s output, the evaluations' features). A state beside it (<path>.json: {"key",
/// "rows_done"}) counts the rows known to be on disk: it is written, atomically, only after they
/// are synced, and rewritten before the file is cut back, so that it never claims rows the file
/// lost. A process killed at any point, opening the same path with the same key, continues there.
/// The key must determine the header and the row size (they are not compared). One process at a
/// time per path (hold a FileLock).
class RowFile {
 public:
  enum class Opened { fresh, continued, started_over };
  /// Continues at the rows the state claims, rounded down to a multiple of `align` (but
  /// `max_rows` itself), when its key is `key`, that count is in [0, max_rows] and the file holds
  /// them; otherwise starts anew: `header` alone (started_over when a state was there).
  RowFile(const std::string& path, std::string_view header, size_t row_bytes, const std::string& key, int64_t max_rows,
          int64_t align);
  /// The rows another RowFile saved at `path` under `key`, for reading only: nothing is written
  /// (append and save throw). Throws std::runtime_error naming the file when its state is
  /// missing, unreadable or of another key, or claims rows the file lacks.
  static RowFile saved(const std::string& path, size_t header_bytes, size_t row_bytes, const std::string& key);
  RowFile(const RowFile&) = delete;
  RowFile& operator=(const RowFile&) = delete;
  Opened opened() const { return opened_; }
  /// Rows in the file: those continued and those appended since.
  int64_t rows() const { return rows_; }
  /// Appends `count` rows: count x row_bytes bytes.
  void append(std::string_view bytes, int64_t count);
  /// Syncs the rows appended, then records them in the state.
  void save();
  /// save() when the last save (or the opening) is at least `seconds` old.
  void save_every(double seconds);
  /// Reads rows [first, first + count), which are in the file, into `out`.
  void read(int64_t first, int64_t count, char* out) const;
  const std::string& path() const { return path_; }
  /// <path>.json
  std::string state_path() const { return state_path_for(path_); }
  static std::string state_path_for(const std::string& path) { return path + ".json"; }

 private:
  std::string path_, key_;
  size_t header_bytes_, row_bytes_;
  int64_t rows_ = 0;
  Opened opened_ = Opened::fresh;
  std::chrono::steady_clock::time_point last_save_ = std::chrono::steady_clock::now();
  std::unique_ptr<AppendFile> out_;  // null: read only
  RowFile(std::string path, std::string key, size_t header_bytes, size_t row_bytes, int64_t rows);
  void write_state() const;
};

/// The RowFile of rank `rank` of a job of `world` ranks writing for `stem` (a path):
/// <stem>.rank<rank>-of-<world>.partial, a name remove_unheld_rows knows.
inline std::string rank_rows_path(const std::string& stem, int64_t rank, int64_t world) {
  return stem + ".rank" + std::to_string(rank) + "-of-" + std::to_string(world) + ".partial";
}

/// Removes the RowFiles in `dir` ("": the current folder) named `<stem>.partial` or
/// `<stem>.rank<r>-of-<W>.partial` (a job's ranks'), with their states (<path>.json) and locks
/// (<path>.lock), any of the three found, whose FileLock no process holds: what runs that were
/// killed, or continued on another number of ranks, leave. Files that cannot be locked or
/// removed are left. Returns how many RowFiles went.
int remove_unheld_rows(const std::string& dir, const std::string& stem);

/// The temporary file name write_file_atomic uses for `path` in this process.
std::string temporary_name(const std::string& path);
/// Removes the temporaries that interrupted atomic writes left in `dir` (<name>.tmp-<pid>);
/// call it while holding the folder's lock. Returns how many were removed.
int remove_stale_temporaries(const std::string& dir);
/// Throws std::runtime_error naming `dir` unless a file can be created and written in it.
void check_writable(const std::string& dir);
/// strerror(err), with what to do for a full disk or a file-size limit.
std::string describe_errno(int err);

/// zlib's CRC-32 `crc` continued over `size` bytes at `data`, of any size (zlib itself takes
/// 32-bit lengths); a new checksum starts from 0.
unsigned long crc32_update(unsigned long crc, const void* data, size_t size);
/// The same over a string's bytes.
inline unsigned long crc32_update(unsigned long crc, std::string_view text) {
  return crc32_update(crc, text.data(), text.size());
}

/// Fault injection for the crash tests: when the environment variable TWINS_FAULT is
/// "<point>@<subject substring>#<n>", the n-th time `point` is reached for a subject containing
/// the substring, the process kills itself with SIGKILL (as a power cut or the OOM killer
/// would); with ":TERM" after n it sends itself SIGTERM instead, and in a rank that
/// `--nproc-per-node` started, its launcher (while alive) too, which forwards it to every rank (as a terminal's
/// Ctrl-C or a scheduler's preemption reaches every process of a job). Points: "partial" (half
/// of an atomic write on disk), "before_rename" and "after_rename" (subject: the file), "step"
/// (pretraining's step number), "finetune_batch" and "probe_batch" (fine-tuning's and
/// probe.augment's batch number over the run, after the batch), "embed_batch" (`twins embed`'s
/// rows file and batch number in this call, "<file>, batch <n>", after its rows are written),
/// "embed_assemble" (rank 0 of a `twins embed` on several ranks, "rank <r>", after copying that
/// rank's rows into the output), "embed_renamed" (`twins embed`'s output, between renaming the
/// .npy and the ids), "features_batch" (the evaluations' feature extraction kept on
/// disk, "<split> features[ (rank r of W)], batch <n>", after the batch's rows are written).
/// Without TWINS_FAULT this does nothing.
void fault_point(const char* point, const std::string& subject);

}  // namespace twins::io

#include "twins/io.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>
#include <stdexcept>

namespace twins::io {
namespace fs = std::filesystem;

unsigned long crc32_update(unsigned long crc, const void* data, size_t size) {
  const auto* bytes = static_cast<const Bytef*>(data);
  while (size > 0) {
    const uInt piece = static_cast<uInt>(std::min<size_t>(size, size_t{1} << 30));
    crc = crc32(crc, bytes, piece);
    bytes += piece, size -= piece;
  }
  return crc;
}

std::string describe_errno(int err) {
  std::string s = std::strerror(err);
  if (err == ENOSPC) s += ": the disk is full";
  if (err == EFBIG) s += ": the file exceeds the size limit of this process or file system (ulimit -f)";
  if (err == EDQUOT) s += ": the disk quota is exhausted";
  return s;
}

namespace {

void write_all(int fd, std::string_view data, const std::string& path) {
  const char* p = data.data();
  size_t n = data.size();
  while (n > 0) {
    const ssize_t w = ::write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      throw std::runtime_error(path + ": write failed (" + describe_errno(errno) + ")");
    }
    p += w, n -= static_cast<size_t>(w);
  }
}

void sync_folder_of(const std::string& path) {
  const std::string dir = fs::path(path).parent_path().string();
  const int dfd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_CLOEXEC);
  if (dfd >= 0) ::fsync(dfd), ::close(dfd);
}

}  // namespace

void fault_point(const char* point, const std::string& subject) {
  struct Fault {
    std::string point, subject;
    int64_t n = 0, hits = 0;
    bool term = false;  // SIGTERM (to this process and twins' launcher), else SIGKILL
  };
  static Fault* fault = []() -> Fault* {
    const char* spec = std::getenv("TWINS_FAULT");
    if (!spec) return nullptr;
    std::string s = spec;
    const bool term = s.size() > 5 && s.compare(s.size() - 5, 5, ":TERM") == 0;
    if (term) s.resize(s.size() - 5);
    const size_t at = s.find('@'), hash = s.rfind('#');
    if (at == std::string::npos || hash == std::string::npos || hash < at) return nullptr;
    auto* f = new Fault{s.substr(0, at), s.substr(at + 1, hash - at - 1), std::atoll(s.c_str() + hash + 1), 0, term};
    return f;
  }();
  if (!fault || fault->point != point || subject.find(fault->subject) == std::string::npos) return;
  if (++fault->hits != fault->n) return;
  if (!fault->term) {
    ::kill(::getpid(), SIGKILL);
    return;
  }
  ::kill(::getpid(), SIGTERM);
  // A rank of `--nproc-per-node` (its launcher set TWINS_LAUNCHER_PID) whose launcher is alive:
  // the launcher too, which forwards it to every rank, as a terminal's Ctrl-C or a scheduler
  // reaches every process of a job.
  const char* launcher = std::getenv("TWINS_LAUNCHER_PID");
  if (launcher && std::atoll(launcher) == static_cast<long long>(::getppid())) ::kill(::getppid(), SIGTERM);
}

std::string temporary_name(const std::string& path) { return path + ".tmp-" + std::to_string(::getpid()); }

void write_file_atomic(const std::string& path, const std::vector<std::string_view>& parts) {
  const std::string tmp = temporary_name(path);
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) throw std::runtime_error(path + ": cannot write (" + describe_errno(errno) + ")");
  try {
    for (size_t k = 0; k < parts.size(); ++k) {
      write_all(fd, parts[k], path);
      if (k == (parts.size() - 1) / 2) fault_point("partial", path);  // e.g. the header, not the data
    }
    if (::fsync(fd) != 0) throw std::runtime_error(path + ": cannot flush to disk (" + describe_errno(errno) + ")");
  } catch (...) {
    ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  if (::close(fd) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    throw std::runtime_error(path + ": cannot flush to disk (" + describe_errno(err) + ")");
  }
  fault_point("before_rename", path);
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    throw std::runtime_error(path + ": cannot rename into place (" + describe_errno(err) + ")");
  }
  sync_folder_of(path);  // makes the rename itself durable
  fault_point("after_rename", path);
}

AppendFile::AppendFile(const std::string& path) : path_(path) {
  fd_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (fd_ < 0) throw std::runtime_error(path + ": cannot write (" + describe_errno(errno) + ")");
}

AppendFile::~AppendFile() {
  if (fd_ >= 0) ::close(fd_);
}

void AppendFile::append(std::string_view text) { write_all(fd_, text, path_); }

void AppendFile::sync() {
  if (::fdatasync(fd_) != 0) throw std::runtime_error(path_ + ": cannot flush to disk (" + describe_errno(errno) + ")");
}

FolderLock::FolderLock(const std::string& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw std::runtime_error(dir + ": cannot create the folder (" + ec.message() + ")");
  const std::string path = (fs::path(dir) / ".lock").string();
  fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd_ < 0) throw std::runtime_error(dir + ": cannot write in this folder (" + describe_errno(errno) + ")");
  if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
    char holder[32] = {0};
    const ssize_t n = ::pread(fd_, holder, sizeof holder - 1, 0);
    ::close(fd_);
    fd_ = -1;
    throw std::runtime_error(dir + ": in use by another twins process" +
                             (n > 0 ? " (pid " + std::string(holder, static_cast<size_t>(n)) + ")" : std::string()) +
                             "; wait for it to finish, or choose another folder");
  }
  const std::string pid = std::to_string(::getpid());
  if (::ftruncate(fd_, 0) != 0 || ::pwrite(fd_, pid.data(), pid.size(), 0) != static_cast<ssize_t>(pid.size())) {
    const int err = errno;
    ::close(fd_);
    fd_ = -1;
    throw std::runtime_error(dir + ": cannot write in this folder (" + describe_errno(err) + ")");
  }
}

FolderLock::~FolderLock() {
  if (fd_ >= 0) ::close(fd_);  // releases the flock
}

FileLock::FileLock(const std::string& path) {
  for (int attempt = 0; attempt < 100; ++attempt) {
    fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd_ < 0) throw std::runtime_error(path + ": cannot create (" + describe_errno(errno) + ")");
    if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
      const int err = errno;
      if (err == EWOULDBLOCK) return;  // held by another process
      ::close(fd_);
      fd_ = -1;
      throw std::runtime_error(path + ": cannot lock (" + describe_errno(err) + ")");
    }
    // Locked: still the file `path` names? (Its holder may have removed it between our open and
    // our lock; a third process would then lock a new one.)
    struct stat mine {};
    struct stat named {};
    if (::fstat(fd_, &mine) != 0 || (::stat(path.c_str(), &named) != 0 && errno != ENOENT)) {
      const int err = errno;
      ::close(fd_);
      fd_ = -1;
      throw std::runtime_error(path + ": cannot lock (" + describe_errno(err) + ")");
    }
    if (mine.st_dev == named.st_dev && mine.st_ino == named.st_ino) {
      held_ = true;
      return;
    }
    ::close(fd_);  // removed (ENOENT) or replaced: lock the file the path names now
    fd_ = -1;
  }
  throw std::runtime_error(path + ": cannot lock (removed again and again while being locked)");
}

FileLock::~FileLock() {
  if (fd_ >= 0) ::close(fd_);  // releases the flock
}

RowFile::RowFile(const std::string& path, std::string_view header, size_t row_bytes, const std::string& key,
                 int64_t max_rows, int64_t align)
    : path_(path), key_(key), header_bytes_(header.size()), row_bytes_(row_bytes) {
  if (row_bytes < 1 || max_rows < 0 || align < 1)
    throw std::invalid_argument(path + ": rows of " + std::to_string(row_bytes) + " bytes, at most " +
                                std::to_string(max_rows) + ", aligned to " + std::to_string(align));
  std::error_code ec;
  if (fs::exists(state_path(), ec)) {
    opened_ = Opened::started_over;
    std::ifstream in(state_path());
    const nlohmann::json state = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
    const nlohmann::json rows = state.is_object() ? state.value("rows_done", nlohmann::json()) : nlohmann::json();
    const auto size = fs::file_size(path, ec);
    if (state.is_object() && state.value("key", nlohmann::json()) == key && rows.is_number_integer() &&
        rows.get<int64_t>() >= 0 && rows.get<int64_t>() <= max_rows && !ec && size >= header_bytes_ &&
        (size - header_bytes_) / row_bytes >= static_cast<uintmax_t>(rows.get<int64_t>())) {
      rows_ = rows.get<int64_t>() == max_rows ? max_rows : rows.get<int64_t>() / align * align;
      opened_ = Opened::continued;
    }
  }
  write_state();  // first, so that it never claims rows the file no longer has
  if (rows_ == 0)
    write_file_atomic(path, header);
  else
    fs::resize_file(path, header_bytes_ + static_cast<uintmax_t>(rows_) * row_bytes_);  // rows past it: redone
  out_ = std::make_unique<AppendFile>(path);
}

RowFile::RowFile(std::string path, std::string key, size_t header_bytes, size_t row_bytes, int64_t rows)
    : path_(std::move(path)), key_(std::move(key)), header_bytes_(header_bytes), row_bytes_(row_bytes), rows_(rows) {
  opened_ = Opened::continued;
}

RowFile RowFile::saved(const std::string& path, size_t header_bytes, size_t row_bytes, const std::string& key) {
  if (row_bytes < 1) throw std::invalid_argument(path + ": rows of 0 bytes");
  std::ifstream in(state_path_for(path));
  if (!in) throw std::runtime_error(state_path_for(path) + ": cannot open (" + describe_errno(errno) + ")");
  const nlohmann::json state = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  const nlohmann::json rows = state.is_object() ? state.value("rows_done", nlohmann::json()) : nlohmann::json();
  if (!state.is_object() || state.value("key", nlohmann::json()) != key || !rows.is_number_integer() ||
      rows.get<int64_t>() < 0)
    throw std::runtime_error(state_path_for(path) + ": not the state of these rows");
  std::error_code ec;
  const auto size = fs::file_size(path, ec);
  if (ec) throw std::runtime_error(path + ": cannot read (" + ec.message() + ")");
  if (size < header_bytes || (size - header_bytes) / row_bytes < static_cast<uintmax_t>(rows.get<int64_t>()))
    throw std::runtime_error(path + ": holds fewer rows than its state claims (" + std::to_string(rows.get<int64_t>()) +
                             ")");
  return RowFile(path, key, header_bytes, row_bytes, rows.get<int64_t>());
}

void RowFile::append(std::string_view bytes, int64_t count) {
  if (!out_) throw std::logic_error(path_ + ": opened for reading only");
  if (count < 0 || bytes.size() % row_bytes_ != 0 || bytes.size() / row_bytes_ != static_cast<size_t>(count))
    throw std::invalid_argument(path_ + ": " + std::to_string(bytes.size()) + " bytes for " + std::to_string(count) +
                                " rows of " + std::to_string(row_bytes_));
  out_->append(bytes);
  rows_ += count;
}

void RowFile::save() {
  if (!out_) throw std::logic_error(path_ + ": opened for reading only");
  out_->sync();  // the rows first, then the count that claims them
  write_state();
  last_save_ = std::chrono::steady_clock::now();
}

void RowFile::save_every(double seconds) {
  if (std::chrono::duration<double>(std::chrono::steady_clock::now() - last_save_).count() >= seconds) save();
}

void RowFile::read(int64_t first, int64_t count, char* out) const {
  if (first < 0 || count < 0 || first > rows_ || count > rows_ - first)
    throw std::invalid_argument(path_ + ": rows " + std::to_string(first) + " to " + std::to_string(first + count) +
                                " of " + std::to_string(rows_));
  std::ifstream in(path_, std::ios::binary);
  in.seekg(static_cast<std::streamoff>(header_bytes_ + static_cast<size_t>(first) * row_bytes_));
  if (!in.read(out, static_cast<std::streamsize>(static_cast<size_t>(count) * row_bytes_)))
    throw std::runtime_error(path_ + ": cannot read rows " + std::to_string(first) + " to " +
                             std::to_string(first + count) + " back");
}

void RowFile::write_state() const {
  write_file_atomic(state_path(), nlohmann::json{{"key", key_}, {"rows_done", rows_}}.dump() + "\n");
}

int remove_unheld_rows(const std::string& dir, const std::string& stem) {
  const fs::path folder = dir.empty() ? fs::path(".") : fs::path(dir);
  std::error_code ec;
  std::set<std::string> found;  // the RowFiles' paths
  for (fs::directory_iterator it(folder, ec), end; !ec && it != end; it.increment(ec)) {
    std::string name = it->path().filename().string();
    for (const std::string_view suffix : {".json", ".lock"})
      if (name.size() > suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0)
        name.resize(name.size() - suffix.size());
    if (name.size() <= stem.size() || name.compare(0, stem.size(), stem) != 0) continue;
    static const std::regex rest(R"(\.(rank[0-9]+-of-[0-9]+\.)?partial)");
    if (std::regex_match(name.substr(stem.size()), rest)) found.insert((folder / name).string());
  }
  int removed = 0;
  for (const std::string& rows : found) try {
      const FileLock lock(rows + ".lock");
      if (!lock.held()) continue;
      for (const std::string& file : {RowFile::state_path_for(rows), rows, rows + ".lock"}) fs::remove(file, ec);
      ++removed;
    } catch (const std::exception&) {  // (left as they are)
    }
  return removed;
}

int remove_stale_temporaries(const std::string& dir) {
  static const std::regex pattern(R"(.+\.tmp-[0-9]+$)");
  int removed = 0;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return 0;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    if (!e.is_regular_file(ec) || !std::regex_match(e.path().filename().string(), pattern)) continue;
    if (fs::remove(e.path(), ec)) ++removed;
  }
  return removed;
}

void check_writable(const std::string& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw std::runtime_error(dir + ": cannot create the folder (" + ec.message() + ")");
  const std::string probe = (fs::path(dir) / ".write-test").string();
  write_file_atomic(probe, std::string_view("twins"));
  fs::remove(probe, ec);
}

}  // namespace twins::io

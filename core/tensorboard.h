#pragma once
// TensorBoard's event files (`tensorboard --logdir runs/`), scalars only, written without
// TensorFlow or protobuf: a TFRecord stream (length, masked CRC-32C, data, masked CRC-32C) of
// Event protocol buffers {wall_time = 1 (double), step = 2 (int64), file_version = 3 (string),
// summary = 5 {repeated value = 1 {tag = 1 (string), simple_value = 2 (float)}},
// session_log = 7 {status = 1 (START = 1)}}.
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "twins/io.h"

namespace twins::detail {

/// CRC-32C (Castagnoli), as TFRecord frames use it; crc32c("123456789") == 0xE3069283.
uint32_t crc32c(std::string_view bytes);

/// One TFRecord frame around `data`.
std::string tfrecord(std::string_view data);

/// An Event holding scalars at `step`, serialised.
std::string scalar_event(double wall_time, int64_t step, const std::vector<std::pair<std::string, double>>& scalars);

/// An events file in `dir` (events.out.tfevents.<seconds>.<host>.<pid>.<n>.twins, a new one per
/// object, as TensorBoard's own writers do) whose scalars start at `first_step`; every append
/// checked like metrics.jsonl's.
class EventFile {
 public:
  EventFile(const std::string& dir, int64_t first_step);
  void scalars(int64_t step, const std::vector<std::pair<std::string, double>>& values);
  void sync() { file_->sync(); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  std::unique_ptr<io::AppendFile> file_;
};

}  // namespace twins::detail

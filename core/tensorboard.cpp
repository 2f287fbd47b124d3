#include "core/tensorboard.h"

#include <unistd.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstring>
#include <limits>

namespace twins::detail {
namespace {

const std::array<uint32_t, 256>& crc32c_table() {
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;  // reflected Castagnoli
      t[i] = c;
    }
    return t;
  }();
  return table;
}

// TFRecord's masked CRC: rotated right by 15 bits plus a constant.
uint32_t masked_crc(std::string_view bytes) {
  const uint32_t c = crc32c(bytes);
  return ((c >> 15) | (c << 17)) + 0xA282EAD8u;
}

void put_le(std::string& out, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
}

void put_varint(std::string& out, uint64_t v) {
  while (v >= 0x80) out.push_back(static_cast<char>((v & 0x7F) | 0x80)), v >>= 7;
  out.push_back(static_cast<char>(v));
}

// Protocol-buffer fields: (number << 3) | wire type (0 varint, 1 64-bit, 2 length-delimited, 5 32-bit).
void put_key(std::string& out, int field, int wire) { put_varint(out, static_cast<uint64_t>(field << 3 | wire)); }

void put_bytes(std::string& out, int field, std::string_view bytes) {
  put_key(out, field, 2);
  put_varint(out, bytes.size());
  out.append(bytes);
}

void put_double(std::string& out, int field, double v) {
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof bits);
  put_key(out, field, 1);
  put_le(out, bits, 8);
}

void put_float(std::string& out, int field, float v) {
  uint32_t bits = 0;
  std::memcpy(&bits, &v, sizeof bits);
  put_key(out, field, 5);
  put_le(out, bits, 4);
}

std::string event_header(double wall_time, int64_t step) {
  std::string e;
  put_double(e, 1, wall_time);
  put_key(e, 2, 0);
  put_varint(e, static_cast<uint64_t>(step));
  return e;
}

double now() { return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count(); }

}  // namespace

uint32_t crc32c(std::string_view bytes) {
  const auto& t = crc32c_table();
  uint32_t c = 0xFFFFFFFFu;
  for (const char b : bytes) c = t[(c ^ static_cast<uint8_t>(b)) & 0xFF] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

std::string tfrecord(std::string_view data) {
  std::string length;
  put_le(length, data.size(), 8);
  std::string out = length;
  put_le(out, masked_crc(length), 4);
  out.append(data);
  put_le(out, masked_crc(data), 4);
  return out;
}

std::string scalar_event(double wall_time, int64_t step, const std::vector<std::pair<std::string, double>>& scalars) {
  std::string summary;
  for (const auto& [tag, value] : scalars) {
    std::string v;
    put_bytes(v, 1, tag);
    // Beyond float's range: the infinity of its sign (a plain conversion would be undefined).
    const double limit = std::numeric_limits<float>::max();
    put_float(v, 2,
              value > limit    ? std::numeric_limits<float>::infinity()
              : value < -limit ? -std::numeric_limits<float>::infinity()
                               : static_cast<float>(value));
    put_bytes(summary, 1, v);
  }
  std::string e = event_header(wall_time, step);
  put_bytes(e, 5, summary);
  return e;
}

EventFile::EventFile(const std::string& dir, int64_t first_step) {
  char host[256] = {0};
  if (::gethostname(host, sizeof host - 1) != 0 || !host[0]) std::strcpy(host, "localhost");
  const double t = now();
  // A number of its own for each file of this process, as TensorBoard's writers add: two files
  // opened in the same second (a run resumed within a process) must not be one.
  static std::atomic<int64_t> files{0};
  path_ = dir + "/events.out.tfevents." + std::to_string(static_cast<int64_t>(t)) + "." + host + "." +
          std::to_string(::getpid()) + "." + std::to_string(files++) + ".twins";
  file_ = std::make_unique<io::AppendFile>(path_);
  std::string first = event_header(t, 0);
  put_bytes(first, 3, "brain.Event:2");
  // SessionLog{status: START}: TensorBoard drops what earlier files logged from first_step on
  // (the steps a crashed run logged after its last checkpoint, which a resumed run logs again).
  std::string start = event_header(t, first_step), session;
  put_key(session, 1, 0);
  put_varint(session, 1);
  put_bytes(start, 7, session);
  file_->append(tfrecord(first) + tfrecord(start));
}

void EventFile::scalars(int64_t step, const std::vector<std::pair<std::string, double>>& values) {
  if (!values.empty()) file_->append(tfrecord(scalar_event(now(), step, values)));
}

}  // namespace twins::detail

#include "twins/models/safetensors.h"

#include <ATen/ATen.h>
#include <fcntl.h>
#include <unistd.h>
#include <zlib.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string_view>

#include "twins/config.h"
#include "twins/io.h"

namespace twins::models {
namespace {

const std::vector<std::pair<std::string, at::ScalarType>>& dtypes() {
  static const std::vector<std::pair<std::string, at::ScalarType>> d = {
      {"F64", at::kDouble}, {"F32", at::kFloat}, {"F16", at::kHalf}, {"BF16", at::kBFloat16}, {"I64", at::kLong},
      {"I32", at::kInt},    {"I16", at::kShort}, {"I8", at::kChar},  {"U8", at::kByte},       {"BOOL", at::kBool}};
  return d;
}

std::string dtype_name(at::ScalarType t) {
  for (const auto& [name, type] : dtypes())
    if (type == t) return name;
  throw std::invalid_argument(std::string("safetensors: unsupported dtype ") + c10::toString(t));
}

// Metadata keys of the checksum: twins 0.2 covers header and data, twins 0.1 the data only.
constexpr const char* kChecksumKey = "twins_checksum";
constexpr const char* kChecksumPrefix = "crc32:";
constexpr const char* kLegacyChecksumKey = "twins_crc32";
// The safetensors library's limits.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;
constexpr size_t kMaxDims = 16;

// Where the 8 hex digits of the checksum stand in the header text (npos: absent). The compact
// JSON of a string map can hold `"key":"` only as a real key: quotes inside strings are escaped.
size_t checksum_digits(const std::string& text) {
  const std::string pattern = std::string("\"") + kChecksumKey + "\":\"" + kChecksumPrefix;
  const size_t at = text.find(pattern);
  if (at == std::string::npos || at + pattern.size() + 8 > text.size()) return std::string::npos;
  return at + pattern.size();
}

}  // namespace

const at::Tensor& SafeTensorsFile::at(const std::string& name) const {
  for (const auto& t : tensors)
    if (t.first == name) return t.second;
  throw std::out_of_range("safetensors: no tensor named " + name);
}

bool SafeTensorsFile::contains(const std::string& name) const {
  for (const auto& t : tensors)
    if (t.first == name) return true;
  return false;
}

void save_safetensors(const std::string& path, const NamedTensors& tensors,
                      std::map<std::string, std::string> metadata) {
  std::vector<at::Tensor> cpu;
  nlohmann::ordered_json header;
  uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    if (name == "__metadata__") throw std::invalid_argument("safetensors: reserved tensor name __metadata__");
    at::Tensor c = t.detach().to(at::kCPU).contiguous();
    const uint64_t bytes = static_cast<uint64_t>(c.numel()) * c.element_size();
    header[name] = {
        {"dtype", dtype_name(c.scalar_type())}, {"shape", c.sizes().vec()}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
    cpu.push_back(std::move(c));
  }
  std::vector<uint8_t> data(offset);
  uint64_t at_ = 0;
  for (const auto& c : cpu) {
    const size_t bytes = static_cast<size_t>(c.numel()) * c.element_size();
    if (bytes) std::memcpy(data.data() + at_, c.data_ptr(), bytes);
    at_ += bytes;
  }
  // The checksum covers the header and the data: written as a placeholder of the same length,
  // computed over the whole file, then put in place of the placeholder.
  metadata.erase(kLegacyChecksumKey);
  metadata[kChecksumKey] = std::string(kChecksumPrefix) + "00000000";
  nlohmann::ordered_json meta = nlohmann::ordered_json::object();
  for (const auto& [k, v] : metadata) meta[k] = v;
  nlohmann::ordered_json full = {{"__metadata__", meta}};
  for (auto& item : header.items()) full[item.key()] = item.value();
  std::string text = full.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // the data starts 8-byte aligned
  const size_t digits = checksum_digits(text);
  std::string length(8, '\0');
  for (int i = 0; i < 8; ++i) length[i] = static_cast<char>(static_cast<uint64_t>(text.size()) >> (8 * i));
  uLong crc = crc32(0L, Z_NULL, 0);
  crc = io::crc32_update(crc, reinterpret_cast<const uint8_t*>(length.data()), 8);
  crc = io::crc32_update(crc, reinterpret_cast<const uint8_t*>(text.data()), text.size());
  crc = io::crc32_update(crc, data.data(), data.size());
  char hex[16];
  std::snprintf(hex, sizeof hex, "%08lx", static_cast<unsigned long>(crc));
  text.replace(digits, 8, hex);
  io::write_file_atomic(path,
                        {length, text, std::string_view(reinterpret_cast<const char*>(data.data()), data.size())});
}

SafeTensorsFile parse_safetensors(const uint8_t* bytes, size_t size, const std::string& name) {
  auto fail = [&](const std::string& what) -> std::runtime_error {
    return std::runtime_error(name + ": not a valid safetensors file: " + what);
  };
  if (size < 8) throw fail("shorter than the 8-byte header length");
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= static_cast<uint64_t>(bytes[i]) << (8 * i);
  if (n > size - 8)
    throw fail("header length " + std::to_string(n) + " exceeds the file size " + std::to_string(size) +
               " (truncated?)");
  if (n > kMaxHeaderBytes)
    throw fail("header length " + std::to_string(n) + " above the format's limit of " +
               std::to_string(kMaxHeaderBytes));
  const std::string_view text(reinterpret_cast<const char*>(bytes) + 8, n);
  if (n == 0 || text[0] != '{') throw fail("the header does not start with '{'");
  nlohmann::json header;
  try {
    header = config::parse_json(text, "header");
  } catch (const std::invalid_argument& e) {
    throw fail(std::string("header is not JSON (") + e.what() + ")");
  }
  if (!header.is_object()) throw fail("header is not a JSON object");
  const uint8_t* data = bytes + 8 + n;
  const uint64_t data_size = size - 8 - n;

  SafeTensorsFile out;
  if (header.contains("__metadata__")) {
    const auto& meta = header["__metadata__"];
    if (!meta.is_object()) throw fail("__metadata__ is not an object");
    for (const auto& item : meta.items()) {
      if (!item.value().is_string()) throw fail("__metadata__." + item.key() + " is not a string");
      out.metadata[item.key()] = item.value().get<std::string>();
    }
  }
  if (out.metadata.count(kChecksumKey)) {  // header and data
    const std::string stored = out.metadata.at(kChecksumKey);
    std::string placeholder(text);
    const size_t digits = checksum_digits(placeholder);
    if (digits == std::string::npos ||
        placeholder.compare(digits - std::strlen(kChecksumPrefix), stored.size(), stored) != 0)
      throw fail(std::string(kChecksumKey) + " is malformed");
    placeholder.replace(digits, 8, "00000000");
    uLong crc = crc32(0L, Z_NULL, 0);
    crc = io::crc32_update(crc, bytes, 8);
    crc = io::crc32_update(crc, reinterpret_cast<const uint8_t*>(placeholder.data()), placeholder.size());
    crc = io::crc32_update(crc, data, data_size);
    char hex[16];
    std::snprintf(hex, sizeof hex, "%08lx", static_cast<unsigned long>(crc));
    if (stored != std::string(kChecksumPrefix) + hex)
      throw std::runtime_error(name + ": checksum mismatch (stored " + stored.substr(std::strlen(kChecksumPrefix)) +
                               ", computed " + hex + "): the file is corrupt, altered or was cut short");
  } else if (out.metadata.count(kLegacyChecksumKey)) {  // twins 0.1: the data only
    char hex[16];
    std::snprintf(hex, sizeof hex, "%08lx",
                  static_cast<unsigned long>(io::crc32_update(crc32(0L, Z_NULL, 0), data, data_size)));
    if (out.metadata.at(kLegacyChecksumKey) != hex)
      throw std::runtime_error(name + ": checksum mismatch (stored " + out.metadata.at(kLegacyChecksumKey) +
                               ", computed " + hex + "): the file is corrupt or was cut short");
  }
  // As the safetensors library validates: known dtype, shape x dtype size == byte span, spans
  // in bounds, sorted, contiguous and covering the data exactly (no hole, no overlap).
  struct Entry {
    uint64_t begin, end;
    std::string name;
  };
  std::vector<Entry> entries;
  for (const auto& item : header.items()) {
    if (item.key() == "__metadata__") continue;
    const auto& t = item.value();
    if (!t.is_object() || !t.contains("dtype") || !t.contains("shape") || !t.contains("data_offsets"))
      throw fail(item.key() + ": needs dtype, shape and data_offsets");
    const auto& off = t["data_offsets"];
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() || !off[1].is_number_unsigned())
      throw fail(item.key() + ": data_offsets must be two non-negative integers");
    entries.push_back({off[0].get<uint64_t>(), off[1].get<uint64_t>(), item.key()});
  }
  std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) { return a.begin < b.begin; });
  uint64_t expected_begin = 0;
  for (const auto& e : entries) {
    const auto& t = header[e.name];
    const std::string dtype = t["dtype"].is_string() ? t["dtype"].get<std::string>() : "?";
    at::ScalarType type = at::kFloat;
    bool known = false;
    for (const auto& [dn, dt] : dtypes())
      if (dn == dtype) type = dt, known = true;
    if (!known) throw fail(e.name + ": unknown or unsupported dtype \"" + dtype + "\"");
    if (!t["shape"].is_array() || t["shape"].size() > kMaxDims)
      throw fail(e.name + ": shape must be a list of at most 16 sizes");
    std::vector<int64_t> shape;
    uint64_t count = 1;
    for (const auto& d : t["shape"]) {
      if (!d.is_number_unsigned()) throw fail(e.name + ": shape entries must be non-negative integers");
      const uint64_t v = d.get<uint64_t>();
      if (v > static_cast<uint64_t>(INT64_MAX) || __builtin_mul_overflow(count, v, &count))
        throw fail(e.name + ": shape " + t["shape"].dump() + " has more elements than can exist");
      shape.push_back(static_cast<int64_t>(v));
    }
    uint64_t bytes_needed = 0;
    if (__builtin_mul_overflow(count, static_cast<uint64_t>(c10::elementSize(type)), &bytes_needed))
      throw fail(e.name + ": shape " + t["shape"].dump() + " has more bytes than can exist");
    if (e.end < e.begin || e.end > data_size)
      throw fail(e.name + ": data_offsets [" + std::to_string(e.begin) + ", " + std::to_string(e.end) +
                 "] outside the " + std::to_string(data_size) + " bytes of data (truncated?)");
    if (e.end - e.begin != bytes_needed)
      throw fail(e.name + ": data_offsets span " + std::to_string(e.end - e.begin) + " bytes but " + dtype + " " +
                 t["shape"].dump() + " needs " + std::to_string(bytes_needed));
    if (e.begin != expected_begin)
      throw fail(e.name + ": data_offsets start at " + std::to_string(e.begin) + " where " +
                 std::to_string(expected_begin) +
                 " was expected (tensors must be contiguous, without holes or overlaps)");
    expected_begin = e.end;
    at::Tensor tensor = at::empty(shape, at::TensorOptions().dtype(type));
    if (bytes_needed) std::memcpy(tensor.data_ptr(), data + e.begin, bytes_needed);
    out.tensors.emplace_back(e.name, std::move(tensor));
  }
  if (expected_begin != data_size)
    throw fail("the tensors cover " + std::to_string(expected_begin) + " of the " + std::to_string(data_size) +
               " bytes of data");
  return out;
}

SafeTensorsFile load_safetensors(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open");
  in.seekg(0, std::ios::end);
  const std::streamoff size = in.tellg();
  if (size < 0) throw std::runtime_error(path + ": cannot read (not a regular file?)");
  in.seekg(0);
  std::vector<uint8_t> bytes(static_cast<size_t>(size));
  in.read(reinterpret_cast<char*>(bytes.data()), size);
  if (!in) throw std::runtime_error(path + ": cannot read");
  return parse_safetensors(bytes.data(), bytes.size(), path);
}

}  // namespace twins::models

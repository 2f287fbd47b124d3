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

uint32_t crc32_of(const uint8_t* data, size_t size) {
  uLong crc = crc32(0L, Z_NULL, 0);
  while (size > 0) {  // zlib takes 32-bit lengths
    const uInt chunk = static_cast<uInt>(std::min<size_t>(size, 1u << 30));
    crc = crc32(crc, data, chunk);
    data += chunk, size -= chunk;
  }
  return static_cast<uint32_t>(crc);
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
  char crc[16];
  std::snprintf(crc, sizeof crc, "%08x", crc32_of(data.data(), data.size()));
  metadata["twins_crc32"] = crc;
  nlohmann::ordered_json meta = nlohmann::ordered_json::object();
  for (const auto& [k, v] : metadata) meta[k] = v;
  nlohmann::ordered_json full = {{"__metadata__", meta}};
  for (auto& item : header.items()) full[item.key()] = item.value();
  std::string text = full.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // the data starts 8-byte aligned
  uint8_t length[8];
  for (int i = 0; i < 8; ++i) length[i] = static_cast<uint8_t>(static_cast<uint64_t>(text.size()) >> (8 * i));

  const std::string tmp = path + ".tmp-" + std::to_string(::getpid());
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) throw std::runtime_error(path + ": cannot write (" + std::strerror(errno) + ")");
  auto write_all = [&](const void* p, size_t n) {
    const auto* b = static_cast<const uint8_t*>(p);
    while (n > 0) {
      const ssize_t w = ::write(fd, b, n);
      if (w < 0) {
        if (errno == EINTR) continue;
        const std::string err = std::strerror(errno);
        ::close(fd);
        ::unlink(tmp.c_str());
        throw std::runtime_error(path + ": write failed (" + err + ")");
      }
      b += w, n -= static_cast<size_t>(w);
    }
  };
  write_all(length, 8);
  write_all(text.data(), text.size());
  write_all(data.data(), data.size());
  if (::fsync(fd) != 0 || ::close(fd) != 0) {
    ::unlink(tmp.c_str());
    throw std::runtime_error(path + ": cannot flush to disk (" + std::strerror(errno) + ")");
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    ::unlink(tmp.c_str());
    throw std::runtime_error(path + ": cannot rename into place (" + std::strerror(errno) + ")");
  }
  // Make the rename itself durable.
  const std::string dir = std::filesystem::path(path).parent_path().string();
  const int dfd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY);
  if (dfd >= 0) ::fsync(dfd), ::close(dfd);
}

SafeTensorsFile load_safetensors(const std::string& path) {
  auto fail = [&](const std::string& what) -> std::runtime_error {
    return std::runtime_error(path + ": not a valid safetensors file: " + what);
  };
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open");
  in.seekg(0, std::ios::end);
  const uint64_t size = static_cast<uint64_t>(in.tellg());
  in.seekg(0);
  if (size < 8) throw fail("shorter than the 8-byte header length");
  uint8_t length[8];
  in.read(reinterpret_cast<char*>(length), 8);
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= static_cast<uint64_t>(length[i]) << (8 * i);
  if (n > size - 8)
    throw fail("header length " + std::to_string(n) + " exceeds the file size " + std::to_string(size) +
               " (truncated?)");
  std::string text(n, '\0');
  in.read(text.data(), static_cast<std::streamsize>(n));
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    throw fail(std::string("header is not JSON (") + e.what() + ")");
  }
  if (!header.is_object()) throw fail("header is not a JSON object");
  const uint64_t data_size = size - 8 - n;
  std::vector<uint8_t> data(data_size);
  in.read(reinterpret_cast<char*>(data.data()), static_cast<std::streamsize>(data_size));
  if (!in) throw fail("cannot read the tensor data");

  SafeTensorsFile out;
  if (header.contains("__metadata__")) {
    const auto& meta = header["__metadata__"];
    if (!meta.is_object()) throw fail("__metadata__ is not an object");
    for (const auto& item : meta.items()) {
      if (!item.value().is_string()) throw fail("__metadata__." + item.key() + " is not a string");
      out.metadata[item.key()] = item.value().get<std::string>();
    }
  }
  if (out.metadata.count("twins_crc32")) {
    char crc[16];
    std::snprintf(crc, sizeof crc, "%08x", crc32_of(data.data(), data.size()));
    if (out.metadata["twins_crc32"] != crc)
      throw std::runtime_error(path + ": checksum mismatch (stored " + out.metadata["twins_crc32"] + ", computed " +
                               crc + "): the file is corrupt or was cut short");
  }
  // Tensors in the order of their data (the header's key order is not preserved by JSON parsers).
  std::vector<std::pair<uint64_t, std::string>> order;
  for (const auto& item : header.items()) {
    if (item.key() == "__metadata__") continue;
    const auto& t = item.value();
    if (!t.is_object() || !t.contains("dtype") || !t.contains("shape") || !t.contains("data_offsets"))
      throw fail(item.key() + ": needs dtype, shape and data_offsets");
    const auto& off = t["data_offsets"];
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() || !off[1].is_number_unsigned())
      throw fail(item.key() + ": data_offsets must be two non-negative integers");
    order.emplace_back(off[0].get<uint64_t>(), item.key());
  }
  std::sort(order.begin(), order.end());
  for (const auto& [begin_, name] : order) {
    const auto& t = header[name];
    const std::string dtype = t["dtype"].is_string() ? t["dtype"].get<std::string>() : "?";
    at::ScalarType type = at::kFloat;
    bool known = false;
    for (const auto& [dn, dt] : dtypes())
      if (dn == dtype) type = dt, known = true;
    if (!known) throw fail(name + ": unknown or unsupported dtype \"" + dtype + "\"");
    std::vector<int64_t> shape;
    uint64_t count = 1;
    for (const auto& d : t["shape"]) {
      if (!d.is_number_unsigned()) throw fail(name + ": shape entries must be non-negative integers");
      shape.push_back(d.get<int64_t>());
      count *= d.get<uint64_t>();
    }
    const uint64_t begin = t["data_offsets"][0], end = t["data_offsets"][1];
    const uint64_t bytes = count * static_cast<uint64_t>(c10::elementSize(type));
    if (end < begin || end > data_size)
      throw fail(name + ": data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) + "] outside the " +
                 std::to_string(data_size) + " bytes of data (truncated?)");
    if (end - begin != bytes)
      throw fail(name + ": data_offsets span " + std::to_string(end - begin) + " bytes but " + dtype + " " +
                 t["shape"].dump() + " needs " + std::to_string(bytes));
    at::Tensor tensor = at::empty(shape, at::TensorOptions().dtype(type));
    if (bytes) std::memcpy(tensor.data_ptr(), data.data() + begin, bytes);
    out.tensors.emplace_back(name, std::move(tensor));
  }
  return out;
}

}  // namespace twins::models

#pragma once
// The safetensors format (https://github.com/huggingface/safetensors), written and read by twins
// itself: 8-byte little-endian header length N, N bytes of JSON header
// {"name": {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, ...,
//  "__metadata__": {"key": "string value"}}, then the raw little-endian tensor bytes.
// PyTorch reads these files with safetensors.torch.load_file; twins uses them for backbones,
// exports and checkpoints.
#include <ATen/core/Tensor.h>

#include <map>
#include <string>
#include <utility>
#include <vector>

namespace twins::models {

using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;

struct SafeTensorsFile {
  NamedTensors tensors;  ///< in file order, on the CPU
  std::map<std::string, std::string> metadata;
  /// The tensor called `name`; throws std::out_of_range naming the file if absent.
  const at::Tensor& at(const std::string& name) const;
  bool contains(const std::string& name) const;
};

/// Writes atomically (temporary file, fsync, rename): a crash leaves the old file or the new
/// one, never half of one. Adds metadata "twins_checksum" ("crc32:<8 hex digits>"), the CRC-32
/// of the whole file (header included) with those digits as zeros while computing.
/// Tensors may be on any device and of any layout; supported dtypes: F64 F32 F16 BF16 I64 I32
/// I16 I8 U8 BOOL.
void save_safetensors(const std::string& path, const NamedTensors& tensors,
                      std::map<std::string, std::string> metadata = {});

/// Reads a file, validated as strictly as the safetensors library does (header at most 100 MB
/// and a JSON object, known dtypes, dtype x shape == byte span, spans in bounds, contiguous,
/// non-overlapping and covering the data) plus twins' checksum when present ("twins_checksum",
/// or twins 0.1's "twins_crc32" over the data). Faults throw std::runtime_error naming the file.
SafeTensorsFile load_safetensors(const std::string& path);
/// The same on bytes in memory; `name` names them in messages.
SafeTensorsFile parse_safetensors(const uint8_t* bytes, size_t size, const std::string& name);
/// Whether `file` carries a twins checksum (checkpoints must).
inline bool has_checksum(const SafeTensorsFile& file) { return file.metadata.count("twins_checksum") != 0; }

}  // namespace twins::models

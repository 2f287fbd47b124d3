#include "twins/eval/npy.h"

#include <ATen/ATen.h>

#include <cstdio>
#include <stdexcept>

#include "twins/io.h"

namespace twins::eval {

std::string npy_header(at::ScalarType dtype, const std::vector<int64_t>& shape) {
  std::string descr;
  switch (dtype) {
    case at::kFloat: descr = "<f4"; break;
    case at::kDouble: descr = "<f8"; break;
    case at::kLong: descr = "<i8"; break;
    case at::kInt: descr = "<i4"; break;
    case at::kByte: descr = "|u1"; break;
    default: throw std::invalid_argument("write_npy: unsupported dtype " + std::string(c10::toString(dtype)));
  }
  // Python tuple syntax: (3,) for one dimension, (3, 4) for two, () for a scalar.
  std::string dims = "(";
  for (size_t i = 0; i < shape.size(); ++i) dims += (i ? ", " : "") + std::to_string(shape[i]);
  dims += shape.size() == 1 ? ",)" : ")";
  std::string header = "{'descr': '" + descr + "', 'fortran_order': False, 'shape': " + dims + ", }";
  // magic (6) + version (2) + length (2) + header, padded with spaces to 64 bytes, ending in \n
  const size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header += '\n';
  const uint16_t len = static_cast<uint16_t>(header.size());
  const char prefix[10] = {
      '\x93', 'N', 'U', 'M', 'P', 'Y', '\x01', '\x00', static_cast<char>(len & 0xff), static_cast<char>(len >> 8)};
  return std::string(prefix, 10) + header;
}

void write_npy(const std::string& path, const at::Tensor& tensor) {
  const at::Tensor t = tensor.detach().to(at::kCPU).contiguous();
  const std::string header = npy_header(t.scalar_type(), t.sizes().vec());
  io::write_file_atomic(path, {header, std::string_view(static_cast<const char*>(t.data_ptr()),
                                                        static_cast<size_t>(t.numel() * t.element_size()))});
}

}  // namespace twins::eval

// MNIST-style IDX files, plain or gzipped. Input: one flag byte (bit 0: gzip the files), a
// little-endian 32-bit length of the image file, the image file, then the label file.
#include <zlib.h>

#include <cstring>

#include <nlohmann/json.hpp>

#include "tests/fuzz/fuzz_util.h"
#include "twins/data/dataset.h"

namespace {

void write_gz(const std::string& name, std::string_view bytes) {
  const std::string path = (twins::fuzz::scratch() / name).string();
  gzFile f = gzopen(path.c_str(), "wb1");
  if (!bytes.empty()) gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size()));
  gzclose(f);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 5) return 0;
  const bool gz = data[0] & 1;
  uint32_t n = 0;
  std::memcpy(&n, data + 1, 4);
  std::string_view rest = twins::fuzz::as_text(data + 5, size - 5);
  const std::string_view images = rest.substr(0, std::min<size_t>(n, rest.size()));
  const std::string_view labels = rest.substr(images.size());
  const auto root = twins::fuzz::scratch() / "idx";
  std::filesystem::remove_all(root);
  std::filesystem::create_directories(root);
  if (gz) {
    write_gz("idx/train-images-idx3-ubyte.gz", images);
    write_gz("idx/train-labels-idx1-ubyte.gz", labels);
  } else {
    twins::fuzz::write("idx/train-images-idx3-ubyte", images);
    twins::fuzz::write("idx/train-labels-idx1-ubyte", labels);
  }
  try {
    auto d = twins::data::create_dataset({{"type", "mnist"}, {"root", root.string()}});
    for (int64_t i = 0; i < std::min<int64_t>(d->size(), 4); ++i) d->image(i), d->label(i), d->id(i);
    if (d->size() > 0) d->image(d->size() - 1);
  } catch (const std::exception&) {
  }
  return 0;
}

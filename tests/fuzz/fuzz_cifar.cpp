// CIFAR-10's binary test batch: the input is the start of the file, the rest of its 10,000
// records of 3,073 bytes are zeros (a sparse file), so label validation and record reading
// see fuzzed bytes; other sizes exercise the size checks.
#include <nlohmann/json.hpp>

#include "tests/fuzz/fuzz_util.h"
#include "twins/data/dataset.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const auto root = twins::fuzz::scratch() / "cifar";
  std::filesystem::create_directories(root);
  const std::string file = twins::fuzz::write("cifar/test_batch.bin", twins::fuzz::as_text(data + 1, size - 1));
  const uintmax_t full = 10000u * 3073u;
  if (data[0] & 1) std::filesystem::resize_file(file, std::max<uintmax_t>(full, size - 1));  // exact, or too long
  try {
    auto d = twins::data::create_dataset({{"type", "cifar10"}, {"root", root.string()}, {"split", "test"}});
    for (int64_t i = 0; i < 3; ++i) d->image(i), d->label(i);
    d->image(d->size() - 1);
  } catch (const std::exception&) {
  }
  return 0;
}

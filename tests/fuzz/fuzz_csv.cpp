// CSV image lists: the RFC 4180 reader and the csv dataset's rows, paths and labels.
#include <nlohmann/json.hpp>

#include "tests/fuzz/fuzz_util.h"
#include "twins/data/csv.h"
#include "twins/data/dataset.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto text = twins::fuzz::as_text(data, size);
  try {
    twins::data::parse_csv(text, "fuzz.csv");
  } catch (const std::exception&) {
  }
  const std::string file = twins::fuzz::write("list.csv", text);
  try {
    auto d = twins::data::create_dataset({{"type", "csv"}, {"file", file}});
    for (int64_t i = 0; i < std::min<int64_t>(d->size(), 4); ++i) d->label(i), d->id(i);
  } catch (const std::exception&) {
  }
  return 0;
}

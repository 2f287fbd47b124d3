// Tar shards: brace patterns, the index file, the tar reader and its grouping of members into
// samples (through the index builder), and an epoch read through the dataset with bad samples
// skipped, as `twins pretrain` reads it.
#include <nlohmann/json.hpp>

#include "tests/fuzz/fuzz_util.h"
#include "twins/data/dataset.h"
#include "twins/data/shards.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace twins::data;
  const auto text = twins::fuzz::as_text(data, size);
  try {  // the first line as a url pattern (a user's is short: at most 200 characters here)
    expand_urls({std::string(text.substr(0, std::min<size_t>(text.find('\n'), 200)))});
  } catch (const std::exception&) {
  }
  try {
    read_shard_index(twins::fuzz::write("index.json", text));
  } catch (const std::exception&) {
  }
  const std::string tar = twins::fuzz::write("shard.tar", text);
  try {
    IndexOptions o;
    o.threads = 1;
    build_shard_index({tar}, o);
  } catch (const std::exception&) {
  }
  try {
    const auto d = create_dataset({{"type", "shards"},
                                   {"urls", tar},
                                   {"shuffle_buffer", 4},
                                   {"shards_in_flight", 1},
                                   {"on_bad_sample", "skip"},
                                   {"max_image_pixels", 1 << 20}});
    StreamPlan plan;
    const int64_t n = static_cast<int64_t>(d->stream_order(plan).size());
    const auto stream = d->open_epoch(plan);
    for (int64_t p = 0; p < std::min<int64_t>(n, 8); ++p) {
      try {
        stream->take(p);
      } catch (const BadSample&) {
      }
    }
  } catch (const std::exception&) {
  }
  return 0;
}

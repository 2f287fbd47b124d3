// safetensors bytes: the header and offsets validation, the checksum, and the backbone
// metadata a file may carry.
#include "tests/fuzz/fuzz_util.h"
#include "twins/models/safetensors.h"
#include "twins/models/weights.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    const auto file = twins::models::parse_safetensors(data, size, "fuzz.safetensors");
    const auto info = twins::models::BackboneInfo::from_metadata(file.metadata, "fuzz.safetensors");
    (void)info.to_metadata();
  } catch (const std::exception&) {
  }
  return 0;
}

// Image decoding (JPEG through libjpeg, PNG/BMP/PNM/WebP/TIFF through OpenCV) after the header
// size check; the limit is lowered so that no accepted input allocates more than ~50 MB.
#include <vector>

#include "tests/fuzz/fuzz_util.h"
#include "twins/data/image_io.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  twins::data::image_header_size(data, size);
  try {
    twins::data::decode_image(std::vector<uint8_t>(data, data + size), "fuzz.img", int64_t{1} << 22);
  } catch (const std::exception&) {
  }
  return 0;
}

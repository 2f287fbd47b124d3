// A run folder's checkpoint: bytes written as checkpoints/step-00000001.safetensors, read back
// by CheckpointStore::load_latest (safetensors, checksum, twins_checkpoint and config JSON).
#include "tests/fuzz/fuzz_util.h"
#include "train/checkpoint_store.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto dir = twins::fuzz::scratch() / "run" / "checkpoints";
  twins::fuzz::write("run/checkpoints/step-00000001.safetensors", twins::fuzz::as_text(data, size));
  try {
    twins::train::detail::CheckpointStore store(dir, 1);
    store.load_latest([](const std::string&) {});
  } catch (const std::exception&) {
  }
  return 0;
}

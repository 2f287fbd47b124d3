#pragma once
// The checkpoints of a run folder: checkpoints/step-<N>.safetensors, each the Trainer's tensors
// plus two metadata entries, "twins_checkpoint" (the scalars of the run's position as JSON) and
// "config" (the resolved config). Written atomically; the newest `keep` are kept; reading
// falls back to an older checkpoint when the newest is damaged.
#include <nlohmann/json.hpp>

#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "twins/models/safetensors.h"

namespace twins::train::detail {

class CheckpointStore {
 public:
  /// `dir` is created on the first save; `keep` >= 1.
  CheckpointStore(std::filesystem::path dir, int keep);

  const std::filesystem::path& dir() const { return dir_; }
  /// The file of step `step` (step-00000042.safetensors).
  std::filesystem::path path_of(int64_t step) const;
  /// Checkpoint files, newest first.
  std::vector<std::filesystem::path> list() const;

  /// Writes step `step` atomically (a crash leaves the previous file set intact), then removes
  /// all but the newest `keep`. `info` goes to the "twins_checkpoint" metadata.
  std::filesystem::path save(int64_t step, const models::NamedTensors& tensors, const nlohmann::json& info,
                             const nlohmann::json& config) const;

  struct Checkpoint {
    std::filesystem::path path;
    models::SafeTensorsFile file;
    nlohmann::json info, config;
  };
  /// The newest checkpoint that reads back whole (tensors, checksum, info and config);
  /// damaged ones are skipped, each reported through `warn`. nullopt when there is none at all;
  /// std::runtime_error when every one is damaged.
  std::optional<Checkpoint> load_latest(const std::function<void(const std::string&)>& warn) const;

 private:
  std::filesystem::path dir_;
  int keep_;
};

}  // namespace twins::train::detail

#include "train/checkpoint_store.h"

#include <algorithm>
#include <cstdio>
#include <stdexcept>

#include "twins/config.h"

namespace twins::train::detail {
namespace fs = std::filesystem;
using nlohmann::json;

CheckpointStore::CheckpointStore(fs::path dir, int keep) : dir_(std::move(dir)), keep_(keep) {
  if (keep_ < 1) throw std::invalid_argument("CheckpointStore: keep must be >= 1");
}

fs::path CheckpointStore::path_of(int64_t step) const {
  char name[64];
  std::snprintf(name, sizeof name, "step-%08lld.safetensors", static_cast<long long>(step));
  return dir_ / name;
}

std::vector<fs::path> CheckpointStore::list() const {
  std::vector<fs::path> out;
  std::error_code ec;
  if (!fs::is_directory(dir_, ec)) return out;
  for (const auto& e : fs::directory_iterator(dir_, ec)) {  // unreadable: none (saving then says why)
    const std::string n = e.path().filename().string();
    if (n.rfind("step-", 0) == 0 && e.path().extension() == ".safetensors") out.push_back(e.path());
  }
  std::sort(out.rbegin(), out.rend());  // zero-padded step numbers: newest first
  return out;
}

fs::path CheckpointStore::save(int64_t step, const models::NamedTensors& tensors, const json& info,
                               const json& config) const {
  fs::create_directories(dir_);
  const fs::path path = path_of(step);
  models::save_safetensors(path.string(), tensors, {{"twins_checkpoint", info.dump()}, {"config", config.dump()}});
  const auto all = list();
  for (size_t i = static_cast<size_t>(keep_); i < all.size(); ++i) fs::remove(all[i]);
  return path;
}

std::optional<CheckpointStore::Checkpoint> CheckpointStore::load_latest(
    const std::function<void(const std::string&)>& warn) const {
  const auto candidates = list();
  if (candidates.empty()) return std::nullopt;
  for (const auto& c : candidates) {
    try {
      Checkpoint k;
      k.path = c;
      k.file = models::load_safetensors(c.string());
      if (!k.file.metadata.count("twins_checkpoint") || !k.file.metadata.count("config"))
        throw std::runtime_error("not a twins checkpoint (no twins_checkpoint or config metadata)");
      if (!models::has_checksum(k.file) && !k.file.metadata.count("twins_crc32"))
        throw std::runtime_error("no checksum: not written by twins, or altered");
      k.info = config::parse_json(k.file.metadata.at("twins_checkpoint"), "twins_checkpoint");
      k.config = config::parse_json(k.file.metadata.at("config"), "config");
      const auto count = [&](const char* key) {
        return k.info.contains(key) && k.info[key].is_number_integer() && k.info[key].get<int64_t>() >= 0;
      };
      if (!k.info.is_object() || !count("step") || !count("epoch") || !count("batch") || !k.config.is_object())
        throw std::runtime_error("its twins_checkpoint or config metadata is not what twins writes");
      return k;
    } catch (const std::exception& e) {
      if (warn) warn("skipping checkpoint " + c.filename().string() + ": " + e.what());
    }
  }
  throw std::runtime_error(dir_.string() + ": every checkpoint is damaged (see the warnings above)");
}

}  // namespace twins::train::detail

#include "twins/eval/evaluate.h"

#include <ATen/ATen.h>
#include <zlib.h>

#include <filesystem>
#include <iostream>

#include "twins/config.h"
#include "twins/data/dataset.h"
#include "twins/models/safetensors.h"
#include "twins/models/weights.h"
#include "twins/runtime.h"

namespace twins::eval {
namespace fs = std::filesystem;
using nlohmann::json;

EvalConfig EvalConfig::parse(const json& root) {
  EvalConfig c;
  config::ConfigReader r(root, "");
  for (const auto& item : root.items())
    if (!item.key().empty() && item.key()[0] == '_') r.allow(item.key());
  for (const char* key : {"train_data", "test_data"}) {
    r.allow(key);
    config::require(root.contains(key), key, "required");
  }
  c.train_data = root["train_data"], c.test_data = root["test_data"];
  r.get("image_size", c.image_size);
  config::require(c.image_size > 0 && c.image_size <= 4096, "image_size", "must be in [1, 4096]");
  r.allow("normalize");
  if (root.contains("normalize")) {
    config::ConfigReader n(root["normalize"], "normalize");
    n.get("mean", c.normalization.mean);
    n.get("std", c.normalization.std);
    n.finish();
  }
  r.allow("probe");
  if (root.contains("probe")) {
    config::ConfigReader p(root["probe"], "probe");
    p.get("epochs", c.probe.epochs);
    p.get("batch_size", c.probe.batch_size);
    p.get("lr", c.probe.lr);
    p.get("weight_decay", c.probe.weight_decay);
    p.get("momentum", c.probe.momentum);
    p.get("seed", c.probe.seed);
    p.finish();
    config::require(c.probe.epochs >= 1 && c.probe.epochs <= 100000, "probe.epochs", "must be in [1, 10^5]");
    config::require(c.probe.batch_size >= 1 && c.probe.batch_size <= (1 << 20), "probe.batch_size",
                    "must be in [1, 2^20]");
    config::require(c.probe.lr > 0, "probe.lr", "must be > 0");
  }
  r.allow("knn");
  if (root.contains("knn")) {
    config::ConfigReader k(root["knn"], "knn");
    std::string variant = "dino";
    k.get("variant", variant);
    config::require(variant == "dino" || variant == "lightly", "knn.variant", "must be dino or lightly");
    if (variant == "lightly") c.knn.k = {200}, c.knn.temperature = 0.1;
    k.get("k", c.knn.k);
    k.get("temperature", c.knn.temperature);
    k.get("chunk", c.knn.chunk);
    k.finish();
    config::require(!c.knn.k.empty() && c.knn.k.size() <= 64, "knn.k", "needs 1 to 64 values");
    for (int64_t k : c.knn.k) config::require(k >= 1 && k <= 1000000, "knn.k", "values must be in [1, 10^6]");
    config::require(c.knn.temperature > 0, "knn.temperature", "must be > 0");
    config::require(c.knn.chunk >= 1 && c.knn.chunk <= (1 << 20), "knn.chunk", "must be in [1, 2^20]");
  }
  r.get("batch_size", c.batch_size);
  r.get("workers", c.workers);
  r.get("device", c.device);
  r.finish();
  config::require(c.batch_size >= 1 && c.batch_size <= (1 << 20), "batch_size", "must be in [1, 2^20]");
  config::require(c.workers >= 0 && c.workers <= 256, "workers", "must be in [0, 256]");
  return c;
}

at::Device resolve_eval_device(const std::string& name) { return resolve_device(name, "device"); }

std::shared_ptr<models::Network> open_backbone(const std::string& backbone) {
  if (backbone.rfind("random:", 0) == 0) {
    // random:<backbone JSON> or random:<recipe file> (its model.backbone)
    const std::string rest = backbone.substr(7);
    json spec;
    if (!rest.empty() && rest[0] == '{')
      spec = json::parse(rest, nullptr, /*allow_exceptions=*/false);
    else if (fs::exists(rest))
      spec = config::load_config(rest).value("model", json::object()).value("backbone", json());
    if (!spec.is_object() && !spec.is_string())
      throw std::invalid_argument("backbone \"" + backbone +
                                  "\": expected random:<backbone JSON> or random:<recipe file with model.backbone>");
    at::manual_seed(0);
    auto net = models::create_backbone(spec);
    net->eval();
    return net;
  }
  return models::load_backbone(backbone);
}

std::pair<Features, Features> eval_features(const std::string& backbone, const EvalConfig& c,
                                            const std::string& cache_dir, int64_t* num_classes) {
  set_compute_threads(0);
  auto net = open_backbone(backbone);
  const at::Device device = resolve_eval_device(c.device);
  net->to(device);
  const int channels = static_cast<int>(net->to_json().value("in_channels", 3));
  // Cache key: the backbone's weights and the data/view settings.
  uLong crc = crc32(0L, Z_NULL, 0);
  for (const auto& [name, t] : models::backbone_state(*net)) {
    const at::Tensor cpu = t.to(at::kCPU).contiguous();
    crc = crc32(crc, reinterpret_cast<const Bytef*>(name.data()), static_cast<uInt>(name.size()));
    crc = crc32(crc, static_cast<const Bytef*>(cpu.data_ptr()), static_cast<uInt>(cpu.numel() * cpu.element_size()));
  }
  const std::string settings = json({c.image_size, c.normalization.mean, c.normalization.std}).dump();
  auto extract = [&](const json& spec, const std::string& split) {
    const std::string key = std::to_string(crc32(crc, reinterpret_cast<const Bytef*>((spec.dump() + settings).data()),
                                                 static_cast<uInt>((spec.dump() + settings).size())));
    const fs::path cache =
        cache_dir.empty() ? fs::path() : fs::path(cache_dir) / ("features-" + split + "-" + key + ".safetensors");
    auto dataset = data::create_dataset(spec, split == "train" ? "train_data" : "test_data");
    if (num_classes) *num_classes = std::max(*num_classes, dataset->num_classes());
    if (!cache.empty() && fs::exists(cache)) {
      try {
        const auto f = models::load_safetensors(cache.string());
        std::cerr << "  " << split << " features from " << cache.string() << "\n";
        return Features{f.at("features"), f.at("labels")};
      } catch (const std::exception& e) {
        std::cerr << "warning: ignoring feature cache " << cache.string() << ": " << e.what() << "\n";
      }
    }
    const auto view = eval_view(*dataset, c.image_size, c.normalization);
    ExtractOptions o;
    o.batch_size = c.batch_size, o.workers = c.workers, o.channels = channels, o.what = split + " features";
    std::cerr << "  extracting " << split << " features (" << dataset->size() << " images)\n";
    Features f = extract_features(*net, dataset, view, device, o);
    if (!cache.empty()) {
      fs::create_directories(cache.parent_path());
      models::save_safetensors(cache.string(), {{"features", f.features}, {"labels", f.labels}});
    }
    return f;
  };
  Features train = extract(c.train_data, "train");
  Features test = extract(c.test_data, "test");
  return {train, test};
}

}  // namespace twins::eval

#pragma once
// Tiny training runs for tests: a random IDX dataset in a fresh folder, a recipe of each method
// small enough to train in a second on one CPU core, and quiet pretrain options.
#include <ATen/ATen.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "twins/losses.h"
#include "twins/train/pretrain.h"

namespace twins::test {

// An IDX dataset of n random 16x16 grey images in a fresh folder.
struct TinyData {
  std::filesystem::path dir;
  explicit TinyData(int n, int size = 16) {
    static int counter = 0;
    dir = std::filesystem::temp_directory_path() /
          ("twins_train_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    std::filesystem::create_directories(dir);
    auto be = [](std::ofstream& f, uint32_t v) {
      const char b[4] = {char(v >> 24), char(v >> 16), char(v >> 8), char(v)};
      f.write(b, 4);
    };
    std::ofstream img(dir / "train-images-idx3-ubyte", std::ios::binary),
        lab(dir / "train-labels-idx1-ubyte", std::ios::binary);
    be(img, 0x803), be(img, n), be(img, size), be(img, size);
    be(lab, 0x801), be(lab, n);
    at::manual_seed(123);
    const at::Tensor pixels = at::randint(0, 256, {n, size, size}, at::kByte);
    img.write(reinterpret_cast<const char*>(pixels.data_ptr<uint8_t>()), pixels.numel());
    for (int i = 0; i < n; ++i) lab.put(char(i % 4));
  }
  ~TinyData() { std::filesystem::remove_all(dir); }
};

inline nlohmann::json tiny_recipe(const std::string& method, const std::filesystem::path& root) {
  nlohmann::json views = nlohmann::json::parse(R"([
    [{"type": "random_resized_crop", "size": 12, "scale": [0.3, 1.0]}, {"type": "random_horizontal_flip"},
     {"type": "normalize", "mean": [0.5], "std": [0.25]}],
    [{"type": "random_resized_crop", "size": 12, "scale": [0.3, 1.0]}, {"type": "color_jitter", "brightness": 0.4},
     {"type": "normalize", "mean": [0.5], "std": [0.25]}]])");
  nlohmann::json r = {
      {"method", method},
      {"data", {{"type", "mnist"}, {"root", root.string()}}},
      {"views", views},
      {"model",
       {{"backbone",
         {{"type", "resnet"}, {"layers", {1, 1, 1, 1}}, {"width", 4}, {"in_channels", 1}, {"cifar_stem", true}}},
        {"projector", {{"type", "mlp"}, {"spec", "32-16"}}}}},
      {"loss", {{"type", method}}},
      {"optimizer", {{"type", "lars"}, {"base_lr", 2.0}, {"weight_decay", 1e-4}, {"eta", 0.02}}},
      {"schedule", {{"warmup_epochs", 0}}},
      {"train",
       {{"epochs", 3},
        {"batch_size", 16},
        {"workers", 2},
        {"device", "cpu"},
        {"seed", 7},
        {"log_every", 1},
        {"checkpoint_every_steps", 0},
        {"deterministic", true},
        {"threads", 1}}}};
  // The heads the method's loss asks for.
  const auto needs = twins::losses::create_loss(method)->needs();
  if (needs.predictor) r["model"]["predictor"] = {{"type", "mlp"}, {"spec", "32-16"}};
  if (needs.momentum_target) r["byol"] = {{"tau_base", 0.9}};
  return r;
}

inline train::PretrainOptions quiet(const std::filesystem::path& out) {
  train::PretrainOptions o;
  o.out_dir = out.string();
  o.progress = false;
  return o;
}

}  // namespace twins::test

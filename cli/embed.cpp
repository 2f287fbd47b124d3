// twins embed: images -> a NumPy .npy of features [N, D] (float32) and the ids in order.
#include <ATen/ATen.h>

#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "twins/config.h"
#include "twins/data/dataset.h"
#include "twins/data/loader.h"
#include "twins/embed.h"
#include "twins/eval/npy.h"
#include "twins/runtime.h"

namespace twins::cli {
namespace {
namespace fs = std::filesystem;

struct EmbedArgs {
  std::string backbone, input, output = "embeddings.npy", device = "auto";
  int image_size = 0, workers = 2;
  int64_t batch_size = 128;
};

// An image folder, a dataset JSON file, or a list of files (one per line, or path,label).
std::shared_ptr<data::Dataset> open_input(const std::string& input) {
  if (fs::is_directory(input)) return data::create_dataset({{"type", "image_folder"}, {"root", input}}, "--input");
  if (fs::path(input).extension() == ".json") return data::create_dataset(config::read_json_file(input), "--input");
  return data::create_dataset({{"type", "csv"}, {"file", input}}, "--input");
}

int run_embed(const EmbedArgs& a) {
  set_compute_threads(0);
  EmbedderOptions o;
  o.device = a.device, o.image_size = a.image_size, o.batch_size = a.batch_size;
  const Embedder embedder(a.backbone, o);
  const auto dataset = open_input(a.input);
  const int64_t n = dataset->size();
  std::cerr << "embedding " << n << " images with " << a.backbone << " (" << embedder.dim() << " features, "
            << embedder.image_size() << " px)\n";
  // The loader decodes in parallel; views are identity here, so images keep their own size and
  // go one by one through the embedder's resize and centre crop.
  at::Tensor out = at::empty({n, embedder.dim()}, at::kFloat);
  std::ofstream ids(fs::path(a.output).replace_extension(".ids.txt"));
  int64_t done = 0;
  std::vector<at::Tensor> pending;
  auto flush = [&] {
    if (pending.empty()) return;
    std::vector<at::Tensor> feats;
    for (auto& img : pending) feats.push_back(embedder.embed(img.unsqueeze(0)));
    out.slice(0, done, done + static_cast<int64_t>(pending.size())).copy_(at::cat(feats));
    done += static_cast<int64_t>(pending.size());
    pending.clear();
    if (done % 1024 < a.batch_size) std::cerr << "  " << done << "/" << n << "\n";
  };
  for (int64_t i = 0; i < n; ++i) {
    at::Tensor img;
    try {
      img = dataset->image(i);
    } catch (const data::BadSample& e) {
      throw std::runtime_error(std::string(e.what()) + " (sample " + std::to_string(i) + ")");
    }
    pending.push_back(img);
    ids << dataset->id(i) << "\n";
    if (static_cast<int64_t>(pending.size()) == a.batch_size) flush();
  }
  flush();
  eval::write_npy(a.output, out);
  std::cout << "wrote " << a.output << " [" << n << ", " << embedder.dim() << "] float32 and "
            << fs::path(a.output).replace_extension(".ids.txt").string() << "\n";
  return 0;
}

}  // namespace

Command add_embed(CLI::App& app) {
  auto a = std::make_shared<EmbedArgs>();
  auto* sub = app.add_subcommand("embed", "Embed images with a backbone into a NumPy .npy [N, D] (+ ids)");
  sub->add_option("--backbone", a->backbone, "backbone.safetensors, a run folder, or a torchvision ResNet")->required();
  sub->add_option("--input", a->input, "An image folder, a file list (path per line), or a dataset JSON")->required();
  sub->add_option("--output", a->output, "The .npy file (ids go to <name>.ids.txt)")->capture_default_str();
  sub->add_option("--image-size", a->image_size, "Square side the backbone sees (default: its training size)");
  sub->add_option("--batch-size", a->batch_size, "Images per forward pass")->capture_default_str();
  sub->add_option("--device", a->device, "auto, cpu, cuda, cuda:N")->capture_default_str();
  return [a] { return run_embed(*a); };
}

}  // namespace twins::cli

// twins embed: images -> a NumPy .npy of features [N, D] (float32) and the ids in order.
#include <ATen/ATen.h>

#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "twins/data/dataset.h"
#include "twins/embed.h"
#include "twins/eval/npy.h"
#include "twins/io.h"
#include "twins/runtime.h"

namespace twins::cli {
namespace {
namespace fs = std::filesystem;

struct EmbedArgs {
  std::string backbone, input, output = "embeddings.npy", device = "auto";
  int image_size = 0, workers = 2;
  int64_t batch_size = 128;
};

int run_embed(const EmbedArgs& a) {
  set_compute_threads(0);
  EmbedderOptions o;
  o.device = a.device, o.image_size = a.image_size, o.batch_size = a.batch_size;
  const Embedder embedder(a.backbone, o);
  const auto dataset = data::open_images(a.input, "--input");
  const int64_t n = dataset->size();
  std::cerr << "embedding " << n << " images with " << a.backbone << " (" << embedder.dim() << " features, "
            << embedder.image_size() << " px)\n";
  EmbedDatasetOptions eo;
  eo.workers = a.workers, eo.progress = true;
  const at::Tensor features = embedder.embed_dataset(dataset, eo);
  // Both files are written only once every image is embedded, each atomically: a failed run
  // leaves the previous pair as it was.
  const fs::path ids_path = fs::path(a.output).replace_extension(".ids.txt");
  std::string ids;
  for (int64_t i = 0; i < n; ++i) ids += dataset->id(i) + "\n";
  eval::write_npy(a.output, features);
  io::write_file_atomic(ids_path.string(), ids);
  std::cout << "wrote " << a.output << " [" << n << ", " << embedder.dim() << "] float32 and " << ids_path.string()
            << "\n";
  return 0;
}

}  // namespace

Command add_embed(CLI::App& app) {
  auto a = std::make_shared<EmbedArgs>();
  auto* sub = app.add_subcommand("embed", "Embed images with a backbone into a NumPy .npy [N, D] (+ ids)");
  sub->add_option("--backbone", a->backbone, "backbone.safetensors, a run folder, or a torchvision ResNet")->required();
  sub->add_option("--input", a->input, "An image folder, a file list (path per line), or a dataset JSON")->required();
  sub->add_option("--output", a->output, "The .npy file (ids go to <name>.ids.txt)")->capture_default_str();
  sub->add_option("--image-size", a->image_size, "Square side the backbone sees (default: its training size)")
      ->check(CLI::Range(1, 4096));
  sub->add_option("--batch-size", a->batch_size, "Images per forward pass")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 16));
  sub->add_option("--workers", a->workers, "Loader threads decoding images")
      ->capture_default_str()
      ->check(CLI::Range(0, 256));
  sub->add_option("--device", a->device, "auto, cpu, cuda, cuda:N")->capture_default_str();
  return [a] { return run_embed(*a); };
}

}  // namespace twins::cli

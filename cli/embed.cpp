// twins embed: images -> a NumPy .npy of features [N, D] (float32) and the ids in order.
#include <ATen/ATen.h>
#include <sys/stat.h>

#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string_view>

#include "cli/commands.h"
#include "twins/data/dataset.h"
#include "twins/embed.h"
#include "twins/eval/features.h"
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
  double save_every_s = 10;
};

// Identifies an embedding in progress: the images (data_fingerprint), the backbone file (its
// path, size and time) and what shapes the features; not the device or the batch size.
std::string embed_key(const EmbedArgs& a, const Embedder& embedder, const data::Dataset& dataset) {
  fs::path file = a.backbone;
  std::error_code ec;
  if (fs::is_directory(file, ec)) file /= "backbone.safetensors";
  struct stat s {};
  const bool seen = ::stat(file.c_str(), &s) == 0;
  return nlohmann::json{
      {"backbone", fs::absolute(file, ec).string()},
      {"backbone_bytes", seen ? static_cast<int64_t>(s.st_size) : -1},
      {"backbone_mtime_ns",
       seen ? static_cast<int64_t>(s.st_mtim.tv_sec) * 1000000000 + static_cast<int64_t>(s.st_mtim.tv_nsec) : -1},
      {"images", dataset.size()},
      {"data", eval::data_fingerprint(dataset)},
      {"dim", embedder.dim()},
      {"image_size", embedder.image_size()}}
      .dump();
}

// Images -> features, written as they come into <output>.partial (the .npy with its header for
// all N rows) with <output>.partial.json saying how many rows are on disk (every --save-every-s
// seconds, and when a stop signal ends the run). The same command continues an unfinished one.
// The finished .npy replaces <output> in one rename, then the ids are written: a run that fails
// or stops before its end leaves the previous pair as it was.
int run_embed(const EmbedArgs& a) {
  set_compute_threads(0);
  EmbedderOptions o;
  o.device = a.device, o.image_size = a.image_size, o.batch_size = a.batch_size;
  const Embedder embedder(a.backbone, o);
  const auto dataset = data::open_images(a.input, "--input");
  const int64_t n = dataset->size(), dim = embedder.dim();
  const std::string partial = a.output + ".partial";
  // One run at a time per output: a second would cut and append to the same rows.
  const std::string lock_path = a.output + ".lock";
  const io::FileLock lock(lock_path);
  if (!lock.held())
    throw std::runtime_error(a.output + ": another twins embed is writing it (" + lock_path +
                             " is locked); wait for it to finish, or choose another --output");
  const auto row_bytes = static_cast<size_t>(dim) * sizeof(float);
  io::RowFile rows(partial, eval::npy_header(at::kFloat, {n, dim}), row_bytes, embed_key(a, embedder, *dataset), n,
                   a.batch_size);
  if (rows.opened() == io::RowFile::Opened::continued)
    std::cerr << "continuing " << partial << " at image " << rows.rows() << " of " << n << "\n";
  else if (rows.opened() == io::RowFile::Opened::started_over)
    std::cerr << "starting over: " << partial
              << " was written for other images, another backbone or other settings (or is incomplete)\n";
  std::cerr << "embedding " << n - rows.rows() << " images with " << a.backbone << " (" << dim << " features, "
            << embedder.image_size() << " px)\n";
  EmbedDatasetOptions eo;
  eo.workers = a.workers, eo.progress = true, eo.first = rows.rows();
  eo.stop = stop_flag_on_signals(/*speaks=*/true);
  int64_t batches = 0;
  eo.sink = [&](int64_t first, const at::Tensor& features) {
    if (first != rows.rows() || features.dim() != 2 || features.size(1) != dim)
      throw std::logic_error("embed: batch at image " + std::to_string(first) + " where " +
                             std::to_string(rows.rows()) + " were written");
    const at::Tensor f = features.to(at::kFloat).contiguous();
    rows.append(std::string_view(static_cast<const char*>(f.data_ptr()), static_cast<size_t>(f.nbytes())), f.size(0));
    rows.save_every(a.save_every_s);
    io::fault_point("embed_batch", std::to_string(++batches));
  };
  embedder.embed_dataset(dataset, eo);
  rows.save();
  const int64_t done = rows.rows();
  std::error_code ec;
  if (done < n) {
    fs::remove(lock_path, ec);  // (while still held, as below)
    std::cout << "embed: stopped at image " << done << " of " << n << " (state in " << partial
              << "); the same command continues it\n";
    return 0;
  }
  // Both files are replaced only once every image is embedded, each atomically, one right after
  // the other.
  const fs::path ids_path = fs::path(a.output).replace_extension(".ids.txt");
  std::string ids;
  for (int64_t i = 0; i < n; ++i) ids += dataset->id(i) + "\n";
  fs::rename(partial, a.output);
  io::write_file_atomic(ids_path.string(), ids);
  fs::remove(rows.state_path(), ec);
  fs::remove(lock_path, ec);
  std::cout << "wrote " << a.output << " [" << n << ", " << dim << "] float32 and " << ids_path.string() << "\n";
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
  sub->add_option("--save-every-s", a->save_every_s,
                  "Seconds between saves of the rows written so far (to <output>.partial, which the same command "
                  "continues after a crash or Ctrl-C/SIGTERM)")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 1e6));
  return [a] { return run_embed(*a); };
}

}  // namespace twins::cli

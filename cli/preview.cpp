// twins preview: a PNG grid of a recipe's views, one row per sample: the original, then each view.
#include <ATen/ATen.h>

#include <algorithm>
#include <iostream>
#include <nlohmann/json.hpp>
#include <thread>

#include "cli/commands.h"
#include "twins/augment/functional.h"
#include "twins/augment/pipeline.h"
#include "twins/config.h"
#include "twins/data/dataset.h"
#include "twins/data/image_io.h"

namespace twins::cli {
namespace {

struct PreviewArgs {
  std::string config, out = "views.png";
  std::vector<std::string> set;
  int count = 8, workers = 1;
};

// Places `img` (uint8 HWC, 3 channels) into `canvas` at (top, left).
void paste(at::Tensor& canvas, const at::Tensor& img, int64_t top, int64_t left) {
  canvas.slice(0, top, top + img.size(0)).slice(1, left, left + img.size(1)).copy_(img);
}

int run_preview(const PreviewArgs& a) {
  const nlohmann::json cfg = config::load_config(a.config, a.set);
  if (!cfg.contains("data")) throw std::invalid_argument(a.config + ": no \"data\" section");
  if (!cfg.contains("views")) throw std::invalid_argument(a.config + ": no \"views\" section");
  if (a.count < 1) throw std::invalid_argument("--count: must be >= 1");
  const auto dataset = data::create_dataset(cfg["data"], "data");
  const auto views = augment::parse_views(cfg["views"], "views");
  const uint64_t seed = cfg.value("/train/seed"_json_pointer, 0ULL);
  const int channels = cfg.value("/model/backbone/in_channels"_json_pointer, 3);

  // Samples spread over the dataset (sorted folders would otherwise show one class).
  const int64_t n = std::min<int64_t>(a.count, dataset->size());
  std::vector<int64_t> indices(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) indices[static_cast<size_t>(i)] = i * dataset->size() / n;
  std::vector<std::vector<at::Tensor>> rows(static_cast<size_t>(n));
  std::vector<std::exception_ptr> errors(static_cast<size_t>(std::max(1, a.workers)));
  std::vector<std::thread> threads;
  for (int w = 0; w < std::max(1, a.workers); ++w) {
    threads.emplace_back([&, w] {
      try {
        for (int64_t i = w; i < n; i += std::max(1, a.workers)) {
          const int64_t index = indices[static_cast<size_t>(i)];
          const at::Tensor img = augment::functional::to_channels(dataset->image(index), channels);
          auto& row = rows[static_cast<size_t>(i)];
          row.push_back(img);
          for (size_t v = 0; v < views.size(); ++v)  // epoch 0: what training sees first
            row.push_back(views[v].apply(img, augment::Rng(seed, 0, static_cast<uint64_t>(index), v)));
        }
      } catch (...) {
        errors[static_cast<size_t>(w)] = std::current_exception();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);

  // Cells as large as the largest view; the original is scaled to the cell height.
  int64_t cell_h = 0, cell_w = 0;
  for (const auto& row : rows)
    for (size_t k = 1; k < row.size(); ++k)
      cell_h = std::max(cell_h, row[k].size(0)), cell_w = std::max(cell_w, row[k].size(1));
  const int64_t gap = 2;
  std::vector<int64_t> original_w(static_cast<size_t>(n));
  int64_t first_w = 0;
  for (int64_t i = 0; i < n; ++i) {
    at::Tensor& img = rows[static_cast<size_t>(i)][0];
    const int64_t w = std::max<int64_t>(1, img.size(1) * cell_h / img.size(0));
    if (img.size(0) != cell_h)
      img = augment::functional::resize(img, static_cast<int>(cell_h), static_cast<int>(w),
                                        augment::Interpolation::bilinear);
    first_w = std::max(first_w, img.size(1));
  }
  const int64_t width = gap + first_w + gap + static_cast<int64_t>(views.size()) * (cell_w + gap);
  const int64_t height = gap + n * (cell_h + gap);
  at::Tensor canvas = at::full({height, width, 3}, 255, at::kByte);
  for (int64_t i = 0; i < n; ++i) {
    const auto& row = rows[static_cast<size_t>(i)];
    const int64_t top = gap + i * (cell_h + gap);
    paste(canvas, augment::functional::to_channels(row[0], 3), top, gap);
    for (size_t k = 1; k < row.size(); ++k)
      paste(canvas, augment::functional::to_channels(row[k], 3), top,
            gap + first_w + gap + static_cast<int64_t>(k - 1) * (cell_w + gap));
  }
  // Small images (CIFAR, MNIST) are enlarged, pixel for pixel, so that people can see them.
  const int64_t zoom = std::max<int64_t>(1, 96 / std::max<int64_t>(1, cell_h));
  if (zoom > 1) canvas = canvas.repeat_interleave(zoom, 0).repeat_interleave(zoom, 1).contiguous();
  data::write_image(a.out, canvas);
  std::cout << "wrote " << a.out << ": " << n << " samples x (original + " << views.size() << " views)\n";
  return 0;
}

}  // namespace

Command add_preview(CLI::App& app) {
  auto a = std::make_shared<PreviewArgs>();
  auto* sub = app.add_subcommand("preview", "Write a PNG grid of a recipe's views (one row per sample)");
  sub->add_option("--config", a->config, "Recipe JSON (its data and views are used)")->required();
  sub->add_option("--set", a->set, "Override a config key: a.b=value (repeatable)");
  sub->add_option("--count", a->count, "Samples (rows)")->capture_default_str()->check(CLI::Range(1, 1024));
  sub->add_option("--out", a->out, "Output PNG")->capture_default_str();
  sub->add_option("--workers", a->workers, "Threads (the output does not depend on it)")
      ->capture_default_str()
      ->check(CLI::Range(0, 256));
  return [a] { return run_preview(*a); };
}

}  // namespace twins::cli

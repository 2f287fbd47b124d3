// twins bench views: how fast this machine makes a recipe's views, decode and augmentation
// timed apart, then through the real loader.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <filesystem>
#include <iomanip>
#include <iostream>
#include <nlohmann/json.hpp>
#include <thread>

#include "cli/commands.h"
#include "twins/augment/functional.h"
#include "twins/augment/pipeline.h"
#include "twins/config.h"
#include "twins/data/dataset.h"
#include "twins/data/loader.h"
#include "twins/io.h"
#include "twins/profiler.h"
#include "twins/runtime.h"
#include "twins/train/pretrain.h"

namespace twins::cli {
namespace {

using Clock = std::chrono::steady_clock;

struct BenchViewsArgs {
  std::string config;
  std::vector<std::string> set;
  int threads = 0;
  double seconds = 10;
  bool json = false;
};

// Runs work(thread, i) on `threads` threads for about `seconds`; returns items per second.
template <class Work>
double rate(int threads, double seconds, Work work) {
  std::atomic<bool> stop{false};
  std::atomic<int64_t> done{0};
  std::vector<std::thread> pool;
  const auto start = Clock::now();
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      for (int64_t i = t; !stop.load(std::memory_order_relaxed); i += threads) done += work(t, i);
    });
  std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
  stop = true;
  for (auto& th : pool) th.join();
  return done.load() / std::chrono::duration<double>(Clock::now() - start).count();
}

int run_bench_views(const BenchViewsArgs& a) {
  const nlohmann::json cfg = config::load_config(a.config, a.set);
  const auto dataset = data::create_dataset(cfg.at("data"), "data");
  const auto views = augment::parse_views(cfg.at("views"), "views");
  const int channels = cfg.value("/model/backbone/in_channels"_json_pointer, 3);
  const int threads = a.threads > 0 ? a.threads : usable_cores();
  const double part = a.seconds / 3;
  at::set_num_threads(1);  // one core per thread, as the loader's workers run
  const int64_t n = dataset->size();

  // 1. Decode (for in-memory formats: copying a record out), and 2. augmentation of decoded
  // images. A streaming dataset (tar shards) has no random access: only the loader is timed.
  double decode = -1, augment = -1;
  if (!dataset->streaming()) {
    decode = rate(threads, part, [&](int, int64_t i) {
      dataset->image(i % n);
      return 1;
    });
    std::vector<at::Tensor> pool;
    for (int64_t i = 0; i < std::min<int64_t>(n, 64); ++i)
      pool.push_back(augment::functional::to_channels(dataset->image(i * n / std::min<int64_t>(n, 64)), channels));
    augment = rate(threads, part, [&](int, int64_t i) {
      const at::Tensor& img = pool[static_cast<size_t>(i) % pool.size()];
      for (size_t v = 0; v < views.size(); ++v) views[v].apply(img, augment::Rng(0, 0, static_cast<uint64_t>(i), v));
      return static_cast<int64_t>(views.size());
    });
  }
  // 3. The loader end to end (decode + views + batch assembly).
  data::LoaderOptions lo;
  lo.batch_size = std::min<int64_t>(64, n), lo.workers = threads, lo.channels = channels;
  data::Loader loader(dataset, views, lo);
  int64_t loaded = 0, epoch = 0;
  loader.start_epoch(epoch);
  const auto start = Clock::now();
  const double loader_seconds = dataset->streaming() ? a.seconds : part;
  while (std::chrono::duration<double>(Clock::now() - start).count() < loader_seconds) {
    auto b = loader.next();
    if (!b) {
      loader.start_epoch(++epoch);
      continue;
    }
    loaded += b->views[0].size(0) * static_cast<int64_t>(views.size());
  }
  const double loader_rate = loaded / std::chrono::duration<double>(Clock::now() - start).count();

  nlohmann::json out = {{"config", a.config},
                        {"threads", threads},
                        {"views_per_sample", views.size()},
                        {"decode_images_per_s", nullptr},
                        {"decode_images_per_s_per_core", nullptr},
                        {"augment_views_per_s", nullptr},
                        {"augment_views_per_s_per_core", nullptr},
                        {"loader_views_per_s", loader_rate},
                        {"loader_views_per_s_per_core", loader_rate / threads},
                        {"in_memory_dataset", dataset->in_memory()},
                        {"streaming_dataset", dataset->streaming()}};
  if (decode >= 0) {
    out["decode_images_per_s"] = decode, out["decode_images_per_s_per_core"] = decode / threads;
    out["augment_views_per_s"] = augment, out["augment_views_per_s_per_core"] = augment / threads;
  }
  if (a.json) {
    std::cout << out.dump(2) << "\n";
  } else {
    std::cout << std::fixed << std::setprecision(0) << "views of " << a.config << " on " << threads << " thread(s)\n";
    if (decode >= 0)
      std::cout << "  decode:       " << decode << " images/s (" << decode / threads << " per core)\n"
                << "  augmentation: " << augment << " views/s (" << augment / threads
                << " per core), decode excluded\n";
    else
      std::cout << "  decode, augmentation: not timed apart for a streaming dataset (tar shards)\n";
    std::cout << "  loader:       " << loader_rate << " views/s (" << loader_rate / threads
              << " per core), end to end\n";
  }
  return 0;
}

}  // namespace

struct BenchStepArgs {
  std::string config, device;
  std::vector<std::string> set;
  int64_t steps = 10, warmup = 2, profile_steps = 1;
  std::string profile;
  size_t profile_rows = 25;
  bool json = false;
};

int run_bench_step(const BenchStepArgs& a) {
  const nlohmann::json cfg = config::load_config(a.config, a.set);
  if (!a.profile.empty()) {  // found before the steps run, not after
    const auto folder = std::filesystem::absolute(a.profile).parent_path();
    std::error_code ec;
    if (!std::filesystem::is_directory(folder, ec))
      throw std::invalid_argument("--profile " + a.profile + ": no folder " + folder.string() + " to write it in");
  }
  const auto r = train::bench_step(cfg, a.steps, a.warmup, a.device, a.profile.empty() ? 0 : a.profile_steps);
  if (r.profile) io::write_file_atomic(a.profile, r.profile->chrome_trace);
  if (r.device == "cpu" && !twins::ensure_correct_cpu_convolutions().empty())  // checked by the Trainer
    std::cerr << "warning: " << twins::ensure_correct_cpu_convolutions() << "\n";
  nlohmann::json out = {{"config", a.config},
                        {"device", r.device},
                        {"batch_size", r.batch_size},
                        {"steps", r.steps},
                        {"seconds_per_step", r.seconds_per_step},
                        {"images_per_s", r.images_per_second},
                        {"cuda_graph", r.cuda_graph}};
  if (r.peak_memory_gib > 0) out["peak_memory_gib"] = r.peak_memory_gib;  // the key pretrain_torch.py prints
  if (r.profile) {
    nlohmann::json ops = nlohmann::json::array();
    for (size_t i = 0; i < std::min(a.profile_rows, r.profile->ops.size()); ++i) {
      const auto& op = r.profile->ops[i];
      ops.push_back({{"name", op.name}, {"calls", op.calls}, {"self_ms", op.self_ms}, {"total_ms", op.total_ms}});
    }
    out["profile"] = {{"trace", a.profile},
                      {"steps", a.profile_steps},
                      {"span_ms", r.profile->wall_ms},
                      {"calls", r.profile->calls},
                      {"cuda_synchronized", r.profile->cuda},
                      {"ops", std::move(ops)}};
  }
  if (a.json) {
    std::cout << out.dump(2) << "\n";
    return 0;
  }
  std::cout << std::fixed << std::setprecision(2) << "training step of " << a.config << " on " << r.device << ": "
            << r.seconds_per_step << " s/step, " << std::setprecision(1) << r.images_per_second << " images/s (batch "
            << r.batch_size << ", model only, no loader" << (r.cuda_graph ? ", CUDA graph" : "") << ")\n";
  if (r.profile)
    std::cout << "\noperators of " << a.profile_steps << " more step(s) under the profiler"
              << (r.cuda_graph ? " (CUDA graph replays: profile with --set train.cuda_graph=false to see their parts)"
                               : "")
              << ":\n"
              << profiler::format_table(*r.profile, a.profile_rows) << "trace: " << a.profile
              << " (Perfetto, chrome://tracing)\n";
  return 0;
}

Command add_bench(CLI::App& app) {
  auto* bench = app.add_subcommand("bench", "Benchmarks: views (data pipeline), step (model only)");
  bench->require_subcommand(1);
  auto a = std::make_shared<BenchViewsArgs>();
  auto* views = bench->add_subcommand("views", "Views per second per core: decode, augmentation, loader");
  views->add_option("--config", a->config, "Recipe JSON (data and views)")->required();
  views->add_option("--set", a->set, "Override a config key: a.b=value (repeatable)");
  views->add_option("--threads", a->threads, "Threads (default: all cores)")->check(CLI::Range(0, 1024));
  views->add_option("--seconds", a->seconds, "Total measuring time")
      ->capture_default_str()
      ->check(CLI::Range(0.1, 86400.0));
  views->add_flag("--json", a->json, "Print JSON");
  auto s = std::make_shared<BenchStepArgs>();
  auto* step = bench->add_subcommand("step", "Time the full training step on synthetic batches (no loader)");
  step->add_option("--config", s->config, "Recipe JSON")->required();
  step->add_option("--set", s->set, "Override a config key: a.b=value (repeatable)");
  step->add_option("--steps", s->steps, "Timed steps")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 30));
  step->add_option("--warmup", s->warmup, "Untimed steps first")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 30));
  step->add_option("--device", s->device, "auto, cpu, cuda, cuda:N (default: train.device)");
  step->add_option("--profile", s->profile,
                   "After the timed steps, profile more (--profile-steps): the operators with the most self time "
                   "on stdout, a Chrome trace to this file");
  step->add_option("--profile-steps", s->profile_steps, "Steps under the profiler")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 20));
  step->add_option("--profile-rows", s->profile_rows, "Operators listed")
      ->capture_default_str()
      ->check(CLI::Range(size_t{1}, size_t{1} << 20));
  step->add_flag("--json", s->json, "Print JSON");
  return [a, views, s, step]() {
    if (views->parsed()) return run_bench_views(*a);
    if (step->parsed()) return run_bench_step(*s);
    return 2;
  };
}

}  // namespace twins::cli

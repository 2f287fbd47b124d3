// twins shards: write tar shards from any dataset twins reads (create), and count the samples of
// existing shards once (index), so every rank can plan its epochs without reading data.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "twins/data/shards.h"

namespace twins::cli {
namespace {

// A progress line on stderr: redrawn in place on a terminal, a line every 10 s otherwise.
class Progress {
 public:
  explicit Progress(std::string what) : what_(std::move(what)), tty_(::isatty(STDERR_FILENO) != 0) {}
  void show(int64_t done, int64_t total, const std::string& extra = "") {
    const auto now = std::chrono::steady_clock::now();
    const double since = std::chrono::duration<double>(now - last_).count();
    if (done < total && since < (tty_ ? 0.2 : 10.0)) return;
    last_ = now;
    const double elapsed = std::chrono::duration<double>(now - start_).count();
    const double eta = done > 0 ? elapsed * static_cast<double>(total - done) / static_cast<double>(done) : 0;
    char line[256];
    std::snprintf(line, sizeof line, "%s %lld/%lld (%.0f%%)%s, %.0f s, ETA %.0f s", what_.c_str(),
                  static_cast<long long>(done), static_cast<long long>(total),
                  total > 0 ? 100.0 * static_cast<double>(done) / static_cast<double>(total) : 100.0, extra.c_str(),
                  elapsed, eta);
    std::cerr << (tty_ ? "\r" : "") << line << (tty_ && done < total ? "" : "\n") << std::flush;
  }

 private:
  std::string what_;
  bool tty_;
  std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now(), last_{};
};

struct CreateArgs {
  std::string input, output, max_size = "1GB", index;
  int64_t max_count = 0;
  uint64_t seed = 0;
  bool no_shuffle = false;
};

struct IndexArgs {
  std::vector<std::string> urls;
  std::string output, label = "cls";
  int threads = 4;
  double read_timeout = 120;
};

int run_create(const CreateArgs& a) {
  const auto dataset = data::open_images(a.input, "--input");
  data::CreateShardsOptions o;
  o.pattern = a.output;
  o.max_bytes = data::parse_byte_size(a.max_size, "--max-size");
  o.max_count = a.max_count;
  o.shuffle = !a.no_shuffle;
  o.seed = a.seed;
  o.index_path = a.index;
  Progress bar("shards create: samples");
  o.progress = [&](int64_t done, int64_t total) { bar.show(done, total); };
  const data::CreatedShards out = data::create_shards(*dataset, o);
  int64_t bytes = 0;
  for (const auto& s : out.index.shards) bytes += s.bytes;
  std::cout << "wrote " << out.index.samples << " samples (" << out.index.num_classes << " classes) in "
            << out.files.size() << " shard(s), " << bytes / 1000000.0 << " MB, and the index " << out.index_path << "\n"
            << "use them as\n  \"data\": "
            << nlohmann::json{{"type", "shards"}, {"urls", out.urls}, {"index", out.index_path}}.dump() << "\n";
  return 0;
}

int run_index(const IndexArgs& a) {
  data::IndexOptions o;
  o.label = data::LabelSource::parse(a.label, "--label");
  o.threads = a.threads;
  o.read_timeout = a.read_timeout;
  const std::vector<std::string> urls = data::expand_urls(a.urls);
  Progress bar("shards index: shards");
  o.progress = [&](int64_t done, int64_t total, int64_t samples) {
    bar.show(done, total, ", " + std::to_string(samples) + " samples");
  };
  const data::ShardIndex index = data::build_shard_index(urls, o);
  data::write_shard_index(a.output, index);
  std::cout << "indexed " << index.shards.size() << " shard(s): " << index.samples << " samples, " << index.num_classes
            << " classes; wrote " << a.output << "\n";
  return 0;
}

}  // namespace

Command add_shards(CLI::App& app) {
  auto* shards = app.add_subcommand("shards", "Tar shards (WebDataset layout): create, index");
  shards->require_subcommand(1);
  auto c = std::make_shared<CreateArgs>();
  auto* create = shards->add_subcommand("create", "Write any dataset twins reads as tar shards, and their index");
  create->add_option("--input", c->input, "An image folder, a CSV list (path[,label]) or a dataset JSON file")
      ->required();
  create->add_option("--output", c->output, "Shard file pattern with one %d conversion, e.g. 'out/train-%06d.tar'")
      ->required();
  create->add_option("--max-size", c->max_size, "Largest shard (1GB, 500MB, 64MiB, ...)")->capture_default_str();
  create->add_option("--max-count", c->max_count, "Most samples per shard (0: no limit)")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 40));
  create->add_flag("--no-shuffle", c->no_shuffle, "Keep the input's order (default: a random order from --seed)");
  create->add_option("--seed", c->seed, "Seed of the sample order")->capture_default_str();
  create->add_option("--index", c->index, "Where the index goes (default: beside the shards, <prefix>index.json)");
  auto x = std::make_shared<IndexArgs>();
  auto* index =
      shards->add_subcommand("index", "Count the samples of existing shards once: the index data.index reads");
  index->add_option("--urls", x->urls, "Shard paths, brace patterns or pipe: commands (repeatable)")->required();
  index->add_option("--output", x->output, "The index file (JSON)")->required();
  index->add_option("--label", x->label, "cls, or json:<key>")->capture_default_str();
  index->add_option("--threads", x->threads, "Shards read at once")->capture_default_str()->check(CLI::Range(1, 256));
  index->add_option("--read-timeout", x->read_timeout, "Seconds without data before a source counts as dead")
      ->capture_default_str()
      ->check(CLI::Range(0.1, 86400.0));
  return [c, create, x, index]() {
    if (create->parsed()) return run_create(*c);
    if (index->parsed()) return run_index(*x);
    return 2;
  };
}

}  // namespace twins::cli

// twins embed: images -> a NumPy .npy of features [N, D] (float32) and the ids in order.
#include <ATen/ATen.h>
#include <sys/stat.h>

#include <exception>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <numeric>
#include <optional>
#include <string_view>

#include "cli/commands.h"
#include "twins/config.h"
#include "twins/data/dataset.h"
#include "twins/distributed/communicator.h"
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
  int image_size = 0, workers = kAutoWorkers;
  int64_t batch_size = 128;
  double save_every_s = 10;
  LaunchPlan launch;  // the ranks of a data-parallel embedding
  double dist_timeout_s = 86400;
};

// Identifies an embedding in progress: the images (data_fingerprint), the backbone file (its
// path, size and time) and what shapes the features; not the device or the batch size.
nlohmann::json embed_key(const EmbedArgs& a, const Embedder& embedder, const data::Dataset& dataset) {
  fs::path file = a.backbone;
  std::error_code ec;
  if (fs::is_directory(file, ec)) file /= "backbone.safetensors";
  struct stat s {};
  const bool seen = ::stat(file.c_str(), &s) == 0;
  return {{"backbone", fs::absolute(file, ec).string()},
          {"backbone_bytes", seen ? static_cast<int64_t>(s.st_size) : -1},
          {"backbone_mtime_ns",
           seen ? static_cast<int64_t>(s.st_mtim.tv_sec) * 1000000000 + static_cast<int64_t>(s.st_mtim.tv_nsec) : -1},
          {"images", dataset.size()},
          {"data", eval::data_fingerprint(dataset)},
          {"dim", embedder.dim()},
          {"image_size", embedder.image_size()}};
}

// Embeds `images` into the rows of `rows` from where it stands (a stop signal, `stop`, ends it
// early); returns the rows on disk, saved.
int64_t embed_rows(const EmbedArgs& a, const Embedder& embedder, std::shared_ptr<const data::Dataset> images,
                   io::RowFile& rows, const std::atomic<bool>* stop, bool progress) {
  const int64_t dim = embedder.dim();
  EmbedDatasetOptions eo;
  eo.workers = a.workers, eo.progress = progress, eo.first = rows.rows(), eo.stop = stop;
  int64_t batches = 0;
  eo.sink = [&](int64_t first, const at::Tensor& features) {
    if (first != rows.rows() || features.dim() != 2 || features.size(1) != dim)
      throw std::logic_error("embed: batch at image " + std::to_string(first) + " where " +
                             std::to_string(rows.rows()) + " were written");
    const at::Tensor f = features.to(at::kFloat).contiguous();
    rows.append(std::string_view(static_cast<const char*>(f.data_ptr()), static_cast<size_t>(f.nbytes())), f.size(0));
    rows.save_every(a.save_every_s);
    io::fault_point("embed_batch", rows.path() + ", batch " + std::to_string(++batches));
  };
  embedder.embed_dataset(std::move(images), eo);
  rows.save();
  return rows.rows();
}

// The ids beside the .npy: <output without .npy>.ids.txt.
std::string ids_path_of(const EmbedArgs& a) { return fs::path(a.output).replace_extension(".ids.txt").string(); }

// The ids file's text: a line per image.
std::string ids_of(const data::Dataset& dataset) {
  std::string ids;
  for (int64_t i = 0; i < dataset.size(); ++i) ids += dataset.id(i) + "\n";
  return ids;
}

// The .npy in <output>.partial, whole, replaces <output> in one rename, then the ids, already
// written whole beside (<ids>.partial), replace theirs in another; a crash between the two leaves
// what finish_interrupted completes.
void finish(const EmbedArgs& a, const data::Dataset& dataset, io::RowFile& rows, int64_t dim) {
  const std::string ids_path = ids_path_of(a), waiting = ids_path + ".partial";
  io::write_file_atomic(waiting, ids_of(dataset));
  fs::rename(rows.path(), a.output);
  io::fault_point("embed_renamed", a.output);
  fs::rename(waiting, ids_path);
  std::error_code ec;
  fs::remove(rows.state_path(), ec);
  std::cout << "wrote " << a.output << " [" << dataset.size() << ", " << dim << "] float32 and " << ids_path << "\n";
}

// A run of this command (the state of <output>.partial has its key `key` and all n rows) that
// died between finish's two renames: <output> is its .npy, whole, and its ids, these images',
// wait in <ids>.partial. Renames them, as that run would have, and says so; false when there is
// no such run.
bool finish_interrupted(const EmbedArgs& a, const data::Dataset& dataset, const std::string& key, int64_t dim) {
  const int64_t n = dataset.size();
  const std::string partial = a.output + ".partial", state_path = io::RowFile::state_path_for(partial);
  const std::string ids_path = ids_path_of(a), waiting = ids_path + ".partial";
  std::error_code ec;
  if (fs::exists(partial, ec) || !fs::exists(waiting, ec) || !fs::exists(state_path, ec)) return false;
  std::ifstream in(state_path);
  const nlohmann::json state = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  const auto bytes = eval::npy_header(at::kFloat, {n, dim}).size() + static_cast<uintmax_t>(n * dim) * sizeof(float);
  if (!state.is_object() || state.value("key", nlohmann::json()) != key ||
      state.value("rows_done", nlohmann::json()) != nlohmann::json(n) || fs::file_size(a.output, ec) != bytes || ec)
    return false;
  std::ifstream ids_file(waiting, std::ios::binary);
  const std::string ids((std::istreambuf_iterator<char>(ids_file)), std::istreambuf_iterator<char>());
  if (ids != ids_of(dataset)) return false;  // (another output's, whose ids are named alike)
  fs::rename(waiting, ids_path);
  fs::remove(state_path, ec);
  std::cout << "wrote " << a.output << " [" << n << ", " << dim << "] float32 and " << ids_path
            << " (finishing the run that stopped between renaming the two)\n";
  return true;
}

// The error for an output another twins embed is writing (its lock `lock` held).
std::string busy(const EmbedArgs& a, const std::string& lock) {
  return a.output + ": another twins embed is writing it (" + lock +
         " is locked); wait for it to finish, or choose another --output";
}

// Rank r of W embeds images [n r / W, n (r + 1) / W): its own rows file beside the output.
std::pair<int64_t, int64_t> share_of(int64_t n, int64_t rank, int64_t world) {
  return {n * rank / world, n * (rank + 1) / world};
}
std::string rank_key(nlohmann::json key, int64_t rank, int64_t world, int64_t n) {
  const auto [lo, hi] = share_of(n, rank, world);
  key["rank"] = rank, key["world_size"] = world, key["first_image"] = lo, key["end_image"] = hi;
  return key.dump();
}

// Done (one process, or rank 0 of a job): removes the ranks' rows files, of runs on any number of
// ranks (but for files still held), then the output's lock, while still holding it.
void remove_rank_rows(const EmbedArgs& a) {
  io::remove_unheld_rows(fs::path(a.output).parent_path().string(), fs::path(a.output).filename().string());
  std::error_code ec;
  fs::remove(a.output + ".lock", ec);
}

// Images -> features, written as they come into <output>.partial (the .npy with its header for
// all N rows) with <output>.partial.json saying how many rows are on disk (every --save-every-s
// seconds, and when a stop signal ends the run). The same command continues an unfinished one.
// A run that fails or stops before its end leaves the previous pair as it was.
int run_single(const EmbedArgs& a, const Embedder& embedder, const std::shared_ptr<const data::Dataset>& dataset) {
  const int64_t n = dataset->size(), dim = embedder.dim();
  const std::string partial = a.output + ".partial";
  // One run at a time per output: a second would cut and append to the same rows.
  const std::string lock_path = a.output + ".lock";
  const io::FileLock lock(lock_path);
  if (!lock.held()) throw std::runtime_error(busy(a, lock_path));
  const auto row_bytes = static_cast<size_t>(dim) * sizeof(float);
  const std::string key = embed_key(a, embedder, *dataset).dump();
  std::error_code ec;
  if (finish_interrupted(a, *dataset, key, dim)) {
    remove_rank_rows(a);
    return 0;
  }
  io::RowFile rows(partial, eval::npy_header(at::kFloat, {n, dim}), row_bytes, key, n, a.batch_size);
  if (rows.opened() == io::RowFile::Opened::continued)
    std::cerr << "continuing " << partial << " at image " << rows.rows() << " of " << n << "\n";
  else if (rows.opened() == io::RowFile::Opened::started_over)
    std::cerr << "starting over: " << partial
              << " was written for other images, another backbone or other settings (or is incomplete)\n";
  std::cerr << "embedding " << n - rows.rows() << " images with " << a.backbone << " (" << dim << " features, "
            << embedder.image_size() << " px)\n";
  const int64_t done = embed_rows(a, embedder, dataset, rows, stop_flag_on_signals(/*speaks=*/true), true);
  if (done < n) {
    fs::remove(lock_path, ec);  // (while still held, as below)
    std::cout << "embed: stopped at image " << done << " of " << n << " (state in " << partial
              << "); the same command continues it\n";
    return 0;
  }
  finish(a, *dataset, rows, dim);
  remove_rank_rows(a);
  return 0;
}

// The same over the ranks of a job: rank r embeds its contiguous share into
// <output>.rank<r>-of-<W>.partial (each continued by the same command on as many ranks), then
// rank 0 copies the shares, in order, into <output>.partial (itself continued, should rank 0 die
// while copying) and finishes as one process does. Rank 0 holds <output>.lock throughout (one
// job or process per output), each rank its own file's lock while it writes. Every rank must see
// the output's folder (one file system for every node).
int run_ranks(const EmbedArgs& a, const Embedder& embedder, const std::shared_ptr<const data::Dataset>& dataset,
              distributed::Communicator& comm) {
  const int64_t n = dataset->size(), dim = embedder.dim(), rank = comm.rank(), world = comm.world_size();
  std::optional<io::FileLock> output_lock;
  if (rank == 0) output_lock.emplace(a.output + ".lock");
  if (comm.any(output_lock && !output_lock->held()))  // (before any rank touches its file)
    throw std::runtime_error(busy(a, a.output + ".lock"));
  const auto row_bytes = static_cast<size_t>(dim) * sizeof(float);
  const nlohmann::json key = embed_key(a, embedder, *dataset);
  nlohmann::json whole_key = key;  // rank 0's <output>.partial, the shares put together
  whole_key["from_ranks"] = world;
  bool finished = false;  // (rank 0's; an error in it, once every rank knows)
  std::exception_ptr failed;
  if (rank == 0) try {
      finished = finish_interrupted(a, *dataset, whole_key.dump(), dim);
    } catch (const std::exception&) {
      failed = std::current_exception();
    }
  if (comm.any(finished || failed)) {
    if (failed) std::rethrow_exception(failed);
    if (rank == 0) remove_rank_rows(a);
    return 0;
  }
  const auto [lo, hi] = share_of(n, rank, world);
  const std::string mine = io::rank_rows_path(a.output, rank, world);
  if (rank == 0)
    std::cerr << "embedding " << n << " images with " << a.backbone << " (" << dim << " features, "
              << embedder.image_size() << " px) on " << world << " ranks\n";
  const std::atomic<bool>* stop = stop_flag_on_signals(/*speaks=*/rank == 0);  // (every rank: the launcher forwards)
  int64_t done = 0;
  if (hi > lo) {
    const io::FileLock lock(mine + ".lock");
    if (!lock.held()) throw std::runtime_error(busy(a, mine + ".lock"));
    io::RowFile rows(mine, "", row_bytes, rank_key(key, rank, world, n), hi - lo, a.batch_size);
    if (rows.opened() == io::RowFile::Opened::continued)
      std::cerr << "rank " + std::to_string(rank) + " of " + std::to_string(world) + ": continuing " + mine +
                       " at image " + std::to_string(rows.rows()) + " of " + std::to_string(hi - lo) +
                       "\n";  // (at once)
    std::vector<int64_t> share(static_cast<size_t>(hi - lo));
    std::iota(share.begin(), share.end(), lo);
    done = embed_rows(a, embedder, data::subset(dataset, std::move(share)), rows, stop, rank == 0);
  }
  if (comm.any(done < hi - lo)) {
    if (rank == 0) {
      std::error_code ec;
      fs::remove(a.output + ".lock", ec);  // (while still held, as one process does)
      std::cout << "embed: stopped before every rank's share was embedded (their rows are in " << a.output
                << ".rank<r>-of-" << world << ".partial); the same command on " << world << " ranks continues it\n";
    }
    return 0;
  }
  if (rank != 0) return 0;  // rank 0 puts the shares together
  io::RowFile whole(a.output + ".partial", eval::npy_header(at::kFloat, {n, dim}), row_bytes, whole_key.dump(), n, 1);
  std::cerr << "putting " << world << " ranks' rows together in " << a.output;
  if (whole.opened() == io::RowFile::Opened::continued)
    std::cerr << " (continuing " << whole.path() << " at image " << whole.rows() << " of " << n << ")";
  std::cerr << "\n";
  std::string bytes;
  const int64_t chunk = std::max<int64_t>(1, (int64_t{64} << 20) / static_cast<int64_t>(row_bytes));
  for (int64_t r = 0; r < world; ++r) {
    const auto [first, end] = share_of(n, r, world);
    if (whole.rows() >= end) continue;
    // (Read only: a file this rank cannot see whole, its folder not shared, is an error, not rows lost.)
    const io::RowFile part =
        io::RowFile::saved(io::rank_rows_path(a.output, r, world), 0, row_bytes, rank_key(key, r, world, n));
    if (part.rows() != end - first)
      throw std::runtime_error(part.path() + ": holds " + std::to_string(part.rows()) + " of rank " +
                               std::to_string(r) + "'s " + std::to_string(end - first) +
                               " rows; is the output's folder one every node sees?");
    for (int64_t at_row = whole.rows() - first; at_row < end - first; at_row += chunk) {
      const int64_t count = std::min(chunk, end - first - at_row);
      bytes.resize(static_cast<size_t>(count) * row_bytes);
      part.read(at_row, count, bytes.data());
      whole.append(bytes, count);
      whole.save_every(a.save_every_s);
    }
    io::fault_point("embed_assemble", "rank " + std::to_string(r));
  }
  whole.save();
  finish(a, *dataset, whole, dim);
  remove_rank_rows(a);
  return 0;
}

int run_embed(const EmbedArgs& a) {
  a.launch.check();
  if (a.launch.nproc_per_node > 0) return launch_local(a.launch, 5.0);
  set_compute_threads(0);
  EmbedderOptions o;
  o.device = a.device, o.image_size = a.image_size, o.batch_size = a.batch_size;
  // A rank of a job (a launcher started this process): its own GPU, and the others to agree with.
  std::shared_ptr<distributed::Communicator> comm;
  const distributed::Environment env = distributed::detect_environment();
  if (env.launcher != "none") {
    const at::Device device = resolve_rank_device(a.device, env.local_rank, "--device");
    o.device = device.str();
    distributed::CommunicatorOptions co;
    co.timeout_s = a.dist_timeout_s;
    comm = distributed::Communicator::create(env, device, co);
  }
  const Embedder embedder(a.backbone, o);
  const auto dataset = data::open_images(a.input, "--input");
  if (comm && comm->world_size() > 1) {
    if (!dataset->streaming()) return run_ranks(a, embedder, dataset, *comm);
    if (comm->rank() != 0) return 0;
    std::cerr << "embed: tar shards are read in their own order: rank 0 embeds them alone\n";
  }
  return run_single(a, embedder, dataset);
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
  sub->add_option_function<std::string>(
         "--workers",
         [a](const std::string& v) {
           if (v == "auto") {
             a->workers = kAutoWorkers;
             return;
           }
           const auto n = config::parse_integer(v);
           if (!n || *n < 0 || *n > 256)
             throw CLI::ValidationError("--workers", "\"" + v + "\" is not a number of threads in [0, 256] or auto");
           a->workers = static_cast<int>(*n);
         },
         "Loader threads decoding images (default auto: every core but one with a GPU, 2 on the CPU)")
      ->type_name("N|auto");
  sub->add_option("--device", a->device, "auto, cpu, cuda, cuda:N")->capture_default_str();
  sub->add_option("--save-every-s", a->save_every_s,
                  "Seconds between saves of the rows written so far (to <output>.partial, which the same command "
                  "continues after a crash or Ctrl-C/SIGTERM)")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 1e6));
  a->launch.add_options(*sub);
  sub->add_option("--dist-timeout-s", a->dist_timeout_s,
                  "On several ranks: how long the ranks wait for each other (to join; the ranks done for the "
                  "others' shares); a rank that dies, or whose machine goes down, is noticed within a minute anyway")
      ->capture_default_str()
      ->check(CLI::Range(1.0, 1e7));
  return [a] { return run_embed(*a); };
}

}  // namespace twins::cli

#include "twins/data/loader.h"

#include <ATen/ATen.h>
#include <opencv2/core.hpp>

#include <atomic>
#include <condition_variable>
#include <map>
#include <mutex>
#include <numeric>
#include <system_error>
#include <thread>

#include "twins/augment/functional.h"

namespace twins::data {

struct Loader::State {
  std::shared_ptr<const Dataset> dataset;
  std::vector<augment::View> views;
  LoaderOptions options;
  std::atomic<int64_t> skipped{0};

  std::mutex mutex;
  std::condition_variable work_cv, ready_cv;
  bool stop = false;
  uint64_t generation = 0;  // bumped by start_epoch: workers drop stale results
  int64_t epoch = -1;
  std::vector<int64_t> order;
  int64_t num_batches = 0, claim = 0, deliver = 0;
  struct Result {
    std::optional<Batch> batch;
    std::exception_ptr error;
  };
  std::map<int64_t, Result> ready;
  std::vector<std::thread> threads;

  // Builds batch b of the current epoch (indices copied under the lock by the caller).
  Batch build(int64_t epoch_, int64_t b, const std::vector<int64_t>& indices) {
    const int64_t n = static_cast<int64_t>(indices.size());
    Batch batch;
    batch.epoch = epoch_, batch.index = b;
    batch.labels = at::empty({n}, at::kLong);
    batch.indices = at::empty({n}, at::kLong);
    batch.views.resize(views.size());
    for (int64_t j = 0; j < n; ++j) {
      int64_t index = indices[static_cast<size_t>(j)];
      at::Tensor img;
      for (int64_t tries = 0;; ++tries) {
        try {
          img = dataset->image(index);
          break;
        } catch (const BadSample& e) {
          if (dataset->on_bad_sample == OnBadSample::error || tries + 1 >= dataset->size())
            throw std::runtime_error("sample " + std::to_string(index) + ": " + e.what() +
                                     " (set on_bad_sample to \"skip\" to replace bad samples)");
          skipped.fetch_add(1);
          index = (index + 1) % dataset->size();  // deterministic replacement
        }
      }
      try {
        img = augment::functional::to_channels(img, options.channels);
        batch.labels[j] = dataset->label(index);
        batch.indices[j] = index;
        for (size_t v = 0; v < views.size(); ++v) {
          const at::Tensor out = views[v].apply(
              img, augment::Rng(options.seed, static_cast<uint64_t>(epoch_), static_cast<uint64_t>(index), v));
          if (!batch.views[v].defined()) {
            auto opts = at::TensorOptions().dtype(at::kByte);
            if (options.pin_memory) opts = opts.pinned_memory(true);
            batch.views[v] = at::empty({n, out.size(2), out.size(0), out.size(1)}, opts);
          } else if (out.size(0) != batch.views[v].size(2) || out.size(1) != batch.views[v].size(3)) {
            throw std::runtime_error("view " + std::to_string(v) + " gives " + std::to_string(out.size(0)) + "x" +
                                     std::to_string(out.size(1)) + " images but the batch holds " +
                                     std::to_string(batch.views[v].size(2)) + "x" +
                                     std::to_string(batch.views[v].size(3)) +
                                     ": end the view with a fixed-size op (random_resized_crop, center_crop)");
          }
          batch.views[v][j].copy_(out.permute({2, 0, 1}));
        }
      } catch (const std::exception& e) {
        throw std::runtime_error("sample " + std::to_string(index) + " (" + dataset->id(index) + "): " + e.what());
      }
    }
    return batch;
  }

  std::vector<int64_t> batch_indices(int64_t b) const {
    const int64_t bs = options.batch_size;
    const int64_t begin = b * bs, end = std::min<int64_t>(begin + bs, static_cast<int64_t>(order.size()));
    return std::vector<int64_t>(order.begin() + begin, order.begin() + end);
  }

  void worker() {
    cv::setNumThreads(0);  // OpenCV inside workers: no nested thread pools
    std::unique_lock<std::mutex> lock(mutex);
    const int64_t ahead = static_cast<int64_t>(options.prefetch) * std::max(1, options.workers);
    while (true) {
      work_cv.wait(lock, [&] { return stop || (claim < num_batches && claim < deliver + ahead); });
      if (stop) return;
      const int64_t b = claim++;
      const uint64_t gen = generation;
      const int64_t e = epoch;
      const std::vector<int64_t> indices = batch_indices(b);
      lock.unlock();
      Result r;
      try {
        r.batch = build(e, b, indices);
      } catch (...) {
        r.error = std::current_exception();
      }
      lock.lock();
      if (gen == generation) {
        ready[b] = std::move(r);
        ready_cv.notify_all();
      }
    }
  }
};

Loader::Loader(std::shared_ptr<const Dataset> dataset, std::vector<augment::View> views, LoaderOptions options)
    : state_(new State) {
  auto& s = *state_;
  if (!dataset || dataset->size() == 0) throw std::invalid_argument("loader: the dataset is empty");
  if (views.empty()) throw std::invalid_argument("loader: no views");
  if (options.batch_size < 1) throw std::invalid_argument("LoaderOptions::batch_size: must be >= 1");
  if (options.workers < 0 || options.workers > kMaxWorkers)
    throw std::invalid_argument("LoaderOptions::workers: must be in [0, " + std::to_string(kMaxWorkers) + "], got " +
                                std::to_string(options.workers));
  if (options.world_size < 1 || options.rank < 0 || options.rank >= options.world_size)
    throw std::invalid_argument("loader: rank " + std::to_string(options.rank) + " outside world size " +
                                std::to_string(options.world_size));
  if (options.channels != 1 && options.channels != 3) throw std::invalid_argument("loader: channels must be 1 or 3");
  options.prefetch = std::max(1, options.prefetch);
  s.dataset = std::move(dataset);
  s.views = std::move(views);
  s.options = options;
  if (batches_per_epoch() == 0)
    throw std::invalid_argument("LoaderOptions::batch_size: " + std::to_string(options.batch_size) +
                                " is larger than this rank's " + std::to_string(epoch_indices(0).size()) +
                                " samples, and drop_last leaves no batch");
  try {
    for (int i = 0; i < options.workers; ++i) s.threads.emplace_back([&s] { s.worker(); });
  } catch (const std::system_error& e) {  // out of threads: stop those started, then report
    {
      std::lock_guard<std::mutex> lock(s.mutex);
      s.stop = true;
    }
    s.work_cv.notify_all();
    for (auto& t : s.threads) t.join();
    throw std::runtime_error("loader: cannot start " + std::to_string(options.workers) + " worker threads (" +
                             e.what() + "); use fewer workers");
  }
}

Loader::~Loader() {
  {
    std::lock_guard<std::mutex> lock(state_->mutex);
    state_->stop = true;
  }
  state_->work_cv.notify_all();
  for (auto& t : state_->threads) t.join();
}

std::vector<int64_t> Loader::epoch_indices(int64_t epoch) const {
  const auto& o = state_->options;
  const int64_t n = state_->dataset->size();
  std::vector<int64_t> all(static_cast<size_t>(n));
  if (o.shuffle)  // the epoch's own stream (the view streams use view ids >= 0)
    all = augment::permutation(n, augment::Rng(o.seed, static_cast<uint64_t>(epoch), ~uint64_t(0), ~uint64_t(0)));
  else
    std::iota(all.begin(), all.end(), int64_t{0});
  // DistributedSampler: pad to a multiple of the world size by repeating from the start.
  const int64_t per_rank = (n + o.world_size - 1) / o.world_size;
  for (int64_t i = 0; static_cast<int64_t>(all.size()) < per_rank * o.world_size; ++i)
    all.push_back(all[static_cast<size_t>(i % n)]);
  std::vector<int64_t> mine;
  for (int64_t i = o.rank; i < static_cast<int64_t>(all.size()); i += o.world_size)
    mine.push_back(all[static_cast<size_t>(i)]);
  return mine;
}

int64_t Loader::batches_per_epoch() const {
  const auto& o = state_->options;
  const int64_t n = (state_->dataset->size() + o.world_size - 1) / o.world_size;
  return o.drop_last ? n / o.batch_size : (n + o.batch_size - 1) / o.batch_size;
}

void Loader::start_epoch(int64_t epoch, int64_t first) {
  auto& s = *state_;
  std::vector<int64_t> order = epoch_indices(epoch);
  const int64_t batches = batches_per_epoch();
  if (first < 0 || first > batches)
    throw std::invalid_argument("loader: batch " + std::to_string(first) + " outside the epoch's " +
                                std::to_string(batches));
  {
    std::lock_guard<std::mutex> lock(s.mutex);
    ++s.generation;
    s.ready.clear();
    s.epoch = epoch;
    s.order = std::move(order);
    s.num_batches = batches;
    s.claim = s.deliver = first;
  }
  s.work_cv.notify_all();
}

std::optional<Batch> Loader::next() {
  auto& s = *state_;
  std::unique_lock<std::mutex> lock(s.mutex);
  if (s.epoch < 0) throw std::logic_error("loader: call start_epoch() before next()");
  if (s.deliver >= s.num_batches) return std::nullopt;
  const int64_t b = s.deliver;
  State::Result r;
  if (s.threads.empty()) {
    const std::vector<int64_t> indices = s.batch_indices(b);
    s.claim = b + 1;
    lock.unlock();
    r.batch = s.build(s.epoch, b, indices);  // throws straight to the caller
    lock.lock();
  } else {
    s.ready_cv.wait(lock, [&] { return s.ready.count(b) != 0; });
    r = std::move(s.ready[b]);
    s.ready.erase(b);
  }
  ++s.deliver;
  lock.unlock();
  s.work_cv.notify_all();
  if (r.error) std::rethrow_exception(r.error);
  return std::move(r.batch);
}

int64_t Loader::skipped() const { return state_->skipped.load(); }

}  // namespace twins::data

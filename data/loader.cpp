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
  std::vector<int64_t> order;  // dataset indices, or stream positions for a streaming dataset
  std::shared_ptr<EpochStream> stream;
  int64_t num_batches = 0, claim = 0, deliver = 0;
  struct Result {
    std::optional<Batch> batch;
    std::exception_ptr error;
  };
  std::map<int64_t, Result> ready;
  std::vector<std::thread> threads;

  // The image, label and dataset index of entry j of a batch: `key` is a dataset index, or a
  // position of the epoch's stream for streaming datasets.
  struct Item {
    at::Tensor image;
    int64_t label = -1, index = -1;
  };

  Item read_indexed(int64_t index) {
    for (int64_t tries = 0;; ++tries) {
      try {
        Item it;
        it.image = dataset->image(index);
        it.label = dataset->label(index);
        it.index = index;
        return it;
      } catch (const BadSample& e) {
        if (dataset->on_bad_sample == OnBadSample::error || tries + 1 >= dataset->size())
          throw std::runtime_error("sample " + std::to_string(index) + ": " + e.what() +
                                   " (set on_bad_sample to \"skip\" to replace bad samples)");
        skipped.fetch_add(1);
        index = (index + 1) % dataset->size();  // deterministic replacement
      }
    }
  }

  // A stream's samples of one batch. A bad one (with on_bad_sample "skip") is replaced by the
  // nearest good sample of the same batch, augmented with the bad one's random stream.
  std::vector<Item> read_streamed(EpochStream& stream, const std::vector<int64_t>& positions) {
    std::vector<Item> items(positions.size());
    std::vector<bool> bad(positions.size(), false);
    for (size_t j = 0; j < positions.size(); ++j) {
      try {
        EpochStream::Sample s = stream.take(positions[j]);
        items[j] = Item{std::move(s.image), s.label, s.index};
      } catch (const BadSample& e) {
        if (dataset->on_bad_sample == OnBadSample::error)
          throw std::runtime_error(std::string(e.what()) + " (set on_bad_sample to \"skip\" to skip bad samples)");
        skipped.fetch_add(1);
        bad[j] = true;
      }
    }
    for (size_t j = 0; j < items.size(); ++j) {
      if (!bad[j]) continue;
      size_t good = items.size();
      for (size_t d = 1; d < items.size() && good == items.size(); ++d) {
        if (j >= d && !bad[j - d])
          good = j - d;
        else if (j + d < items.size() && !bad[j + d])
          good = j + d;
      }
      if (good == items.size())
        throw std::runtime_error("every sample of a batch (stream positions " + std::to_string(positions.front()) +
                                 " to " + std::to_string(positions.back()) + ") is bad");
      items[j] = items[good];
    }
    return items;
  }

  // Builds batch b of the current epoch (keys copied under the lock by the caller).
  Batch build(int64_t epoch_, int64_t b, const std::vector<int64_t>& keys, const std::shared_ptr<EpochStream>& stream) {
    const int64_t n = static_cast<int64_t>(keys.size());
    Batch batch;
    batch.epoch = epoch_, batch.index = b;
    // Pinned like the views, so that their copies to the GPU do not wait (a graphed step copies
    // them into its own tensor each step).
    batch.labels = at::empty({n}, at::TensorOptions().dtype(at::kLong).pinned_memory(options.pin_memory));
    batch.indices = at::empty({n}, at::kLong);
    batch.views.resize(views.size());
    std::vector<Item> streamed;
    if (stream) streamed = read_streamed(*stream, keys);
    for (int64_t j = 0; j < n; ++j) {
      Item item = stream ? std::move(streamed[static_cast<size_t>(j)]) : read_indexed(keys[static_cast<size_t>(j)]);
      const int64_t index = item.index;
      // The views' random stream: the dataset index, or for streams the position in the epoch
      // (a sample read twice in one epoch gets other views the second time).
      const auto stream_id = static_cast<uint64_t>(stream ? keys[static_cast<size_t>(j)] : index);
      try {
        const at::Tensor img = augment::functional::to_channels(item.image, options.channels);
        batch.labels[j] = item.label;
        batch.indices[j] = index;
        for (size_t v = 0; v < views.size(); ++v) {
          const at::Tensor out =
              views[v].apply(img, augment::Rng(options.seed, static_cast<uint64_t>(epoch_), stream_id, v));
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
      const std::shared_ptr<EpochStream> st = stream;
      lock.unlock();
      Result r;
      try {
        r.batch = build(e, b, indices, st);
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
    if (state_->stream) state_->stream->cancel();  // wakes workers waiting for streamed samples
  }
  state_->work_cv.notify_all();
  for (auto& t : state_->threads) t.join();
}

std::vector<int64_t> Loader::epoch_indices(int64_t epoch) const {
  const auto& o = state_->options;
  const int64_t n = state_->dataset->size();
  if (state_->dataset->streaming()) {
    StreamPlan plan;
    plan.seed = o.seed, plan.epoch = epoch, plan.rank = o.rank, plan.world_size = o.world_size,
    plan.shuffle = o.shuffle;
    return state_->dataset->stream_order(plan);
  }
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
  const auto& o = s.options;
  const int64_t batches = batches_per_epoch();
  if (first < 0 || first > batches)
    throw std::invalid_argument("loader: batch " + std::to_string(first) + " outside the epoch's " +
                                std::to_string(batches));
  std::vector<int64_t> order;
  std::shared_ptr<EpochStream> stream;
  if (s.dataset->streaming()) {
    // Positions of this rank's stream; the dataset knows which sample each one holds.
    order.resize(static_cast<size_t>((s.dataset->size() + o.world_size - 1) / o.world_size));
    std::iota(order.begin(), order.end(), int64_t{0});
    StreamPlan plan;
    plan.seed = o.seed, plan.epoch = epoch, plan.rank = o.rank, plan.world_size = o.world_size,
    plan.shuffle = o.shuffle;
    plan.first = first * o.batch_size;
    plan.read_ahead = (static_cast<int64_t>(o.prefetch) * std::max(1, o.workers) + 1) * o.batch_size;
    {
      std::lock_guard<std::mutex> lock(s.mutex);  // the old epoch's readers stop first
      if (s.stream) s.stream->cancel();
      s.stream.reset();
      s.claim = s.num_batches;  // no worker starts a batch of the old epoch meanwhile
    }
    stream = s.dataset->open_epoch(plan);
  } else {
    order = epoch_indices(epoch);
  }
  {
    std::lock_guard<std::mutex> lock(s.mutex);
    ++s.generation;
    s.ready.clear();
    s.epoch = epoch;
    s.stream = std::move(stream);
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
    const std::shared_ptr<EpochStream> stream = s.stream;
    s.claim = b + 1;
    lock.unlock();
    r.batch = s.build(s.epoch, b, indices, stream);  // throws straight to the caller
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

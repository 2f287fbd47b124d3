// Bucketed, overlapped gradient averaging and state broadcast (what DDP's Reducer does).
#include "twins/distributed/data_parallel.h"

#include <ATen/ATen.h>
#include <torch/nn/module.h>

#include <map>
#include <mutex>
#include <stdexcept>

namespace twins::distributed {
namespace {

// Broadcasts a list of tensors in place, one flat message per dtype.
void broadcast_tensors(const std::vector<at::Tensor>& tensors, Communicator& communicator, int root) {
  at::NoGradGuard no_grad;
  std::map<std::pair<at::ScalarType, std::string>, std::vector<at::Tensor>> groups;
  for (const auto& t : tensors)
    if (t.defined() && t.numel() > 0) groups[{t.scalar_type(), t.device().str()}].push_back(t);
  for (auto& [key, ts] : groups) {
    std::vector<at::Tensor> flat_parts;
    for (const auto& t : ts) flat_parts.push_back(t.detach().reshape({-1}));
    at::Tensor flat = at::cat(flat_parts);
    communicator.broadcast(flat, root);
    int64_t offset = 0;
    for (auto& t : ts) {
      t.detach().copy_(flat.narrow(0, offset, t.numel()).view_as(t));
      offset += t.numel();
    }
  }
}

}  // namespace

void broadcast_module(torch::nn::Module& module, Communicator& communicator, int root) {
  std::vector<at::Tensor> ts = module.parameters(true);
  for (const auto& b : module.buffers(true)) ts.push_back(b);
  broadcast_tensors(ts, communicator, root);
}

void broadcast_buffers(torch::nn::Module& module, Communicator& communicator, int root) {
  broadcast_tensors(module.buffers(true), communicator, root);
}

struct GradientReducer::State {
  std::shared_ptr<Communicator> communicator;
  std::vector<at::Tensor> params;
  std::vector<std::vector<size_t>> bucket_members;
  struct Bucket {
    at::Tensor flat;
    std::vector<int64_t> offsets;  // of each member in flat
    size_t pending = 0;            // members whose gradient has not arrived this step
    bool launched = false;
    std::function<void()> wait;
  };
  std::vector<Bucket> buckets;
  std::vector<size_t> bucket_of, slot_of;
  std::vector<char> arrived;
  size_t next_launch = 0;  // buckets start strictly in order, so every rank issues the same sequence
  bool sync = true;
  std::mutex mutex;
  std::vector<std::pair<size_t, unsigned>> hooks;

  // This step's gradient of parameter i (what .grad() will hold after accumulation) into its slot.
  void put(size_t i, const at::Tensor& fresh) {
    Bucket& b = buckets[bucket_of[i]];
    const at::Tensor& p = params[i];
    at::Tensor slot = b.flat.narrow(0, b.offsets[slot_of[i]], p.numel()).view(p.sizes());
    const at::Tensor& old = p.grad();
    if (fresh.defined() && old.defined())
      at::add_out(slot, old, fresh);
    else if (fresh.defined())
      slot.copy_(fresh);
    else if (old.defined())
      slot.copy_(old);
    else
      slot.zero_();
  }

  void launch_ready() {
    while (next_launch < buckets.size() && buckets[next_launch].pending == 0) {
      Bucket& b = buckets[next_launch++];
      b.flat.div_(communicator->world_size());
      b.wait = communicator->all_reduce_async(b.flat);
      b.launched = true;
    }
  }

  void on_gradient(size_t i, const at::Tensor& grad) {
    std::lock_guard<std::mutex> lock(mutex);
    if (!sync) return;
    if (arrived[i])
      throw std::runtime_error(
          "GradientReducer: parameter " + std::to_string(i) +
          " received two gradients before finish() (two backwards in one step: use set_sync(false) "
          "for accumulation)");
    arrived[i] = 1;
    put(i, grad);
    --buckets[bucket_of[i]].pending;
    launch_ready();
  }

  void reset() {
    std::fill(arrived.begin(), arrived.end(), 0);
    for (auto& b : buckets) b.pending = b.offsets.size(), b.launched = false, b.wait = nullptr;
    next_launch = 0;
  }
};

GradientReducer::GradientReducer(std::vector<at::Tensor> parameters, std::shared_ptr<Communicator> communicator,
                                 GradientReducerOptions options)
    : state_(std::make_shared<State>()) {
  if (!communicator) throw std::invalid_argument("GradientReducer: no communicator");
  if (options.bucket_mb <= 0) throw std::invalid_argument("train.bucket_mb: must be > 0");
  State& s = *state_;
  s.communicator = std::move(communicator);
  s.params = std::move(parameters);
  s.bucket_of.assign(s.params.size(), SIZE_MAX);
  s.slot_of.assign(s.params.size(), 0);
  s.arrived.assign(s.params.size(), 0);
  const double cap = options.bucket_mb * 1024 * 1024;
  // Reverse order: backward produces the last layers' gradients first.
  std::vector<size_t> current;
  double bytes = 0;
  auto close = [&] {
    if (current.empty()) return;
    State::Bucket b;
    int64_t n = 0;
    for (size_t i : current) b.offsets.push_back(n), n += s.params[i].numel();
    b.flat = at::zeros({n}, s.params[current[0]].options().requires_grad(false));
    for (size_t k = 0; k < current.size(); ++k) s.bucket_of[current[k]] = s.buckets.size(), s.slot_of[current[k]] = k;
    b.pending = current.size();
    s.buckets.push_back(std::move(b));
    s.bucket_members.push_back(current);
    current.clear();
    bytes = 0;
  };
  for (size_t k = s.params.size(); k-- > 0;) {
    const at::Tensor& p = s.params[k];
    if (!p.requires_grad()) continue;
    if (!current.empty() &&
        (s.params[current[0]].scalar_type() != p.scalar_type() || s.params[current[0]].device() != p.device()))
      close();
    current.push_back(k);
    bytes += static_cast<double>(p.numel() * p.element_size());
    if (bytes >= cap) close();
  }
  close();
  std::weak_ptr<State> weak = state_;
  for (size_t i = 0; i < s.params.size(); ++i) {
    if (s.bucket_of[i] == SIZE_MAX) continue;
    const unsigned id = s.params[i].register_hook([weak, i](const at::Tensor& grad) {
      if (auto st = weak.lock()) st->on_gradient(i, grad);
    });
    s.hooks.emplace_back(i, id);
  }
}

GradientReducer::~GradientReducer() {
  for (const auto& [i, id] : state_->hooks) {
    try {
      state_->params[i].remove_hook(id);
    } catch (...) {
    }
  }
}

const std::vector<std::vector<size_t>>& GradientReducer::buckets() const { return state_->bucket_members; }

void GradientReducer::set_sync(bool sync) {
  std::lock_guard<std::mutex> lock(state_->mutex);
  state_->sync = sync;
}

void GradientReducer::finish() {
  State& s = *state_;
  std::lock_guard<std::mutex> lock(s.mutex);
  if (!s.sync) return;
  at::NoGradGuard no_grad;
  // Parameters backward did not reach (unused this step) contribute what they hold, or zero.
  for (size_t i = 0; i < s.params.size(); ++i)
    if (s.bucket_of[i] != SIZE_MAX && !s.arrived[i]) {
      s.put(i, at::Tensor());
      s.arrived[i] = 1;
      --s.buckets[s.bucket_of[i]].pending;
    }
  s.launch_ready();
  std::exception_ptr error;
  for (auto& b : s.buckets) {
    try {
      if (b.wait) b.wait();
    } catch (...) {
      if (!error) error = std::current_exception();
    }
  }
  if (error) {
    s.reset();
    std::rethrow_exception(error);
  }
  for (size_t i = 0; i < s.params.size(); ++i) {
    if (s.bucket_of[i] == SIZE_MAX) continue;
    const State::Bucket& b = s.buckets[s.bucket_of[i]];
    at::Tensor& p = s.params[i];
    const at::Tensor averaged = b.flat.narrow(0, b.offsets[s.slot_of[i]], p.numel()).view(p.sizes());
    if (p.grad().defined())
      p.mutable_grad().copy_(averaged);
    else
      p.mutable_grad() = averaged.clone();
  }
  s.reset();
}

}  // namespace twins::distributed

#pragma once
// The one place where differences between LibTorch 1.13 (Debian, CPU; what CI builds) and
// LibTorch 2.x (the CUDA machines) are resolved. Code elsewhere calls these and never tests
// TORCH_VERSION_* itself.
#include <torch/version.h>

#include <ATen/Context.h>
#include <ATen/autocast_mode.h>
#include <c10/core/TensorImpl.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <cmath>
#include <cstdlib>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>

// c10d's process groups: in LibTorch 1.13 ProcessGroupGloo/NCCL derive from ProcessGroup; from
// 2.0 on they derive from Backend (ProcessGroup became a dispatcher over backends). Declared
// here only, so this header stays light.
namespace c10d {
class ProcessGroup;
class Backend;
}  // namespace c10d

#define TWINS_TORCH_AT_LEAST(major, minor) \
  (TORCH_VERSION_MAJOR > (major) || (TORCH_VERSION_MAJOR == (major) && TORCH_VERSION_MINOR >= (minor)))

#if TWINS_TORCH_AT_LEAST(2, 0)
#include <ATen/ops/scaled_dot_product_attention.h>
#else
#include <ATen/ops/dropout.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/softmax.h>
#endif

namespace twins::compat {

#if TWINS_TORCH_AT_LEAST(2, 0)
using ProcessGroupBackend = c10d::Backend;
#else
using ProcessGroupBackend = c10d::ProcessGroup;
#endif

/// Closes an NCCL process group (c10d::ProcessGroupNCCL, a template so that this header needs
/// none of NCCL's) as its destructor would, at once and locally (ncclCommAbort: no other rank
/// takes part, so a rank that left first cannot hold it up), without that destructor's warning
/// that Python's destroy_process_group() was not called. Its shutdown() is not used: with a
/// collective still on the GPU it waits for it, for ever if a peer is gone. Before LibTorch 2.5
/// nothing: the destructor does what it did there.
template <class NcclGroup>
void close_nccl_group(NcclGroup& group) {
#if TWINS_TORCH_AT_LEAST(2, 5)
  group.abort();
#else
  (void)group;
#endif
}

/// "major.minor.patch" of the LibTorch headers twins was compiled with.
inline std::string torch_version_string() {
  return std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
         std::to_string(TORCH_VERSION_PATCH);
}

/// Whether autocast is on for `device`'s ops.
inline bool autocast_enabled(at::DeviceType device) {
#if TWINS_TORCH_AT_LEAST(2, 4)
  return at::autocast::is_autocast_enabled(device);
#else
  return device == at::kCPU ? at::autocast::is_cpu_enabled() : at::autocast::is_enabled();
#endif
}

/// Autocast of `device`'s ops (CUDA or CPU) to `dtype` while alive: bf16 or fp16 mixed
/// precision. LibTorch 2.4 keys autocast's state by device type; 1.13 has one call per device.
class Autocast {
 public:
  Autocast(at::DeviceType device, bool enabled, at::ScalarType dtype) : device_(device), enabled_(enabled) {
    if (!enabled_) return;
    previous_ = autocast_enabled(device_);
#if TWINS_TORCH_AT_LEAST(2, 4)
    previous_dtype_ = at::autocast::get_autocast_dtype(device_);
    at::autocast::set_autocast_dtype(device_, dtype);
    at::autocast::set_autocast_enabled(device_, true);
#else
    if (device_ == at::kCPU) {
      previous_dtype_ = at::autocast::get_autocast_cpu_dtype();
      at::autocast::set_autocast_cpu_dtype(dtype);
      at::autocast::set_cpu_enabled(true);
    } else {
      previous_dtype_ = at::autocast::get_autocast_gpu_dtype();
      at::autocast::set_autocast_gpu_dtype(dtype);
      at::autocast::set_enabled(true);
    }
#endif
  }
  ~Autocast() {
    if (!enabled_) return;
#if TWINS_TORCH_AT_LEAST(2, 4)
    at::autocast::set_autocast_enabled(device_, previous_);
    at::autocast::set_autocast_dtype(device_, previous_dtype_);
#else
    if (device_ == at::kCPU) {
      at::autocast::set_cpu_enabled(previous_);
      at::autocast::set_autocast_cpu_dtype(previous_dtype_);
    } else {
      at::autocast::set_enabled(previous_);
      at::autocast::set_autocast_gpu_dtype(previous_dtype_);
    }
#endif
    at::autocast::clear_cache();
  }
  Autocast(const Autocast&) = delete;
  Autocast& operator=(const Autocast&) = delete;

 private:
  at::DeviceType device_;
  bool enabled_;
  bool previous_ = false;
  at::ScalarType previous_dtype_ = at::kFloat;
};

/// Ops run at their inputs' own precision while alive, inside an Autocast scope too (what
/// autocast's kernels do for themselves): for computations, such as the losses, that must stay
/// in fp32.
class NoAutocast {
 public:
  NoAutocast() : guard_(c10::autocast_dispatch_keyset) {}

 private:
  c10::impl::ExcludeDispatchKeyGuard guard_;
};

/// softmax(q k^T / sqrt(d)) v over the last two dimensions of [..., L, d] tensors, with dropout p
/// on the attention weights: ATen's fused scaled_dot_product_attention (flash / memory-efficient
/// kernels on CUDA) from LibTorch 2.0 on, the plain matmul-softmax-matmul on 1.13.
inline at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double dropout_p) {
#if TWINS_TORCH_AT_LEAST(2, 0)
  return at::scaled_dot_product_attention(q, k, v, c10::nullopt, dropout_p, /*is_causal=*/false);
#else
  const double scale = 1.0 / std::sqrt(static_cast<double>(q.size(-1)));
  at::Tensor weights = at::softmax(at::matmul(q * scale, k.transpose(-2, -1)), -1);
  if (dropout_p > 0) weights = at::dropout(weights, dropout_p, /*train=*/true);
  return at::matmul(weights, v);
#endif
}

/// Deterministic algorithms on or off (errors, not warnings, for nondeterministic ops), cuDNN's
/// deterministic convolutions included. On CUDA, cuBLAS is deterministic only with a fixed
/// workspace: CUBLAS_WORKSPACE_CONFIG=:4096:8 is set unless the user set it (PyTorch otherwise
/// refuses every matmul in deterministic mode). Call it before the first cuBLAS call.
inline void set_deterministic(bool on) {
  if (on) ::setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8", /*overwrite=*/0);
  at::globalContext().setDeterministicCuDNN(on);
  at::globalContext().setDeterministicAlgorithms(on, /*warn_only=*/false);
}

/// Begins capturing a CUDA graph (`graph` an at::cuda::CUDAGraph) in the mode where only the
/// calling thread's unsafe CUDA calls break the capture, so that the loader's threads may go on
/// pinning memory meanwhile. LibTorch 2.x takes the mode (`thread_local_mode`,
/// cudaStreamCaptureModeThreadLocal); 1.13 captures in global mode only. A template, so this
/// header needs no CUDA header.
template <class Graph, class Mode>
void capture_begin(Graph& graph, Mode thread_local_mode) {
#if TWINS_TORCH_AT_LEAST(2, 0)
  graph.capture_begin({0, 0}, thread_local_mode);
#else
  (void)thread_local_mode;
  graph.capture_begin();
#endif
}

/// The key of a parameter in torch::optim::Optimizer::state(): LibTorch 1.13 uses the
/// TensorImpl address printed as a string, LibTorch 2.x the address itself. Chosen from the map's
/// key type, so either works without naming versions.
template <class StateMap, class TensorT>
auto optimizer_state_key(const StateMap&, const TensorT& param) {
  using Key = typename StateMap::key_type;
  if constexpr (std::is_same_v<Key, std::string>) {
    std::ostringstream s;
    s << static_cast<const void*>(param.unsafeGetTensorImpl());
    return s.str();
  } else {
    return static_cast<Key>(param.unsafeGetTensorImpl());
  }
}

/// Puts each parameter group's own options back into `optimizer`, built from `groups`. Newer
/// LibTorch (2.14 has it; PyTorch #161825) rebuilds a group's options from the optimizer's
/// defaults when it is added: a custom optimizer's (LARS) group options become the defaults
/// outright, and a built-in one's keep only the fields that differ from its options class's own
/// defaults (SGD's weight decay 0 for the 1-D group is taken for "not set" and replaced by the
/// decay of the weights). twins' groups mean what they say; where LibTorch kept them (1.13) this
/// changes nothing. A template, so this header needs no optimizer header.
template <class Optimizer, class Groups>
void keep_group_options(Optimizer& optimizer, const Groups& groups) {
  auto& built = optimizer.param_groups();
  for (size_t i = 0; i < groups.size() && i < built.size(); ++i)
    if (groups[i].has_options()) built[i].set_options(groups[i].options().clone());
}

/// TCPStoreOptions::useLibUV (LibTorch 2.2 on, true by default from 2.4): whether the rendezvous
/// store runs on libuv. A LibTorch built without libuv (Debian 13's 2.6) refuses true; before 2.2
/// there is no such choice and this does nothing. Returns whether the options have the field.
namespace detail {
template <class T, class = void>
struct HasUseLibUV : std::false_type {};
template <class T>
struct HasUseLibUV<T, std::void_t<decltype(std::declval<T&>().useLibUV)>> : std::true_type {};
}  // namespace detail

template <class Options>
bool set_store_libuv(Options& options, bool on) {
  if constexpr (detail::HasUseLibUV<Options>::value) {
    options.useLibUV = on;
    return true;
  } else {
    (void)options, (void)on;
    return false;
  }
}

}  // namespace twins::compat

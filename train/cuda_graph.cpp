#include "train/cuda_graph.h"

#include <stdexcept>

#ifdef TWINS_WITH_CUDA
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>

#include "core/compat.h"
#endif

namespace twins::train::detail {

#ifdef TWINS_WITH_CUDA

bool CudaGraph::supported() { return true; }

struct CudaGraph::Impl {
  explicit Impl(const c10::Device& d) : device(d), side(c10::cuda::getStreamFromPool(false, d.index())) {}
  c10::Device device;
  c10::cuda::CUDAStream side;
  at::cuda::CUDAEvent queued, done;  // reused by every SideStream
  std::unique_ptr<at::cuda::CUDAGraph> graph;
};

struct CudaGraph::SideStream::State {
  explicit State(CudaGraph::Impl& g)
      : graph(g), device_guard(g.device), caller(c10::cuda::getCurrentCUDAStream(g.device.index())) {
    graph.queued.record(caller);  // the side stream starts after what the caller queued
    graph.queued.block(graph.side);
    stream_guard.emplace(graph.side);
  }
  ~State() {
    stream_guard.reset();
    graph.done.record(graph.side);  // the caller's later work waits for the side stream's
    graph.done.block(caller);
  }
  CudaGraph::Impl& graph;
  c10::cuda::CUDAGuard device_guard;
  c10::cuda::CUDAStream caller;
  std::optional<c10::cuda::CUDAStreamGuard> stream_guard;
};

CudaGraph::CudaGraph(const c10::Device& device) {
  if (!device.is_cuda()) throw std::invalid_argument("CudaGraph: " + device.str() + " is not a CUDA device");
  impl_ = std::make_unique<Impl>(device);
}

CudaGraph::SideStream::SideStream(CudaGraph& graph) : state_(std::make_unique<State>(*graph.impl_)) {}

void CudaGraph::capture(const std::function<void()>& work) {
  if (impl_->graph) throw std::logic_error("CudaGraph::capture: already captured");
  // As torch.cuda.graph: the warm-up's cached blocks go back to the device first, so that the
  // graph's private pool does not come on top of them.
  c10::cuda::device_synchronize();
  c10::cuda::CUDACachingAllocator::emptyCache();
  auto graph = std::make_unique<at::cuda::CUDAGraph>();
  compat::capture_begin(*graph, cudaStreamCaptureModeThreadLocal);
  try {
    work();
  } catch (...) {
    try {  // end the stream's capture; what LibTorch cleans up after a failed capture varies
      graph->capture_end();
    } catch (...) {
    }
    throw;
  }
  graph->capture_end();  // throws when CUDA found the capture invalid
  impl_->graph = std::move(graph);
}

void CudaGraph::replay() {
  if (!impl_->graph) throw std::logic_error("CudaGraph::replay: nothing captured");
  impl_->graph->replay();
}

#else  // a LibTorch without CUDA

bool CudaGraph::supported() { return false; }

struct CudaGraph::Impl {};
struct CudaGraph::SideStream::State {};

CudaGraph::CudaGraph(const c10::Device&) {
  throw std::runtime_error("CUDA graphs need twins built against a CUDA LibTorch");
}
CudaGraph::SideStream::SideStream(CudaGraph&) {}
void CudaGraph::capture(const std::function<void()>&) {}
void CudaGraph::replay() {}

#endif

CudaGraph::~CudaGraph() = default;
CudaGraph::SideStream::~SideStream() = default;
bool CudaGraph::captured() const {
#ifdef TWINS_WITH_CUDA
  return impl_ && impl_->graph;
#else
  return false;
#endif
}

}  // namespace twins::train::detail

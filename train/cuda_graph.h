#pragma once
// CUDA graphs for the training step (train.cuda_graph, private to train/): a piece of GPU work
// captured once and replayed, so that a step costs one launch instead of a thousand (the lever a
// C++ trainer has over eager PyTorch; torch.compile's "reduce-overhead" mode does the same).
//
//   CudaGraph graph(device);
//   { CudaGraph::SideStream s(graph); ...eager warm-up steps...; }
//   { CudaGraph::SideStream s(graph); graph.capture([&] { ...forward, backward... }); graph.replay(); }
//   { CudaGraph::SideStream s(graph); ...copy inputs into the captured tensors...; graph.replay(); }
//
// Captured work is recorded, not run: its kernels run at each replay(), on the same memory, so
// its inputs are copied into tensors made before the capture and its outputs (and the
// gradients it leaves in .grad) are the same tensors after every replay. It must not read
// anything back to the host. Everything runs on a side stream (CUDA refuses to capture the
// default stream), ordered after the work already queued on the caller's stream, and the
// caller's later work waits for it.
//
// Without a CUDA LibTorch (TWINS_WITH_CUDA unset, e.g. Debian's CPU build) supported() is false
// and the constructor throws.
#include <c10/core/Device.h>

#include <functional>
#include <memory>

namespace twins::train::detail {

class CudaGraph {
 public:
  /// Whether this build can capture CUDA graphs (a CUDA LibTorch).
  static bool supported();

  explicit CudaGraph(const c10::Device& device);
  ~CudaGraph();
  CudaGraph(const CudaGraph&) = delete;
  CudaGraph& operator=(const CudaGraph&) = delete;

  /// While alive, the calling thread's work on the graph's device goes to its side stream.
  class SideStream {
   public:
    explicit SideStream(CudaGraph& graph);
    ~SideStream();
    SideStream(const SideStream&) = delete;
    SideStream& operator=(const SideStream&) = delete;

   private:
    struct State;
    std::unique_ptr<State> state_;
  };

  /// Records `work` into the graph (inside a SideStream), once. If `work` throws, or CUDA refuses
  /// to capture it, the error is rethrown; LibTorch 2.x does not fully recover from a failed
  /// capture (its RNG and allocator may stay in capture mode), so callers treat it as fatal.
  void capture(const std::function<void()>& work);
  /// Runs the captured kernels once (inside a SideStream).
  void replay();
  bool captured() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace twins::train::detail

#pragma once
// An optimizer's state (per-parameter buffers such as SGD's momentum or Adam's moments, and the
// groups' options) as bytes in LibTorch's archive format, to keep in a checkpoint beside the
// weights, and back. Private to the library: training and fine-tuning checkpoints use it.
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace torch::optim {
class Optimizer;
}

namespace twins {

std::vector<uint8_t> save_optimizer_state(const torch::optim::Optimizer& optimizer);
/// `bytes`: a uint8 tensor as save_optimizer_state's bytes were stored; the optimizer must have
/// the same groups of parameters of the same shapes. The state is put on the parameters' device,
/// whichever device it was saved from.
void load_optimizer_state(torch::optim::Optimizer& optimizer, const at::Tensor& bytes);

}  // namespace twins

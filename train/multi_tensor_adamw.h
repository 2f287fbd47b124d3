#pragma once
// AdamW as multi-tensor (_foreach) ops (private to train/): LibTorch's torch::optim::AdamW steps
// each parameter with about ten kernels, which on a GPU makes a ViT's optimizer step a thousand
// launches; this one issues about ten per group. Same options, state and checkpoint format as
// torch::optim::AdamW (it is one), and on the CPU the same arithmetic, element by element
// (tests/train checks it bit for bit).
#include <torch/optim/adamw.h>

namespace twins::train::detail {

class MultiTensorAdamW : public torch::optim::AdamW {
 public:
  using torch::optim::AdamW::AdamW;
  at::Tensor step(LossClosure closure = nullptr) override;
};

}  // namespace twins::train::detail

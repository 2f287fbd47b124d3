#include "core/optimizer_state.h"

#include <torch/optim/optimizer.h>
#include <torch/serialize/archive.h>

#include <sstream>
#include <string>

namespace twins {

std::vector<uint8_t> save_optimizer_state(const torch::optim::Optimizer& optimizer) {
  torch::serialize::OutputArchive archive;
  optimizer.save(archive);
  std::ostringstream s;
  archive.save_to(s);
  const std::string bytes = s.str();
  return std::vector<uint8_t>(bytes.begin(), bytes.end());
}

void load_optimizer_state(torch::optim::Optimizer& optimizer, const at::Tensor& bytes) {
  const at::Tensor b = bytes.contiguous();
  std::istringstream s(
      std::string(reinterpret_cast<const char*>(b.data_ptr<uint8_t>()), static_cast<size_t>(b.numel())));
  // The state goes where the parameters are: a checkpoint written on a GPU resumes on the CPU and
  // the other way round (LibTorch would keep each tensor on the device it was saved from).
  c10::optional<at::Device> device;
  for (const auto& group : optimizer.param_groups())
    if (!group.params().empty()) {
      device = group.params().front().device();
      break;
    }
  torch::serialize::InputArchive archive;
  archive.load_from(s, device);
  optimizer.load(archive);
}

}  // namespace twins

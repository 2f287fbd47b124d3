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
  torch::serialize::InputArchive archive;
  archive.load_from(s);
  optimizer.load(archive);
}

}  // namespace twins

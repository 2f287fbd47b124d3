// twins export: a backbone as safetensors with torchvision's names, for PyTorch:
//   torchvision.models.resnet50().load_state_dict(safetensors.torch.load_file(f), strict=False)
// leaves only fc.* missing.
#include <iostream>

#include "cli/commands.h"
#include "twins/eval/evaluate.h"
#include "twins/models/weights.h"

namespace twins::cli {

Command add_export(CLI::App& app) {
  auto backbone = std::make_shared<std::string>(), out = std::make_shared<std::string>();
  auto* sub = app.add_subcommand("export", "Write a backbone as safetensors with torchvision's names");
  sub->add_option("--backbone", *backbone, "backbone.safetensors, a run folder, or random:<backbone json>")->required();
  sub->add_option("--out", *out, "Output .safetensors")->required();
  return [backbone, out] {
    // A backbone file keeps what it says about its training; random: says nothing.
    models::LoadedBackbone loaded;
    if (backbone->rfind("random:", 0) == 0)
      loaded.network = eval::open_backbone(*backbone);
    else
      loaded = models::read_backbone(*backbone);
    const auto& net = loaded.network;
    models::save_backbone(*out, *net, loaded.info);
    std::cout << "wrote " << *out << " (" << models::backbone_state(*net).size() << " tensors, torchvision names; "
              << "load in PyTorch with load_state_dict(..., strict=False): only fc.* missing)\n";
    return 0;
  };
}

}  // namespace twins::cli

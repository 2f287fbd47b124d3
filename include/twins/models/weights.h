#pragma once
// Backbone weights in and out, under torchvision's names: the backbone file's one contract.
//
// A backbone file is safetensors with the network's parameters and buffers under torchvision's
// names, and metadata under the keys of BackboneInfo: the architecture (so the file loads
// without its recipe) and what it was trained on (so evaluation and embedding use the same
// image size and normalisation by default). A torchvision ResNet saved with safetensors has no
// such metadata: its architecture is inferred from names and shapes.
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "twins/models/network.h"
#include "twins/models/safetensors.h"

namespace twins::models {

/// The metadata keys of a backbone file (strings, as safetensors metadata is).
namespace metadata_key {
inline constexpr const char* architecture = "twins_backbone";  ///< JSON: the backbone spec
inline constexpr const char* image_size = "twins_image_size";  ///< decimal: training view side
inline constexpr const char* normalize = "twins_normalize";    ///< JSON: {"mean": [...], "std": [...]}
inline constexpr const char* method = "twins_method";          ///< e.g. "vicreg"
inline constexpr const char* version = "twins_version";        ///< twins version that wrote it
inline constexpr const char* provenance = "twins_provenance";  ///< free text: how it was made
}  // namespace metadata_key

/// What a backbone file says about how its network was trained.
struct BackboneInfo {
  /// Side of the square training views; 0: the file does not say.
  int image_size = 0;
  /// Normalisation of the training views in [0, 1] units; empty: the file does not say.
  std::vector<double> mean, std;
  /// The method that trained it ("vicreg", ...); empty: not said (e.g. torchvision weights).
  std::string method;
  /// The twins version that wrote the file; empty for files from other tools.
  std::string version;
  /// How the weights came to be ("twins 0.1.0 pretrain, 1000 steps"; "inferred from tensor
  /// names" for files without twins metadata).
  std::string provenance;

  /// As metadata entries (only the fields that are set).
  std::map<std::string, std::string> to_metadata() const;
  /// From metadata; malformed values throw std::runtime_error naming `file` and the key.
  static BackboneInfo from_metadata(const std::map<std::string, std::string>& metadata, const std::string& file);
};

struct LoadedBackbone {
  std::shared_ptr<Network> network;  ///< in eval mode, on the CPU
  BackboneInfo info;
  std::string path;  ///< the file read (a run folder resolves to its backbone.safetensors)
};

/// Reads a backbone file (or a run folder's backbone.safetensors) once: the network, with the
/// architecture from the file's metadata or inferred from a torchvision ResNet's names and
/// shapes (`fc.*` ignored), and its BackboneInfo. Wrong names or shapes throw
/// std::runtime_error listing the first mismatches.
LoadedBackbone read_backbone(const std::string& path);

/// read_backbone(path).network.
std::shared_ptr<Network> load_backbone(const std::string& path);

/// Every parameter and buffer of `module` under "<prefix><name>" (the tensors themselves, not
/// copies).
NamedTensors module_state(const torch::nn::Module& module, const std::string& prefix = "");
/// Copies each of module_state(module, prefix)'s tensors from `file`'s tensor of that name.
/// Throws std::runtime_error naming `what` (e.g. the file) and the entry when one is missing or
/// has another shape or dtype; other entries of `file` are ignored.
void load_module_state(torch::nn::Module& module, const SafeTensorsFile& file, const std::string& what,
                       const std::string& prefix = "");

/// The backbone's parameters and buffers under their (torchvision) names.
NamedTensors backbone_state(const Network& backbone);

/// How `from`'s names and shapes differ from `into`'s: "missing <name>" (only in `into`), "shape
/// of <name>: <from_label> [..], <into_label> [..]", "unexpected <name>" (only in `from`, unless
/// `ignored(name)`); in `into`'s order, then `from`'s. Empty: copy_state_by_name may copy.
std::vector<std::string> state_differences(const NamedTensors& into, const NamedTensors& from,
                                           const std::string& into_label, const std::string& from_label,
                                           bool (*ignored)(const std::string&) = nullptr);
/// Copies into each of `into`'s tensors the tensor of that name in `from` (which must hold it, of
/// that shape: check with state_differences first).
void copy_state_by_name(const NamedTensors& into, const NamedTensors& from);
/// `head`, then the number of `problems` and the first 8 of them, one per line.
std::string list_problems(const std::string& head, const std::vector<std::string>& problems);

/// Writes `backbone` as safetensors with torchvision names, its architecture and `info`.
void save_backbone(const std::string& path, const Network& backbone, const BackboneInfo& info);
/// The same with metadata entries given directly (keys of metadata_key, or others).
void save_backbone(const std::string& path, const Network& backbone, std::map<std::string, std::string> metadata = {});

}  // namespace twins::models

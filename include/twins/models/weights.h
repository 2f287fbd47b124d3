#pragma once
// Backbone weights in and out, under torchvision's names.
#include <memory>
#include <string>

#include "twins/models/network.h"
#include "twins/models/safetensors.h"

namespace twins::models {

/// Loads a backbone from a safetensors file, or from a run folder (its backbone.safetensors).
/// The architecture comes from the file's "twins_backbone" metadata when twins wrote it;
/// otherwise (a torchvision ResNet saved with safetensors) it is inferred from the names and
/// shapes: depth per stage, basic or bottleneck blocks, width, input channels, stem. `fc.*`
/// entries are ignored. Wrong names or shapes throw std::runtime_error listing the first
/// mismatches.
std::shared_ptr<Network> load_backbone(const std::string& path);

/// The backbone's parameters and buffers under their (torchvision) names.
NamedTensors backbone_state(const Network& backbone);

/// Writes `backbone` as safetensors with torchvision names and its architecture in the metadata.
void save_backbone(const std::string& path, const Network& backbone, std::map<std::string, std::string> metadata = {});

}  // namespace twins::models

#pragma once
// Pictures people look at instead of logs, as self-contained SVG files.
#include <ATen/core/Tensor.h>

#include <string>

namespace twins::eval {

/// Training curves from a run's metrics.jsonl: loss and each term, learning rate, images/s and
/// the online probe's accuracy per epoch, one panel each. Throws std::runtime_error if the file
/// cannot be read or holds no step lines.
void write_training_curves(const std::string& metrics_jsonl, const std::string& svg_path);

/// A 2-D PCA projection of `features` [N, D] coloured by `labels` [N] (at most `max_points`
/// points, spread evenly over the set), with the explained variance in the title.
void write_projection(const at::Tensor& features, const at::Tensor& labels, const std::string& svg_path,
                      const std::string& title, int64_t max_points = 3000);

}  // namespace twins::eval

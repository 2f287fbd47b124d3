#include "twins/eval/plots.h"

#include "twins/io.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <iomanip>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <stdexcept>

namespace twins::eval {
namespace {

const char* kColours[] = {"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                          "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"};

std::string number(double v) {
  std::ostringstream s;
  if (v != 0 && (std::abs(v) < 1e-2 || std::abs(v) >= 1e5))
    s << std::setprecision(2) << std::scientific << v;
  else
    s << std::setprecision(4) << v;
  return s.str();
}

std::string escape(const std::string& text) {
  std::string out;
  for (char c : text) out += c == '<' ? "&lt;" : c == '>' ? "&gt;" : c == '&' ? "&amp;" : std::string(1, c);
  return out;
}

// One panel: several series of (x, y) in a box at (x0, y0) of size w x h.
void panel(std::ostringstream& svg, double x0, double y0, double w, double h, const std::string& title,
           const std::string& xlabel,
           const std::vector<std::pair<std::string, std::vector<std::pair<double, double>>>>& series) {
  double xmin = 1e300, xmax = -1e300, ymin = 1e300, ymax = -1e300;
  for (const auto& [name, pts] : series)
    for (const auto& [x, y] : pts)
      if (std::isfinite(y))
        xmin = std::min(xmin, x), xmax = std::max(xmax, x), ymin = std::min(ymin, y), ymax = std::max(ymax, y);
  svg << "<g><rect x='" << x0 << "' y='" << y0 << "' width='" << w << "' height='" << h
      << "' fill='white' stroke='#999'/><text x='" << x0 + w / 2 << "' y='" << y0 - 8
      << "' text-anchor='middle' font-size='14'>" << escape(title) << "</text>";
  if (xmin > xmax) {
    svg << "<text x='" << x0 + w / 2 << "' y='" << y0 + h / 2
        << "' text-anchor='middle' fill='#999'>no data</text></g>";
    return;
  }
  if (xmax == xmin) xmax = xmin + 1;
  if (ymax == ymin) ymax = ymin + 1, ymin -= 1;
  const double pad = 0.05 * (ymax - ymin);
  ymin -= pad, ymax += pad;
  auto px = [&](double x) { return x0 + (x - xmin) / (xmax - xmin) * w; };
  auto py = [&](double y) { return y0 + h - (y - ymin) / (ymax - ymin) * h; };
  svg << "<text x='" << x0 << "' y='" << y0 + h + 14 << "' font-size='10'>" << number(xmin) << "</text>"
      << "<text x='" << x0 + w << "' y='" << y0 + h + 14 << "' font-size='10' text-anchor='end'>" << number(xmax)
      << "</text>"
      << "<text x='" << x0 + w / 2 << "' y='" << y0 + h + 14 << "' font-size='10' text-anchor='middle'>"
      << escape(xlabel) << "</text>"
      << "<text x='" << x0 - 4 << "' y='" << y0 + 10 << "' font-size='10' text-anchor='end'>" << number(ymax)
      << "</text>"
      << "<text x='" << x0 - 4 << "' y='" << y0 + h << "' font-size='10' text-anchor='end'>" << number(ymin)
      << "</text>";
  for (size_t s = 0; s < series.size(); ++s) {
    const auto& [name, pts] = series[s];
    svg << "<polyline fill='none' stroke-width='1.5' stroke='" << kColours[s % 10] << "' points='";
    for (const auto& [x, y] : pts)
      if (std::isfinite(y)) svg << px(x) << "," << py(y) << " ";
    svg << "'/>";
    if (pts.size() == 1)
      svg << "<circle r='3' fill='" << kColours[s % 10] << "' cx='" << px(pts[0].first) << "' cy='" << py(pts[0].second)
          << "'/>";
    if (!name.empty())
      svg << "<text x='" << x0 + w - 6 << "' y='" << y0 + 14 + 13 * s << "' font-size='11' text-anchor='end' fill='"
          << kColours[s % 10] << "'>" << escape(name) << "</text>";
  }
  svg << "</g>";
}

}  // namespace

void write_training_curves(const std::string& metrics_jsonl, const std::string& svg_path) {
  std::ifstream in(metrics_jsonl);
  if (!in) throw std::runtime_error(metrics_jsonl + ": cannot open");
  std::vector<nlohmann::json> steps, epochs;
  std::string title;
  for (std::string line; std::getline(in, line);) {
    if (line.empty()) continue;
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const std::exception&) {
      continue;  // a line cut by a crash
    }
    if (j.contains("loss"))
      steps.push_back(j);
    else if (j.contains("epoch_seconds"))
      epochs.push_back(j);
    else if (j.contains("summary"))
      title =
          "device " + j.value("device", std::string("?")) + ", " + number(j.value("images_per_s", 0.0)) + " images/s";
  }
  if (steps.empty()) throw std::runtime_error(metrics_jsonl + ": no training steps logged yet");
  using Series = std::vector<std::pair<std::string, std::vector<std::pair<double, double>>>>;
  auto series_of = [&](const std::vector<nlohmann::json>& rows, const std::string& key) {
    std::vector<std::pair<double, double>> pts;
    for (const auto& r : rows)
      if (r.contains(key) && r[key].is_number()) pts.emplace_back(r["step"].get<double>(), r[key].get<double>());
    return pts;
  };
  Series loss{{"loss", series_of(steps, "loss")}}, terms, lr{{"lr", series_of(steps, "lr")}},
      speed{{"images/s", series_of(steps, "images_per_s")}}, probe;
  for (const auto& item : steps.back().items()) {
    static const std::vector<std::string> skip = {"step",         "epoch",     "lr",          "loss",
                                                  "images_per_s", "data_wait", "peak_rss_mb", "tau"};
    if (std::find(skip.begin(), skip.end(), item.key()) == skip.end())
      terms.emplace_back(item.key(), series_of(steps, item.key()));
  }
  for (const char* key : {"online_probe_train_top1", "online_probe_eval_top1"}) {
    auto pts = series_of(epochs, key);
    if (!pts.empty())
      probe.emplace_back(std::string(key) == "online_probe_eval_top1" ? "eval data" : "training views", pts);
  }
  std::ostringstream svg;
  const double W = 1000, H = 640;
  svg << "<svg xmlns='http://www.w3.org/2000/svg' width='" << W << "' height='" << H
      << "' font-family='sans-serif'><rect width='100%' height='100%' fill='#fafafa'/>"
      << "<text x='" << W / 2 << "' y='22' text-anchor='middle' font-size='16'>twins training curves"
      << (title.empty() ? "" : " (" + escape(title) + ")") << "</text>";
  panel(svg, 70, 60, 380, 200, "loss", "step", loss);
  panel(svg, 570, 60, 380, 200, "loss terms (unweighted)", "step", terms);
  panel(svg, 70, 350, 240, 200, "learning rate", "step", lr);
  panel(svg, 380, 350, 240, 200, "images / s", "step", speed);
  panel(svg, 690, 350, 260, 200, "online probe top-1 (%)", "step", probe);
  svg << "</svg>\n";
  io::write_file_atomic(svg_path, svg.str());
}

void write_projection(const at::Tensor& features, const at::Tensor& labels, const std::string& svg_path,
                      const std::string& title, int64_t max_points) {
  const int64_t n = features.size(0);
  if (n < 3) throw std::invalid_argument("write_projection: needs at least 3 points");
  at::Tensor x = features.to(at::kDouble);
  x = x - x.mean(0);
  // PCA through the covariance's eigenvectors (D is small: a few hundred or thousand).
  const at::Tensor cov = x.t().mm(x) / static_cast<double>(n - 1);
  const auto [values, vectors] = at::linalg_eigh(cov);
  const int64_t d = values.size(0);
  const at::Tensor top = vectors.slice(1, std::max<int64_t>(0, d - 2), d).flip({1});
  const double explained = values.slice(0, std::max<int64_t>(0, d - 2), d).sum().item<double>() /
                           std::max(1e-300, values.sum().item<double>());
  const int64_t step = std::max<int64_t>(1, n / max_points);
  const at::Tensor idx = at::arange(0, n, step, at::kLong);
  const at::Tensor p = x.index_select(0, idx).mm(top);
  const at::Tensor l = labels.index_select(0, idx).to(at::kLong);
  const double xmin = p.select(1, 0).min().item<double>(), xmax = p.select(1, 0).max().item<double>();
  const double ymin = p.select(1, top.size(1) - 1).min().item<double>(),
               ymax = p.select(1, top.size(1) - 1).max().item<double>();
  const double S = 640;
  std::ostringstream svg;
  svg << "<svg xmlns='http://www.w3.org/2000/svg' width='" << S + 120 << "' height='" << S + 60
      << "' font-family='sans-serif'><rect width='100%' height='100%' fill='white'/><text x='" << (S + 120) / 2
      << "' y='22' text-anchor='middle' font-size='15'>" << escape(title) << " (PCA, " << std::fixed
      << std::setprecision(1) << 100 * explained << "% of variance)</text>";
  auto acc_p = p.accessor<double, 2>();
  auto acc_l = l.accessor<int64_t, 1>();
  std::map<int64_t, int> seen;
  for (int64_t i = 0; i < p.size(0); ++i) {
    const double px = 20 + (acc_p[i][0] - xmin) / std::max(1e-12, xmax - xmin) * S;
    const double py = 40 + S - (acc_p[i][p.size(1) - 1] - ymin) / std::max(1e-12, ymax - ymin) * S;
    const int64_t c = acc_l[i];
    seen[c]++;
    svg << "<circle cx='" << std::setprecision(1) << px << "' cy='" << py << "' r='2.2' fill-opacity='0.7' fill='"
        << (c >= 0 ? kColours[c % 10] : "#444") << "'/>";
  }
  int row = 0;
  for (const auto& [c, count] : seen)
    svg << "<text x='" << S + 30 << "' y='" << 60 + 16 * row++ << "' font-size='12' fill='"
        << (c >= 0 ? kColours[c % 10] : "#444") << "'>"
        << (c >= 0 ? "class " + std::to_string(c) : std::string("unlabeled")) << "</text>";
  svg << "</svg>\n";
  io::write_file_atomic(svg_path, svg.str());
}

}  // namespace twins::eval

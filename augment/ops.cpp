// The augmentation ops of views, their registry, and the device-side normalisation.
// Random parameters follow torchvision 0.14's get_params; the draws come from twins' own
// counter-based streams (random.h), so distributions match torchvision, sequences do not.
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <stdexcept>

#include "twins/augment/functional.h"
#include "twins/augment/pipeline.h"
#include "twins/config.h"
#include "twins/registry.h"

namespace twins::augment {
namespace F = functional;
using config::ConfigReader;
using nlohmann::json;

namespace {

// "size": 32 or [h, w].
std::pair<int, int> read_size(ConfigReader& r, const json& spec, const std::string& key, std::pair<int, int> value) {
  r.allow(key);
  if (!spec.contains(key)) return value;
  const json& s = spec.at(key);
  // Read wide and clamped, so that 4294967328 is refused below rather than wrapped to 32.
  const auto side = [](const json& v) {
    if (v.is_number_unsigned()) return static_cast<int>(std::min<uint64_t>(v.get<uint64_t>(), 1 << 20));
    return static_cast<int>(std::clamp<int64_t>(v.get<int64_t>(), -1, 1 << 20));
  };
  if (s.is_number_integer())
    value = {side(s), side(s)};
  else if (s.is_array() && s.size() == 2 && s[0].is_number_integer() && s[1].is_number_integer())
    value = {side(s[0]), side(s[1])};
  else
    throw std::invalid_argument(r.path_of(key) + ": expected an integer or [h, w], got " + s.dump());
  config::require(value.first <= (1 << 16) && value.second <= (1 << 16), r.path_of(key), "must be at most 65536");
  config::require(value.first > 0 && value.second > 0, r.path_of(key), "must be positive");
  return value;
}

std::pair<double, double> read_range(ConfigReader& r, const std::string& key, std::pair<double, double> value) {
  std::vector<double> v{value.first, value.second};
  r.get(key, v);
  config::require(v.size() == 2 && v[0] <= v[1], r.path_of(key), "expected [min, max], min <= max");
  return {v[0], v[1]};
}

double read_probability(ConfigReader& r, double value) {
  r.get("p", value);
  config::require(value >= 0 && value <= 1, r.path_of("p"), "must be in [0, 1]");
  return value;
}

Interpolation read_interpolation(ConfigReader& r, Interpolation value) {
  std::string name = to_string(value);
  r.get("interpolation", name);
  return parse_interpolation(name, r.path_of("interpolation"));
}

json size_json(std::pair<int, int> s) { return s.first == s.second ? json(s.first) : json({s.first, s.second}); }

class RandomResizedCrop final : public Op {
 public:
  RandomResizedCrop(const json& spec, const std::string& path) {
    ConfigReader r(spec, path);
    r.allow("type");
    size_ = read_size(r, spec, "size", {224, 224});
    scale_ = read_range(r, "scale", scale_);
    ratio_ = read_range(r, "ratio", ratio_);
    interpolation_ = read_interpolation(r, interpolation_);
    r.finish();
    config::require(scale_.first > 0 && scale_.second <= 1, r.path_of("scale"), "must lie in (0, 1]");
    config::require(ratio_.first > 0, r.path_of("ratio"), "must be positive");
  }
  at::Tensor apply(const at::Tensor& img, Rng& rng) const override {
    const CropBox box =
        random_resized_crop_box(static_cast<int>(img.size(0)), static_cast<int>(img.size(1)), scale_, ratio_, rng);
    return F::resized_crop(img, box.top, box.left, box.height, box.width, size_.first, size_.second, interpolation_);
  }
  json to_json() const override {
    return {{"type", "random_resized_crop"},
            {"size", size_json(size_)},
            {"scale", {scale_.first, scale_.second}},
            {"ratio", {ratio_.first, ratio_.second}},
            {"interpolation", to_string(interpolation_)}};
  }
  std::pair<int, int> output_size() const override { return size_; }

 private:
  std::pair<int, int> size_;
  std::pair<double, double> scale_{0.08, 1.0}, ratio_{3.0 / 4.0, 4.0 / 3.0};
  Interpolation interpolation_ = Interpolation::bilinear;
};

// One image function applied with probability p (default 0.5, as torchvision's RandomHorizontalFlip,
// RandomVerticalFlip and RandomEqualize): the flips and solo-learn's equalization.
class WithProbability final : public Op {
 public:
  using Function = at::Tensor (*)(const at::Tensor&);
  WithProbability(const json& spec, const std::string& path, const char* type, Function function)
      : type_(type), function_(function) {
    ConfigReader r(spec, path);
    r.allow("type");
    p_ = read_probability(r, 0.5);
    r.finish();
  }
  at::Tensor apply(const at::Tensor& img, Rng& rng) const override { return rng.bernoulli(p_) ? function_(img) : img; }
  json to_json() const override { return {{"type", type_}, {"p", p_}}; }

 private:
  const char* type_;
  Function function_;
  double p_;
};

// lightly's rr_prob and rr_degrees: with probability p (default 0.5), a counter-clockwise turn by
// `angle` degrees (default 90: lightly's RandomRotate) or by an angle drawn uniformly from
// `degrees` ([min, max], or d for [-d, d]: torchvision's RandomRotation in a RandomApply), the
// size kept and the corners black (PIL's Image.rotate, nearest neighbour).
class RandomRotation final : public Op {
 public:
  RandomRotation(const json& spec, const std::string& path) {
    ConfigReader r(spec, path);
    r.allow("type");
    p_ = read_probability(r, 0.5);
    r.get("angle", angle_);
    r.allow("degrees");
    if (spec.contains("degrees")) {
      config::require(!spec.contains("angle"), r.path_of("degrees"), "give angle (a fixed turn) or degrees, not both");
      const json& d = spec.at("degrees");
      if (d.is_number()) {
        const double v = d.get<double>();
        config::require(v >= 0, r.path_of("degrees"), "a single value must be >= 0 (the range is [-d, d])");
        degrees_ = {{-v, v}};
      } else {
        degrees_ = read_range(r, "degrees", {0, 0});
      }
      config::require(std::fabs(degrees_->first) <= 1e9 && std::fabs(degrees_->second) <= 1e9, r.path_of("degrees"),
                      "must lie in [-1e9, 1e9]");
    }
    r.finish();
    config::require(std::fabs(angle_) <= 1e9, r.path_of("angle"), "must lie in [-1e9, 1e9]");
  }
  at::Tensor apply(const at::Tensor& img, Rng& rng) const override {
    if (!rng.bernoulli(p_)) return img;
    return F::rotate(img, degrees_ ? rng.uniform(degrees_->first, degrees_->second) : angle_);
  }
  json to_json() const override {
    json j = {{"type", "random_rotation"}, {"p", p_}};
    if (degrees_)
      j["degrees"] = {degrees_->first, degrees_->second};
    else
      j["angle"] = angle_;
    return j;
  }

 private:
  double p_, angle_ = 90;
  std::optional<std::pair<double, double>> degrees_;
};

class ColorJitter final : public Op {
 public:
  ColorJitter(const json& spec, const std::string& path) {
    ConfigReader r(spec, path);
    r.allow("type");
    r.get("brightness", brightness_);
    r.get("contrast", contrast_);
    r.get("saturation", saturation_);
    r.get("hue", hue_);
    p_ = read_probability(r, 1.0);
    r.finish();
    for (const char* key : {"brightness", "contrast", "saturation"}) {
      const double v = key[0] == 'b' ? brightness_ : key[0] == 'c' ? contrast_ : saturation_;
      config::require(v >= 0, r.path_of(key), "must be >= 0");
    }
    config::require(hue_ >= 0 && hue_ <= 0.5, r.path_of("hue"), "must be in [0, 0.5]");
  }
  at::Tensor apply(const at::Tensor& img, Rng& rng) const override {
    if (!rng.bernoulli(p_)) return img;
    // torchvision: a random order of the four, then each factor uniform in its range.
    int order[4] = {0, 1, 2, 3};
    for (int i = 3; i > 0; --i) std::swap(order[i], order[rng.integer(0, i)]);
    auto factor = [&](double x) { return rng.uniform(std::max(0.0, 1.0 - x), 1.0 + x); };
    const double b = brightness_ > 0 ? factor(brightness_) : 1.0;
    const double c = contrast_ > 0 ? factor(contrast_) : 1.0;
    const double s = saturation_ > 0 ? factor(saturation_) : 1.0;
    const double h = hue_ > 0 ? rng.uniform(-hue_, hue_) : 0.0;
    at::Tensor out = img;
    for (int fn : order) {
      if (fn == 0 && brightness_ > 0) out = F::adjust_brightness(out, b);
      if (fn == 1 && contrast_ > 0) out = F::adjust_contrast(out, c);
      if (fn == 2 && saturation_ > 0) out = F::adjust_saturation(out, s);
      if (fn == 3 && hue_ > 0) out = F::adjust_hue(out, h);
    }
    return out;
  }
  json to_json() const override {
    return {{"type", "color_jitter"},
            {"brightness", brightness_},
            {"contrast", contrast_},
            {"saturation", saturation_},
            {"hue", hue_},
            {"p", p_}};
  }

 private:
  double brightness_ = 0, contrast_ = 0, saturation_ = 0, hue_ = 0, p_ = 1.0;
};

class RandomGrayscale final : public Op {
 public:
  RandomGrayscale(const json& spec, const std::string& path) {
    ConfigReader r(spec, path);
    r.allow("type");
    p_ = read_probability(r, 0.1);
    r.finish();
  }
  at::Tensor apply(const at::Tensor& img, Rng& rng) const override {
    if (!rng.bernoulli(p_) || img.size(2) == 1) return img;
    return F::to_grayscale(img, 3);
  }
  json to_json() const override { return {{"type", "random_grayscale"}, {"p", p_}}; }

 private:
  double p_;
};

// A true Gaussian (BYOL's), not PIL's box-filter approximation (VICReg's and Barlow Twins'
// code call PIL's ImageFilter.GaussianBlur): the kernel is ~10% of the image's shorter side,
// odd, as BYOL's 23 px at 224.
class GaussianBlur final : public Op {
 public:
  GaussianBlur(const json& spec, const std::string& path) {
    ConfigReader r(spec, path);
    r.allow("type");
    p_ = read_probability(r, 1.0);
    sigma_ = read_range(r, "sigma", sigma_);
    r.get("kernel_size", kernel_size_);
    r.finish();
    config::require(sigma_.first > 0, r.path_of("sigma"), "must be positive");
    config::require(kernel_size_ == 0 || kernel_size_ % 2 == 1, r.path_of("kernel_size"),
                    "must be odd (or 0: ~10% of the image size)");
  }
  at::Tensor apply(const at::Tensor& img, Rng& rng) const override {
    if (!rng.bernoulli(p_)) return img;
    const double sigma = rng.uniform(sigma_.first, sigma_.second);
    const int side = static_cast<int>(std::min(img.size(0), img.size(1)));
    int k = kernel_size_ > 0 ? kernel_size_ : static_cast<int>(0.1 * side) | 1;
    // reflection needs the half-kernel inside the image
    while (k > 1 && k / 2 >= side) k -= 2;
    return k > 1 ? F::gaussian_blur(img, k, sigma) : img;
  }
  json to_json() const override {
    return {
        {"type", "gaussian_blur"}, {"p", p_}, {"sigma", {sigma_.first, sigma_.second}}, {"kernel_size", kernel_size_}};
  }

 private:
  double p_;
  std::pair<double, double> sigma_{0.1, 2.0};
  int kernel_size_ = 0;
};

class Solarization final : public Op {
 public:
  Solarization(const json& spec, const std::string& path) {
    ConfigReader r(spec, path);
    r.allow("type");
    p_ = read_probability(r, 0.2);
    r.get("threshold", threshold_);
    r.finish();
  }
  at::Tensor apply(const at::Tensor& img, Rng& rng) const override {
    return rng.bernoulli(p_) ? F::solarize(img, threshold_) : img;
  }
  json to_json() const override { return {{"type", "solarization"}, {"p", p_}, {"threshold", threshold_}}; }

 private:
  double p_;
  int threshold_ = 128;
};

class RandomApply final : public Op {
 public:
  RandomApply(const json& spec, const std::string& path) {
    ConfigReader r(spec, path);
    r.allow("type");
    p_ = read_probability(r, 0.5);
    r.allow("ops");
    config::require(spec.contains("ops") && spec.at("ops").is_array(), r.path_of("ops"), "expected a list of ops");
    for (size_t i = 0; i < spec.at("ops").size(); ++i)
      ops_.push_back(create_op(spec.at("ops")[i], r.path_of("ops") + "[" + std::to_string(i) + "]"));
    r.finish();
  }
  at::Tensor apply(const at::Tensor& img, Rng& rng) const override {
    if (!rng.bernoulli(p_)) return img;
    at::Tensor out = img;
    for (const auto& op : ops_) out = op->apply(out, rng);
    return out;
  }
  json to_json() const override {
    json ops = json::array();
    for (const auto& op : ops_) ops.push_back(op->to_json());
    return {{"type", "random_apply"}, {"p", p_}, {"ops", ops}};
  }

 private:
  double p_;
  std::vector<std::shared_ptr<Op>> ops_;
};

// torchvision's Resize: an int resizes the shorter side keeping the aspect ratio (the longer
// side truncated, as torchvision computes it); [h, w] resizes to exactly that.
class Resize final : public Op {
 public:
  Resize(const json& spec, const std::string& path) {
    ConfigReader r(spec, path);
    r.allow("type");
    config::require(spec.contains("size"), r.path_of("size"), "required");
    shorter_ = spec.at("size").is_number_integer();
    size_ = read_size(r, spec, "size", {0, 0});
    interpolation_ = read_interpolation(r, interpolation_);
    r.finish();
  }
  at::Tensor apply(const at::Tensor& img, Rng&) const override {
    const int h = static_cast<int>(img.size(0)), w = static_cast<int>(img.size(1));
    int oh = size_.first, ow = size_.second;
    if (shorter_) {
      if (h <= w)
        oh = size_.first, ow = static_cast<int>(static_cast<int64_t>(size_.first) * w / h);
      else
        ow = size_.first, oh = static_cast<int>(static_cast<int64_t>(size_.first) * h / w);
    }
    if (oh == h && ow == w) return img;
    return F::resize(img, oh, ow, interpolation_);
  }
  json to_json() const override {
    return {{"type", "resize"},
            {"size", shorter_ ? json(size_.first) : json({size_.first, size_.second})},
            {"interpolation", to_string(interpolation_)}};
  }
  std::pair<int, int> output_size() const override { return shorter_ ? std::pair{0, 0} : size_; }

 private:
  bool shorter_ = true;
  std::pair<int, int> size_;
  Interpolation interpolation_ = Interpolation::bilinear;
};

class CenterCrop final : public Op {
 public:
  CenterCrop(const json& spec, const std::string& path) {
    ConfigReader r(spec, path);
    r.allow("type");
    config::require(spec.contains("size"), r.path_of("size"), "required");
    size_ = read_size(r, spec, "size", {0, 0});
    r.finish();
  }
  at::Tensor apply(const at::Tensor& img, Rng&) const override {
    const int h = static_cast<int>(img.size(0)), w = static_cast<int>(img.size(1));
    const auto [ch, cw] = size_;
    // torchvision pads a too-small image symmetrically (extra pixel bottom/right), then crops
    // at int(round((h - ch) / 2)).
    const int top = h < ch ? -((ch - h) / 2) : static_cast<int>(std::nearbyint((h - ch) / 2.0));
    const int left = w < cw ? -((cw - w) / 2) : static_cast<int>(std::nearbyint((w - cw) / 2.0));
    return F::crop(img, top, left, ch, cw);
  }
  json to_json() const override { return {{"type", "center_crop"}, {"size", size_json(size_)}}; }
  std::pair<int, int> output_size() const override { return size_; }

 private:
  std::pair<int, int> size_;
};

const Registry<Op>& registry() {
  static const Registry<Op> r = [] {
    Registry<Op> r("op");
    auto add = [&r](const std::string& name, auto make) { r.add(name, make); };
    add("random_resized_crop",
        [](const json& s, const std::string& p) { return std::make_shared<RandomResizedCrop>(s, p); });
    add("random_horizontal_flip", [](const json& s, const std::string& p) {
      return std::make_shared<WithProbability>(s, p, "random_horizontal_flip", F::hflip);
    });
    add("color_jitter", [](const json& s, const std::string& p) { return std::make_shared<ColorJitter>(s, p); });
    add("random_grayscale",
        [](const json& s, const std::string& p) { return std::make_shared<RandomGrayscale>(s, p); });
    add("gaussian_blur", [](const json& s, const std::string& p) { return std::make_shared<GaussianBlur>(s, p); });
    add("solarization", [](const json& s, const std::string& p) { return std::make_shared<Solarization>(s, p); });
    add("equalization", [](const json& s, const std::string& p) {
      return std::make_shared<WithProbability>(s, p, "equalization", F::equalize);
    });
    add("random_vertical_flip", [](const json& s, const std::string& p) {
      return std::make_shared<WithProbability>(s, p, "random_vertical_flip", F::vflip);
    });
    add("random_rotation", [](const json& s, const std::string& p) { return std::make_shared<RandomRotation>(s, p); });
    add("random_apply", [](const json& s, const std::string& p) { return std::make_shared<RandomApply>(s, p); });
    add("resize", [](const json& s, const std::string& p) { return std::make_shared<Resize>(s, p); });
    add("center_crop", [](const json& s, const std::string& p) { return std::make_shared<CenterCrop>(s, p); });
    return r;
  }();
  return r;
}

Normalization parse_normalization(const json& spec, const std::string& path) {
  ConfigReader r(spec, path);
  r.allow("type");
  Normalization n;
  r.get("mean", n.mean);
  r.get("std", n.std);
  r.finish();
  config::require(n.mean.size() == n.std.size() && (n.mean.size() == 1 || n.mean.size() == 3), path,
                  "mean and std need 1 or 3 values each");
  for (double s : n.std) config::require(s > 0, r.path_of("std"), "must be positive");
  return n;
}

}  // namespace

CropBox random_resized_crop_box(int height, int width, std::pair<double, double> scale, std::pair<double, double> ratio,
                                Rng& rng) {
  const double area = static_cast<double>(height) * width;
  const double log_lo = std::log(ratio.first), log_hi = std::log(ratio.second);
  for (int attempt = 0; attempt < 10; ++attempt) {
    const double target_area = area * rng.uniform(scale.first, scale.second);
    const double aspect = std::exp(rng.uniform(log_lo, log_hi));
    // Python's round(): half to even, which nearbyint gives in the default rounding mode.
    const int w = static_cast<int>(std::nearbyint(std::sqrt(target_area * aspect)));
    const int h = static_cast<int>(std::nearbyint(std::sqrt(target_area / aspect)));
    if (0 < w && w <= width && 0 < h && h <= height) {
      const int top = static_cast<int>(rng.integer(0, height - h));
      const int left = static_cast<int>(rng.integer(0, width - w));
      return {top, left, h, w};
    }
  }
  const double in_ratio = static_cast<double>(width) / height;
  int w = width, h = height;
  if (in_ratio < ratio.first)
    h = static_cast<int>(std::nearbyint(w / ratio.first));
  else if (in_ratio > ratio.second)
    w = static_cast<int>(std::nearbyint(h * ratio.second));
  return {(height - h) / 2, (width - w) / 2, h, w};
}

std::shared_ptr<Op> create_op(const json& spec, const std::string& path) {
  if (config::type_of(spec, path) == "normalize")
    throw std::invalid_argument(path + ": normalize must be the last op of a view");
  return registry().create(spec, path);
}

std::vector<std::string> op_names() {
  std::vector<std::string> names = registry().names();
  names.push_back("normalize");  // not an op: the views' last step, parsed by parse_views
  std::sort(names.begin(), names.end());
  return names;
}

int View::output_side(int fallback) const { return size.first > 0 ? size.first : fallback; }

at::Tensor View::apply(const at::Tensor& img, Rng rng) const {
  at::Tensor out = img;
  for (const auto& op : ops) out = op->apply(out, rng);
  return out;
}

json View::to_json() const {
  json ops_json = json::array();
  for (const auto& op : ops) ops_json.push_back(op->to_json());
  ops_json.push_back({{"type", "normalize"}, {"mean", normalization.mean}, {"std", normalization.std}});
  return ops_json;
}

std::vector<View> parse_views(const json& views, const std::string& path) {
  config::require(views.is_array() && !views.empty(), path, "expected a non-empty list of views");
  std::vector<View> out;
  for (size_t v = 0; v < views.size(); ++v) {
    const std::string vpath = path + "[" + std::to_string(v) + "]";
    const json* ops = &views[v];
    int repeat = 1;
    if (views[v].is_object()) {
      ConfigReader r(views[v], vpath);
      r.get("repeat", repeat);
      r.allow("ops");
      r.finish();
      config::require(repeat >= 1, r.path_of("repeat"), "must be >= 1");
      config::require(views[v].contains("ops"), r.path_of("ops"), "required");
      ops = &views[v].at("ops");
    }
    config::require(ops->is_array(), vpath, "expected a list of ops");
    View view;
    for (size_t i = 0; i < ops->size(); ++i) {
      const json& spec = (*ops)[i];
      const std::string opath = vpath + "[" + std::to_string(i) + "]";
      if (config::type_of(spec, opath) == "normalize") {
        config::require(i + 1 == ops->size(), opath, "normalize must be the last op of a view");
        view.normalization = parse_normalization(spec, opath);
        continue;
      }
      view.ops.push_back(create_op(spec, opath));
      const auto size = view.ops.back()->output_size();
      if (size.first > 0) view.size = size;
    }
    for (int k = 0; k < repeat; ++k) out.push_back(view);
  }
  return out;
}

std::pair<at::Tensor, at::Tensor> normalization_affine(const Normalization& n, int64_t c) {
  TORCH_CHECK(static_cast<int64_t>(n.mean.size()) == c || n.mean.size() == 1 || n.mean.size() == 3,
              "normalize_batch: ", n.mean.size(), " means for ", c, " channels");
  // One channel with RGB statistics (a grey dataset with ImageNet numbers): use their average.
  std::vector<double> scale(c), shift(c);
  for (int64_t i = 0; i < c; ++i) {
    double m = n.mean.size() == 1 ? n.mean[0] : n.mean[static_cast<size_t>(i) % n.mean.size()];
    double s = n.std.size() == 1 ? n.std[0] : n.std[static_cast<size_t>(i) % n.std.size()];
    if (c == 1 && n.mean.size() == 3) {
      m = (n.mean[0] + n.mean[1] + n.mean[2]) / 3, s = (n.std[0] + n.std[1] + n.std[2]) / 3;
    }
    scale[i] = 1.0 / (255.0 * s);
    shift[i] = -m / s;
  }
  return {at::tensor(scale, at::kDouble).view({1, c, 1, 1}), at::tensor(shift, at::kDouble).view({1, c, 1, 1})};
}

at::Tensor normalize_batch(const at::Tensor& batch, const Normalization& n, const at::Device& device,
                           at::ScalarType dtype) {
  TORCH_CHECK(batch.dim() == 4 && batch.scalar_type() == at::kByte, "normalize_batch: expected uint8 [N, C, H, W]");
  const auto [scale, shift] = normalization_affine(n, batch.size(1));
  const bool non_blocking = batch.is_pinned();
  const at::Tensor x = batch.to(device, /*non_blocking=*/non_blocking);
  const auto opts = at::TensorOptions().dtype(dtype).device(device);
  return at::addcmul(shift.to(opts), x.to(dtype), scale.to(opts));
}

}  // namespace twins::augment

#include <ATen/ATen.h>

#include <cmath>
#include <map>

#include "tests/test_util.h"
#include "twins/augment/functional.h"
#include "twins/augment/pipeline.h"
#include "twins/data/image_io.h"

using namespace twins::augment;
namespace F = twins::augment::functional;
using nlohmann::json;
using twins::test::check_throws_with;

namespace {

at::Tensor run_case(const json& c, const at::Tensor& img) {
  const std::string op = c["op"];
  const json& a = c["args"];
  if (op == "adjust_brightness") return F::adjust_brightness(img, a["factor"]);
  if (op == "adjust_contrast") return F::adjust_contrast(img, a["factor"]);
  if (op == "adjust_saturation") return F::adjust_saturation(img, a["factor"]);
  if (op == "adjust_hue") return F::adjust_hue(img, a["hue_factor"]);
  if (op == "to_grayscale") return F::to_grayscale(img, a["out_channels"]);
  if (op == "solarize") return F::solarize(img, a["threshold"]);
  if (op == "hflip") return F::hflip(img);
  if (op == "vflip") return F::vflip(img);
  if (op == "equalize") return F::equalize(img);
  if (op == "rotate") return F::rotate(img, a["degrees"]);
  if (op == "gaussian_blur") return F::gaussian_blur(img, a["kernel_size"], a["sigma"]);
  if (op == "resized_crop")
    return F::resized_crop(img, a["top"], a["left"], a["height"], a["width"], a["out_h"], a["out_w"],
                           a["interpolation"].get<std::string>());
  FAIL("unknown op in manifest: ", op);
  return {};
}

}  // namespace

TEST_CASE("augment: functional ops against torchvision on PIL images") {
  const std::string dir = twins::test::reference_path("augment");
  const json manifest = twins::test::read_json(dir + "/manifest.json");
  REQUIRE(manifest["cases"].size() > 150);
  std::map<std::string, at::Tensor> inputs;
  std::map<std::string, int> worst;          // op -> largest difference in grey levels
  std::map<std::string, int64_t> differing;  // op -> values that differ at all
  for (const auto& c : manifest["cases"]) {
    const std::string input = c["input"], op = c["op"];
    CAPTURE(input);
    CAPTURE(c["output"].get<std::string>());
    CAPTURE(c["args"].dump());
    if (!inputs.count(input)) inputs[input] = twins::data::read_image(dir + "/" + input);
    const at::Tensor expected = twins::data::read_image(dir + "/" + c["output"].get<std::string>());
    const at::Tensor got = run_case(c, inputs[input]);
    REQUIRE(got.sizes() == expected.sizes());
    const at::Tensor diff = (got.to(at::kInt) - expected.to(at::kInt)).abs();
    const int max_diff = diff.max().item<int>();
    worst[op] = std::max(worst[op], max_diff);
    differing[op] += diff.gt(0).sum().item<int64_t>();
    // Everything is bit-exact but the blur, whose float32 sums differ from torch's conv2d in
    // the last bits and may round the other way.
    CHECK(max_diff <= (op == "gaussian_blur" ? 1 : 0));
  }
  for (const auto& [op, d] : worst) MESSAGE(op, ": max difference ", d, ", values differing ", differing[op]);
}

TEST_CASE("augment: functional edge cases") {
  const at::Tensor img = at::randint(0, 256, {9, 7, 3}, at::kByte);
  CHECK(at::equal(F::hflip(F::hflip(img)), img));
  // Quarter turns of a square move pixels whole; four are the identity, as is a full turn.
  const at::Tensor square = at::randint(0, 256, {5, 5, 3}, at::kByte);
  CHECK(at::equal(F::rotate(F::rotate(F::rotate(F::rotate(square, 90), 90), 90), 90), square));
  CHECK(at::equal(F::rotate(square, -90), F::rotate(square, 270)));
  CHECK(at::equal(F::rotate(square, 720), square));
  CHECK(at::equal(F::rotate(square, 90).select(2, 0)[0], square.select(2, 0).select(1, 4)));  // top row: right column
  CHECK(at::equal(F::rotate(img, 180), img.flip({0, 1})));
  CHECK(at::equal(F::vflip(F::vflip(img)), img));
  CHECK(at::equal(F::vflip(img), img.flip(0)));
  // Strided views (a transpose) give what their contiguous copies give.
  const at::Tensor wide = at::randint(0, 256, {40, 30, 3}, at::kByte).transpose(0, 1);
  CHECK(at::equal(F::vflip(wide), wide.flip(0)));
  CHECK(at::equal(F::equalize(wide), F::equalize(wide.contiguous())));
  CHECK_FALSE(at::equal(F::equalize(wide), wide));
  // 63 pixels: fewer than 255 below any channel's highest value, which PIL leaves as they are.
  CHECK(at::equal(F::equalize(img), img));
  CHECK(at::equal(F::adjust_brightness(img, 1.0), img));
  CHECK(at::equal(F::adjust_saturation(img, 1.0), img));
  CHECK(at::equal(F::resized_crop(img, 1, 2, 5, 4, 5, 4, "bicubic"), img.slice(0, 1, 6).slice(1, 2, 6)));
  CHECK(F::adjust_brightness(img, 0.0).max().item<int>() == 0);
  const at::Tensor sol = F::solarize(img, 128);
  CHECK(at::equal(sol.masked_select(img.lt(128)), img.masked_select(img.lt(128))));
  CHECK(at::equal(sol.masked_select(img.ge(128)), 255 - img.masked_select(img.ge(128))));
  // crop outside the image pads with zeros
  const at::Tensor padded = F::crop(img, -1, -1, 11, 9);
  CHECK(padded.sizes() == std::vector<int64_t>{11, 9, 3});
  CHECK(padded[0].sum().item<int64_t>() == 0);
  CHECK(at::equal(padded.slice(0, 1, 10).slice(1, 1, 8), img));
  check_throws_with<std::invalid_argument>([&] { F::resized_crop(img, 5, 0, 5, 7, 3, 3, "bilinear"); },
                                           "does not fit a 9x7 image");
  check_throws_with<std::invalid_argument>([&] { F::resize(img, 4, 4, "nearest"); }, "bilinear or bicubic");
  check_throws_with<std::invalid_argument>([&] { F::adjust_hue(img, 0.7); }, "[-0.5, 0.5]");
  check_throws_with<std::invalid_argument>([&] { F::gaussian_blur(img, 4, 1.0); }, "odd");
  check_throws_with<std::invalid_argument>([&] { F::hflip(at::zeros({4, 4, 3})); }, "expected a uint8 CPU image");
  check_throws_with<std::invalid_argument>([&] { F::hflip(at::zeros({4, 4, 2}, at::kByte)); }, "[4, 4, 2]");
}

TEST_CASE("augment: random_resized_crop draws torchvision's distribution") {
  // Reference: 20,000 draws of torchvision 0.14's RandomResizedCrop.get_params on a 400x300
  // image gave mean area fraction 0.4351 (sd 0.2161) and log aspect ratio mean 0.0314 (sd 0.1635).
  const int trials = 20000;
  double area = 0, log_ratio = 0, log_ratio_sq = 0;
  for (int i = 0; i < trials; ++i) {
    Rng rng(11, 0, i, 0);
    const CropBox b = random_resized_crop_box(300, 400, {0.08, 1.0}, {3.0 / 4, 4.0 / 3}, rng);
    REQUIRE((b.top >= 0 && b.left >= 0 && b.top + b.height <= 300 && b.left + b.width <= 400));
    area += b.height * b.width / 120000.0;
    const double r = std::log(double(b.width) / b.height);
    log_ratio += r, log_ratio_sq += r * r;
  }
  area /= trials, log_ratio /= trials;
  const double sd = std::sqrt(log_ratio_sq / trials - log_ratio * log_ratio);
  // 4 standard errors of each mean
  CHECK(std::abs(area - 0.4351) < 4 * 0.2161 / std::sqrt(trials) + 0.002);
  CHECK(std::abs(log_ratio - 0.0314) < 4 * 0.1635 / std::sqrt(trials) + 0.002);
  CHECK(sd == doctest::Approx(0.1635).epsilon(0.03).scale(0));
  // The fallback: an extreme panorama gives the central crop with the ratio clamped.
  Rng rng(1, 0, 0, 0);
  const CropBox f = random_resized_crop_box(10, 1000, {0.9, 1.0}, {3.0 / 4, 4.0 / 3}, rng);
  CHECK(f.height == 10);
  CHECK(f.width == 13);
  CHECK(f.left == (1000 - 13) / 2);
}

TEST_CASE("augment: rates of random ops") {
  const at::Tensor img = at::randint(0, 256, {32, 32, 3}, at::kByte);  // (equalize changes it)
  auto rate = [&](const char* spec_text, auto changed) {
    const auto views = parse_views(json::parse(spec_text));
    int hits = 0;
    const int trials = 4000;
    for (int i = 0; i < trials; ++i) hits += changed(views[0].apply(img, Rng(1, 2, i, 0)));
    return double(hits) / trials;
  };
  // Binomial standard deviation at 4000 trials is <= 0.008; allow 4 sigma.
  CHECK(rate(R"([[{"type": "random_horizontal_flip"}]])", [&](const at::Tensor& o) { return !at::equal(o, img); }) ==
        doctest::Approx(0.5).epsilon(0.07).scale(0));
  CHECK(rate(R"([[{"type": "random_grayscale", "p": 0.2}]])",
             [&](const at::Tensor& o) { return !at::equal(o, img); }) == doctest::Approx(0.2).epsilon(0.16).scale(0));
  CHECK(rate(R"([[{"type": "solarization", "p": 0.2}]])", [&](const at::Tensor& o) { return !at::equal(o, img); }) ==
        doctest::Approx(0.2).epsilon(0.16).scale(0));
  CHECK(rate(R"([[{"type": "random_vertical_flip"}]])", [&](const at::Tensor& o) { return !at::equal(o, img); }) ==
        doctest::Approx(0.5).epsilon(0.07).scale(0));
  CHECK(rate(R"([[{"type": "equalization", "p": 0.3}]])", [&](const at::Tensor& o) { return !at::equal(o, img); }) ==
        doctest::Approx(0.3).epsilon(0.11).scale(0));
  CHECK(rate(R"([[{"type": "random_rotation", "p": 0.3}]])", [&](const at::Tensor& o) { return !at::equal(o, img); }) ==
        doctest::Approx(0.3).epsilon(0.11).scale(0));
  CHECK(rate(R"([[{"type": "random_rotation", "p": 1, "degrees": [40, 50]}]])",
             [&](const at::Tensor& o) { return o[0][0].sum().item<int>() == 0; }) == doctest::Approx(1.0).scale(0));
  CHECK(rate(R"([[{"type": "random_apply", "p": 0.8, "ops": [{"type": "color_jitter", "brightness": 0.4}]}]])",
             [&](const at::Tensor& o) { return !at::equal(o, img); }) == doctest::Approx(0.8).epsilon(0.04).scale(0));
}

TEST_CASE("augment: random_rotation turns by an angle drawn from [-d, d] for degrees d") {
  const at::Tensor img = at::randint(0, 256, {12, 10, 3}, at::kByte);
  const auto views = parse_views(json::parse(R"([[{"type": "random_rotation", "p": 1, "degrees": 30}]])"));
  int negative = 0;
  for (int i = 0; i < 20; ++i) {
    Rng rng(1, 2, i, 0);
    CHECK(rng.bernoulli(1.0));
    const double angle = rng.uniform(-30, 30);
    negative += angle < 0;
    CHECK(at::equal(views[0].apply(img, Rng(1, 2, i, 0)), F::rotate(img, angle)));
  }
  CHECK(negative > 0);
  CHECK(negative < 20);
  CHECK(views[0].ops[0]->to_json() ==
        json::parse(R"({"type": "random_rotation", "p": 1.0, "degrees": [-30.0, 30.0]})"));
  const auto fixed = parse_views(json::parse(R"([[{"type": "random_rotation"}]])"));
  CHECK(fixed[0].ops[0]->to_json() == json::parse(R"({"type": "random_rotation", "p": 0.5, "angle": 90.0})"));
}

TEST_CASE("augment: views are deterministic per (seed, epoch, index, view)") {
  const json spec = json::parse(R"([
    [{"type": "random_resized_crop", "size": 12, "interpolation": "bicubic"},
     {"type": "random_horizontal_flip"},
     {"type": "color_jitter", "brightness": 0.4, "contrast": 0.4, "saturation": 0.2, "hue": 0.1, "p": 0.8},
     {"type": "random_grayscale", "p": 0.2},
     {"type": "gaussian_blur", "p": 1.0},
     {"type": "solarization", "p": 0.0},
     {"type": "equalization", "p": 0.5},
     {"type": "random_vertical_flip"},
     {"type": "random_rotation", "degrees": 20},
     {"type": "normalize", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}],
    {"repeat": 2, "ops": [{"type": "random_resized_crop", "size": [6, 8], "scale": [0.05, 0.4]}]}
  ])");
  const auto views = parse_views(spec);
  REQUIRE(views.size() == 3);
  CHECK(views[0].size == std::pair<int, int>{12, 12});
  CHECK(views[2].size == std::pair<int, int>{6, 8});
  CHECK(views[0].normalization.mean[1] == 0.456);
  const at::Tensor img = at::randint(0, 256, {20, 24, 3}, at::kByte);
  const at::Tensor a = views[0].apply(img, Rng(5, 1, 42, 0));
  CHECK(at::equal(a, views[0].apply(img, Rng(5, 1, 42, 0))));
  CHECK_FALSE(at::equal(a, views[0].apply(img, Rng(5, 1, 43, 0))));
  CHECK_FALSE(at::equal(a, views[0].apply(img, Rng(5, 2, 42, 0))));
  CHECK(views[2].apply(img, Rng(5, 1, 42, 2)).sizes() == std::vector<int64_t>{6, 8, 3});
  // JSON round trip
  json again = json::array();
  for (const auto& v : views) again.push_back(v.to_json());
  const auto reparsed = parse_views(again);
  CHECK(at::equal(reparsed[0].apply(img, Rng(9, 0, 1, 0)), views[0].apply(img, Rng(9, 0, 1, 0))));
}

TEST_CASE("augment: config errors name the op and key") {
  const auto refused = [](const char* views, const char* message) {
    check_throws_with<std::invalid_argument>([&] { parse_views(json::parse(views)); }, message);
  };
  refused(R"([[{"type": "random_resized_crop", "sise": 8}]])", "views[0][0].sise: unknown key; did you mean size?");
  refused(R"([[{"type": "colour_jitter"}]])", "did you mean color_jitter?");
  refused(R"([[{"type": "solarization", "p": 1.5}]])", "views[0][0].p: must be in [0, 1]");
  refused(R"([[{"type": "normalize"}, {"type": "random_horizontal_flip"}]])", "normalize must be the last op");
  check_throws_with<std::invalid_argument>([] { parse_views(json::array()); }, "non-empty list");
  // 2^32 + 32 would wrap to 32 as an int: refused, as is anything beyond 65536.
  refused(R"([[{"type": "random_resized_crop", "size": 4294967328}]])", "views[0][0].size: must be at most 65536");
  refused(R"([[{"type": "center_crop", "size": [32, -4294967296]}]])", "views[0][0].size: must be positive");
  refused(R"([[{"type": "random_rotation", "angle": 90, "degrees": 10}]])",
          "views[0][0].degrees: give angle (a fixed turn) or degrees, not both");
  refused(R"([[{"type": "random_rotation", "degrees": -10}]])", "views[0][0].degrees: a single value must be >= 0");
  refused(R"([[{"type": "random_rotation", "degrees": [10, -10]}]])", "views[0][0].degrees: expected [min, max]");
  CHECK(op_names().size() == 13);
}

TEST_CASE("augment: normalize_batch fuses the float conversion") {
  const at::Tensor batch = at::randint(0, 256, {2, 3, 4, 5}, at::kByte);
  Normalization n{{0.5, 0.4, 0.3}, {0.2, 0.25, 0.5}};
  const at::Tensor out = normalize_batch(batch, n, at::kCPU, at::kFloat);
  const at::Tensor ref = (batch.to(at::kFloat) / 255.0 - at::tensor({0.5, 0.4, 0.3}).view({1, 3, 1, 1})) /
                         at::tensor({0.2, 0.25, 0.5}).view({1, 3, 1, 1});
  CHECK(at::allclose(out, ref.to(at::kFloat), 1e-5, 1e-5));
}

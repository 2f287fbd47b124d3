// PIL-exact image operations; see include/twins/augment/functional.h for the semantics and
// augment/README notes in the header comments below for where each rule comes from.
#include "twins/augment/functional.h"

#include <ATen/ATen.h>
#include <opencv2/imgproc.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <vector>

namespace twins::augment {

Interpolation parse_interpolation(const std::string& name, const std::string& path) {
  if (name == "bilinear") return Interpolation::bilinear;
  if (name == "bicubic") return Interpolation::bicubic;
  throw std::invalid_argument(path + ": interpolation must be bilinear or bicubic, got \"" + name + "\"");
}

const char* to_string(Interpolation interpolation) {
  return interpolation == Interpolation::bicubic ? "bicubic" : "bilinear";
}

}  // namespace twins::augment

namespace twins::augment::functional {
namespace {

struct View {
  const uint8_t* data;
  int64_t h, w, c;
};

at::Tensor checked(const at::Tensor& img, const char* op) {
  if (!img.defined() || img.dim() != 3 || img.scalar_type() != at::kByte || !img.device().is_cpu() ||
      (img.size(2) != 1 && img.size(2) != 3)) {
    std::string got = img.defined() ? std::string(c10::toString(img.scalar_type())) + " [" : "[";
    for (int64_t i = 0; img.defined() && i < img.dim(); ++i) got += (i ? ", " : "") + std::to_string(img.size(i));
    throw std::invalid_argument(std::string(op) + ": expected a uint8 CPU image [H, W, 1 or 3], got " + got + "]");
  }
  return img.contiguous();
}

inline uint8_t clip8(float v) { return v <= 0.f ? 0 : v >= 255.f ? 255 : static_cast<uint8_t>(v); }

// PIL's ImagingBlend(im1, im2, alpha): in1 + alpha (in2 - in1) in float, truncated toward zero
// (and clipped when extrapolating).
inline uint8_t blend(int in1, int in2, float alpha) {
  return clip8(static_cast<float>(in1) + alpha * static_cast<float>(in2 - in1));
}

// PIL's convert("L") from RGB (L24 in Convert.c).
inline uint8_t luma(int r, int g, int b) {
  return static_cast<uint8_t>((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16);
}

void check_factor(double factor, const char* op) {
  if (!(factor >= 0) || !std::isfinite(factor))
    throw std::invalid_argument(std::string(op) + ": factor must be >= 0, got " + std::to_string(factor));
}

// PIL's rgb2hsv_row (Convert.c, after colorsys), with its float/double mix kept as it is so
// that the 8-bit results agree bit for bit. fmod(x, 1) is written x - 1 for x in [5/6, 11/6),
// which is exact, and saves a libm call per pixel.
inline void rgb2hsv(uint8_t r, uint8_t g, uint8_t b, uint8_t& uh, uint8_t& us, uint8_t& uv) {
  const uint8_t maxc = std::max(r, std::max(g, b));
  const uint8_t minc = std::min(r, std::min(g, b));
  uv = maxc;
  if (minc == maxc) {
    uh = 0, us = 0;
    return;
  }
  const float cr = static_cast<float>(maxc - minc);
  const float s = cr / static_cast<float>(maxc);
  const float rc = static_cast<float>(maxc - r) / cr;
  const float gc = static_cast<float>(maxc - g) / cr;
  const float bc = static_cast<float>(maxc - b) / cr;
  float h;
  if (r == maxc)
    h = bc - gc;
  else if (g == maxc)
    h = static_cast<float>(2.0 + rc - bc);
  else
    h = static_cast<float>(4.0 + gc - rc);
  const double x = h / 6.0 + 1.0;
  h = static_cast<float>(x >= 1.0 ? x - 1.0 : x);
  const int ih = static_cast<int>(h * 255.0), is = static_cast<int>(s * 255.0);
  uh = static_cast<uint8_t>(ih < 0 ? 0 : ih > 255 ? 255 : ih);
  us = static_cast<uint8_t>(is < 0 ? 0 : is > 255 ? 255 : is);
}

// C's round() (half away from zero) for 0 <= x < 2^31, exactly: x - trunc(x) is exact.
inline uint8_t round_clip8(double x) {
  const int i = static_cast<int>(x);
  const int r = i + (x - i >= 0.5);
  return static_cast<uint8_t>(r > 255 ? 255 : r);
}

// PIL's hsv2rgb (Convert.c). h * 6 / 255 and s / 255 are looked up (same doubles).
struct HsvTables {
  double h6[256], fs[256];
  HsvTables() {
    for (int i = 0; i < 256; ++i) {
      h6[i] = static_cast<float>(i) * 6.0 / 255.0;
      fs[i] = static_cast<float>(static_cast<float>(i) / 255.0);
    }
  }
};
const HsvTables& hsv_tables() {
  static const HsvTables t;
  return t;
}

inline void hsv2rgb(uint8_t h, uint8_t s, uint8_t v, uint8_t* out, const HsvTables& tab) {
  if (s == 0) {
    out[0] = out[1] = out[2] = v;
    return;
  }
  const double hh = tab.h6[h];
  const int i = static_cast<int>(hh);  // floor: hh >= 0
  const float f = static_cast<float>(hh - static_cast<float>(i));
  const float fs = static_cast<float>(tab.fs[s]);
  const uint8_t p = round_clip8(static_cast<float>(v) * (1.0 - fs));
  const uint8_t q = round_clip8(static_cast<float>(v) * (1.0 - fs * f));
  const uint8_t t = round_clip8(static_cast<float>(v) * (1.0 - fs * (1.0 - f)));
  switch (i % 6) {
    case 0: out[0] = v, out[1] = t, out[2] = p; break;
    case 1: out[0] = q, out[1] = v, out[2] = p; break;
    case 2: out[0] = p, out[1] = v, out[2] = t; break;
    case 3: out[0] = p, out[1] = q, out[2] = v; break;
    case 4: out[0] = t, out[1] = p, out[2] = v; break;
    default: out[0] = v, out[1] = p, out[2] = q; break;
  }
}

// 256-entry table of a blend towards the constant `in1`: the same float arithmetic, once per
// value instead of once per pixel.
struct BlendTable {
  uint8_t v[256];
  BlendTable(int in1, float alpha) {
    for (int i = 0; i < 256; ++i) v[i] = blend(in1, i, alpha);
  }
};

// ---- PIL's resampling (Resample.c), exactly ----------------------------------------------

constexpr int kPrecisionBits = 32 - 8 - 2;

double bilinear_filter(double x) {
  if (x < 0.0) x = -x;
  return x < 1.0 ? 1.0 - x : 0.0;
}

double bicubic_filter(double x) {
  constexpr double a = -0.5;
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

struct Coeffs {
  int ksize = 0;
  std::vector<int> bounds;  // per output: first input index, count
  std::vector<int> k;       // per output: ksize fixed-point weights
};

// precompute_coeffs + normalize_coeffs_8bpc for an input range [0, in_size) -> out_size.
Coeffs precompute(int in_size, int out_size, bool bicubic) {
  const double support_base = bicubic ? 2.0 : 1.0;
  double (*filter)(double) = bicubic ? bicubic_filter : bilinear_filter;
  const double scale = static_cast<double>(in_size) / out_size;
  const double filterscale = std::max(scale, 1.0);
  const double support = support_base * filterscale;
  Coeffs c;
  c.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
  c.bounds.resize(2 * static_cast<size_t>(out_size));
  c.k.assign(static_cast<size_t>(out_size) * c.ksize, 0);
  std::vector<double> w(c.ksize);
  for (int xx = 0; xx < out_size; ++xx) {
    const double center = (xx + 0.5) * scale;
    const double ss = 1.0 / filterscale;
    int xmin = static_cast<int>(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int xmax = static_cast<int>(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    double ww = 0.0;
    for (int x = 0; x < xmax; ++x) {
      w[x] = filter((x + xmin - center + 0.5) * ss);
      ww += w[x];
    }
    for (int x = 0; x < xmax; ++x) {
      const double v = ww != 0.0 ? w[x] / ww : w[x];
      c.k[static_cast<size_t>(xx) * c.ksize + x] =
          static_cast<int>(v < 0 ? -0.5 + v * (1 << kPrecisionBits) : 0.5 + v * (1 << kPrecisionBits));
    }
    c.bounds[2 * xx] = xmin;
    c.bounds[2 * xx + 1] = xmax;
  }
  return c;
}

inline uint8_t clip_fixed(int v) {
  v >>= kPrecisionBits;
  return static_cast<uint8_t>(v < 0 ? 0 : v > 255 ? 255 : v);
}

// Horizontal pass over rows [row0, row0 + rows) of src (stride src_stride bytes per row, first
// column col0), into dst [rows, out_w, c].
void resample_horizontal(const uint8_t* src, int64_t src_stride, int col0, int row0, int rows, int c, const Coeffs& k,
                         int out_w, uint8_t* dst) {
  for (int y = 0; y < rows; ++y) {
    const uint8_t* in = src + (row0 + y) * src_stride + static_cast<int64_t>(col0) * c;
    uint8_t* out = dst + static_cast<int64_t>(y) * out_w * c;
    for (int xx = 0; xx < out_w; ++xx) {
      const int xmin = k.bounds[2 * xx], xmax = k.bounds[2 * xx + 1];
      const int* kk = &k.k[static_cast<size_t>(xx) * k.ksize];
      const uint8_t* p = in + static_cast<int64_t>(xmin) * c;
      if (c == 3) {
        int s0 = 1 << (kPrecisionBits - 1), s1 = s0, s2 = s0;
        for (int x = 0; x < xmax; ++x, p += 3) s0 += p[0] * kk[x], s1 += p[1] * kk[x], s2 += p[2] * kk[x];
        out[3 * xx] = clip_fixed(s0), out[3 * xx + 1] = clip_fixed(s1), out[3 * xx + 2] = clip_fixed(s2);
      } else {
        int s0 = 1 << (kPrecisionBits - 1);
        for (int x = 0; x < xmax; ++x) s0 += p[x] * kk[x];
        out[xx] = clip_fixed(s0);
      }
    }
  }
}

// Vertical pass: src rows of width w*c (stride src_stride), with row offset row0 and col0.
void resample_vertical(const uint8_t* src, int64_t src_stride, int col0, int row0, int w, int c, const Coeffs& k,
                       int out_h, uint8_t* dst) {
  const int n = w * c;
  std::vector<int> acc(n);
  for (int yy = 0; yy < out_h; ++yy) {
    const int ymin = k.bounds[2 * yy], ymax = k.bounds[2 * yy + 1];
    const int* kk = &k.k[static_cast<size_t>(yy) * k.ksize];
    std::fill(acc.begin(), acc.end(), 1 << (kPrecisionBits - 1));
    for (int y = 0; y < ymax; ++y) {
      const uint8_t* in = src + (row0 + ymin + y) * src_stride + static_cast<int64_t>(col0) * c;
      const int weight = kk[y];
      for (int i = 0; i < n; ++i) acc[i] += in[i] * weight;
    }
    uint8_t* out = dst + static_cast<int64_t>(yy) * n;
    for (int i = 0; i < n; ++i) out[i] = clip_fixed(acc[i]);
  }
}

}  // namespace

at::Tensor adjust_brightness(const at::Tensor& image, double factor) {
  check_factor(factor, "adjust_brightness");
  const at::Tensor img = checked(image, "adjust_brightness");
  at::Tensor out = at::empty_like(img);
  const uint8_t* in = img.data_ptr<uint8_t>();
  uint8_t* o = out.data_ptr<uint8_t>();
  const BlendTable table(0, static_cast<float>(factor));
  for (int64_t i = 0, n = img.numel(); i < n; ++i) o[i] = table.v[in[i]];
  return out;
}

at::Tensor to_grayscale(const at::Tensor& image, int out_channels) {
  if (out_channels != 1 && out_channels != 3)
    throw std::invalid_argument("to_grayscale: out_channels must be 1 or 3, got " + std::to_string(out_channels));
  const at::Tensor img = checked(image, "to_grayscale");
  const int64_t h = img.size(0), w = img.size(1);
  at::Tensor out = at::empty({h, w, out_channels}, img.options());
  const uint8_t* in = img.data_ptr<uint8_t>();
  uint8_t* o = out.data_ptr<uint8_t>();
  const bool rgb = img.size(2) == 3;
  for (int64_t i = 0; i < h * w; ++i) {
    const uint8_t g = rgb ? luma(in[3 * i], in[3 * i + 1], in[3 * i + 2]) : in[i];
    for (int c = 0; c < out_channels; ++c) o[i * out_channels + c] = g;
  }
  return out;
}

at::Tensor to_channels(const at::Tensor& image, int channels) {
  const at::Tensor img = checked(image, "to_channels");
  if (img.size(2) == channels) return img;
  if (channels == 3) return img.expand({img.size(0), img.size(1), 3}).contiguous();
  return to_grayscale(img, channels);
}

at::Tensor adjust_contrast(const at::Tensor& image, double factor) {
  check_factor(factor, "adjust_contrast");
  const at::Tensor img = checked(image, "adjust_contrast");
  const int64_t pixels = img.size(0) * img.size(1);
  const uint8_t* in = img.data_ptr<uint8_t>();
  // ImageEnhance.Contrast: mean of the grey image (ImageStat), rounded with int(mean + 0.5).
  int64_t sum = 0;
  if (img.size(2) == 3) {
    for (int64_t i = 0; i < pixels; ++i) sum += luma(in[3 * i], in[3 * i + 1], in[3 * i + 2]);
  } else {
    for (int64_t i = 0; i < pixels; ++i) sum += in[i];
  }
  const int mean = static_cast<int>(static_cast<double>(sum) / static_cast<double>(pixels) + 0.5);
  at::Tensor out = at::empty_like(img);
  uint8_t* o = out.data_ptr<uint8_t>();
  const BlendTable table(mean, static_cast<float>(factor));
  for (int64_t i = 0, n = img.numel(); i < n; ++i) o[i] = table.v[in[i]];
  return out;
}

at::Tensor adjust_saturation(const at::Tensor& image, double factor) {
  check_factor(factor, "adjust_saturation");
  const at::Tensor img = checked(image, "adjust_saturation");
  if (img.size(2) == 1) return img.clone();
  const int64_t pixels = img.size(0) * img.size(1);
  at::Tensor out = at::empty_like(img);
  const uint8_t* in = img.data_ptr<uint8_t>();
  uint8_t* o = out.data_ptr<uint8_t>();
  const float alpha = static_cast<float>(factor);
  for (int64_t i = 0; i < pixels; ++i) {
    const uint8_t* p = in + 3 * i;
    const int g = luma(p[0], p[1], p[2]);
    o[3 * i] = blend(g, p[0], alpha);
    o[3 * i + 1] = blend(g, p[1], alpha);
    o[3 * i + 2] = blend(g, p[2], alpha);
  }
  return out;
}

at::Tensor adjust_hue(const at::Tensor& image, double hue_factor) {
  if (!(hue_factor >= -0.5 && hue_factor <= 0.5))
    throw std::invalid_argument("adjust_hue: hue_factor must be in [-0.5, 0.5], got " + std::to_string(hue_factor));
  const at::Tensor img = checked(image, "adjust_hue");
  if (img.size(2) == 1) return img.clone();
  // torchvision: np_h += np.uint8(hue_factor * 255), i.e. trunc(hue_factor * 255) mod 256.
  const uint8_t shift = static_cast<uint8_t>(static_cast<int>(hue_factor * 255) & 0xff);
  const int64_t pixels = img.size(0) * img.size(1);
  at::Tensor out = at::empty_like(img);
  const uint8_t* in = img.data_ptr<uint8_t>();
  uint8_t* o = out.data_ptr<uint8_t>();
  const HsvTables& tab = hsv_tables();
  for (int64_t i = 0; i < pixels; ++i) {
    uint8_t h, s, v;
    rgb2hsv(in[3 * i], in[3 * i + 1], in[3 * i + 2], h, s, v);
    hsv2rgb(static_cast<uint8_t>(h + shift), s, v, o + 3 * i, tab);
  }
  return out;
}

at::Tensor solarize(const at::Tensor& image, int threshold) {
  const at::Tensor img = checked(image, "solarize");
  at::Tensor out = at::empty_like(img);
  const uint8_t* in = img.data_ptr<uint8_t>();
  uint8_t* o = out.data_ptr<uint8_t>();
  for (int64_t i = 0, n = img.numel(); i < n; ++i)
    o[i] = in[i] >= threshold ? static_cast<uint8_t>(255 - in[i]) : in[i];
  return out;
}

at::Tensor equalize(const at::Tensor& image) {
  const at::Tensor img = checked(image, "equalize");
  const int64_t c = img.size(2), pixels = img.size(0) * img.size(1);
  const uint8_t* in = img.data_ptr<uint8_t>();
  std::vector<int64_t> hist(static_cast<size_t>(256 * c), 0);
  for (int64_t i = 0; i < pixels; ++i)
    for (int64_t k = 0; k < c; ++k) ++hist[static_cast<size_t>(k * 256 + in[i * c + k])];
  // PIL: a channel of one value, or whose pixels below its highest value number fewer than 255,
  // is left as it is; else value v maps to (step / 2 + pixels below v) / step, step being the
  // pixels below the highest value over 255 (rounded down), clipped to 255 (as Image.point clips).
  std::vector<uint8_t> lut(static_cast<size_t>(256 * c));
  for (int64_t k = 0; k < c; ++k) {
    const int64_t* h = hist.data() + k * 256;
    uint8_t* table = lut.data() + k * 256;
    int64_t highest = -1, nonzero = 0;
    for (int v = 0; v < 256; ++v)
      if (h[v]) highest = v, ++nonzero;
    const int64_t step = nonzero > 1 ? (pixels - h[highest]) / 255 : 0;
    int64_t below = step / 2;
    for (int v = 0; v < 256; ++v) {
      table[v] = step ? static_cast<uint8_t>(std::min<int64_t>(below / step, 255)) : static_cast<uint8_t>(v);
      below += h[v];
    }
  }
  at::Tensor out = at::empty_like(img);
  uint8_t* o = out.data_ptr<uint8_t>();
  for (int64_t i = 0; i < pixels; ++i)
    for (int64_t k = 0; k < c; ++k) o[i * c + k] = lut[static_cast<size_t>(k * 256 + in[i * c + k])];
  return out;
}

at::Tensor vflip(const at::Tensor& image) {
  const at::Tensor img = checked(image, "vflip");
  const int64_t h = img.size(0), row = img.size(1) * img.size(2);
  at::Tensor out = at::empty_like(img);
  const uint8_t* in = img.data_ptr<uint8_t>();
  uint8_t* o = out.data_ptr<uint8_t>();
  for (int64_t y = 0; y < h; ++y) std::memcpy(o + y * row, in + (h - 1 - y) * row, static_cast<size_t>(row));
  return out;
}

namespace {

// Python's round(v, 15): correctly rounded to 15 decimals, as glibc's printf rounds.
double round15(double v) {
  char text[64];
  std::snprintf(text, sizeof text, "%.15f", v);
  return std::strtod(text, nullptr);
}

}  // namespace

at::Tensor rotate(const at::Tensor& image, double degrees) {
  const at::Tensor img = checked(image, "rotate");
  if (!std::isfinite(degrees)) throw std::invalid_argument("rotate: the angle must be finite");
  const int64_t h = img.size(0), w = img.size(1), c = img.size(2);
  double angle = std::fmod(degrees, 360.0);  // Python's angle % 360.0
  if (angle < 0) angle += 360.0;
  if (angle == 0) return img.clone();
  if (angle == 180) return img.flip({0, 1});
  if ((angle == 90 || angle == 270) && w == h) return img.rot90(angle == 90 ? 1 : -1, {0, 1}).contiguous();
  // Image.rotate's inverse map [a0 a1 a2; a3 a4 a5] from output to input pixels, about the centre.
  const double radians = -(angle * (M_PI / 180.0));
  const double cos_a = round15(std::cos(radians)), sin_a = round15(std::sin(radians));
  const double cx = static_cast<double>(w) / 2, cy = static_cast<double>(h) / 2;
  const double a[6] = {cos_a,  sin_a, cos_a * -cx + sin_a * -cy + 0.0 + cx,
                       -sin_a, cos_a, -sin_a * -cx + cos_a * -cy + 0.0 + cy};
  if (a[1] == 0 && a[3] == 0) return a[0] > 0 ? img.clone() : img.flip({0, 1});  // within ~3e-14 degrees
  at::Tensor out = at::zeros_like(img);
  const uint8_t* in = img.data_ptr<uint8_t>();
  uint8_t* o = out.data_ptr<uint8_t>();
  auto copy = [&](int64_t y, int64_t x, int64_t xin, int64_t yin) {
    if (xin >= 0 && xin < w && yin >= 0 && yin < h)
      std::memcpy(o + (y * w + x) * c, in + (yin * w + xin) * c, static_cast<size_t>(c));
  };
  // PIL's ImagingTransformAffine: 16.16 fixed point where all four corners map within +-32768, as
  // for any image up to about 20,000 pixels a side; floating point beyond.
  const auto fits = [&](double x, double y) {
    return std::fabs(x * a[0] + y * a[1] + a[2]) < 32768.0 && std::fabs(x * a[3] + y * a[4] + a[5]) < 32768.0;
  };
  const double W = static_cast<double>(w), H = static_cast<double>(h);
  if (fits(0, 0) && fits(W, H) && fits(0, H) && fits(W, 0)) {
    const auto fix = [](double v) {
      const double u = v * 65536.0 + 0.5;
      return u < 0 ? static_cast<int32_t>(std::floor(u)) : static_cast<int32_t>(u);
    };
    const int32_t a0 = fix(a[0]), a1 = fix(a[1]), a3 = fix(a[3]), a4 = fix(a[4]);
    int32_t a2 = fix(a[2] + a[0] * 0.5 + a[1] * 0.5), a5 = fix(a[5] + a[3] * 0.5 + a[4] * 0.5);
    for (int64_t y = 0; y < h; ++y, a2 += a1, a5 += a4) {
      int32_t xx = a2, yy = a5;
      for (int64_t x = 0; x < w; ++x, xx += a0, yy += a3) copy(y, x, xx >> 16, yy >> 16);
    }
    return out;
  }
  const auto coord = [](double v) { return v < 0 ? int64_t{-1} : static_cast<int64_t>(v); };
  double xo = a[2] + a[1] * 0.5 + a[0] * 0.5, yo = a[5] + a[4] * 0.5 + a[3] * 0.5;
  for (int64_t y = 0; y < h; ++y, xo += a[1], yo += a[4]) {
    double xx = xo, yy = yo;
    for (int64_t x = 0; x < w; ++x, xx += a[0], yy += a[3]) copy(y, x, coord(xx), coord(yy));
  }
  return out;
}

at::Tensor hflip(const at::Tensor& image) {
  const at::Tensor img = checked(image, "hflip");
  const int64_t h = img.size(0), w = img.size(1), c = img.size(2);
  at::Tensor out = at::empty_like(img);
  const uint8_t* in = img.data_ptr<uint8_t>();
  uint8_t* o = out.data_ptr<uint8_t>();
  for (int64_t y = 0; y < h; ++y) {
    const uint8_t* row = in + y * w * c;
    uint8_t* orow = o + y * w * c;
    for (int64_t x = 0; x < w; ++x)
      for (int64_t k = 0; k < c; ++k) orow[x * c + k] = row[(w - 1 - x) * c + k];
  }
  return out;
}

at::Tensor gaussian_blur(const at::Tensor& image, int kernel_size, double sigma) {
  if (kernel_size < 1 || kernel_size % 2 == 0)
    throw std::invalid_argument("gaussian_blur: kernel_size must be odd and positive, got " +
                                std::to_string(kernel_size));
  if (!(sigma > 0)) throw std::invalid_argument("gaussian_blur: sigma must be > 0, got " + std::to_string(sigma));
  const at::Tensor img = checked(image, "gaussian_blur");
  const int h = static_cast<int>(img.size(0)), w = static_cast<int>(img.size(1));
  const int c = static_cast<int>(img.size(2));
  // torchvision's kernel: linspace(-(k-1)/2, (k-1)/2, k) in float32, exp(-x^2 / 2 sigma^2),
  // normalised. torch's "reflect" padding is OpenCV's BORDER_REFLECT_101; torch needs the
  // padding smaller than the image, and so does reflection here.
  const int half = kernel_size / 2;
  if (half >= h || half >= w)
    throw std::invalid_argument("gaussian_blur: kernel_size " + std::to_string(kernel_size) + " too large for a " +
                                std::to_string(h) + "x" + std::to_string(w) + " image");
  cv::Mat kernel(kernel_size, 1, CV_32F);
  float sum = 0;
  for (int i = 0; i < kernel_size; ++i) {
    const float x = static_cast<float>(-half + i);
    const float v = std::exp(-0.5f * (x / static_cast<float>(sigma)) * (x / static_cast<float>(sigma)));
    kernel.at<float>(i) = v;
    sum += v;
  }
  kernel /= sum;
  at::Tensor out = at::empty_like(img);
  const cv::Mat src(h, w, CV_8UC(c), img.data_ptr<uint8_t>());
  cv::Mat dst(h, w, CV_8UC(c), out.data_ptr<uint8_t>());
  cv::sepFilter2D(src, dst, CV_8U, kernel, kernel, cv::Point(-1, -1), 0, cv::BORDER_REFLECT_101);
  return out;
}

at::Tensor resized_crop(const at::Tensor& image, int top, int left, int height, int width, int out_h, int out_w,
                        Interpolation interpolation) {
  const at::Tensor img = checked(image, "resized_crop");
  const int h = static_cast<int>(img.size(0)), w = static_cast<int>(img.size(1));
  const int c = static_cast<int>(img.size(2));
  if (top < 0 || left < 0 || height < 1 || width < 1 || top + height > h || left + width > w || out_h < 1 || out_w < 1)
    throw std::invalid_argument("resized_crop: crop (top " + std::to_string(top) + ", left " + std::to_string(left) +
                                ", " + std::to_string(height) + "x" + std::to_string(width) + ") -> " +
                                std::to_string(out_h) + "x" + std::to_string(out_w) + " does not fit a " +
                                std::to_string(h) + "x" + std::to_string(w) + " image");
  const bool bicubic = interpolation == Interpolation::bicubic;
  const uint8_t* src = img.data_ptr<uint8_t>();
  const int64_t stride = static_cast<int64_t>(w) * c;
  at::Tensor out = at::empty({out_h, out_w, c}, img.options());
  uint8_t* dst = out.data_ptr<uint8_t>();
  const bool need_h = out_w != width, need_v = out_h != height;
  if (!need_h && !need_v) return crop(img, top, left, height, width);
  if (!need_v) {
    resample_horizontal(src, stride, left, top, height, c, precompute(width, out_w, bicubic), out_w, dst);
    return out;
  }
  const Coeffs kv = precompute(height, out_h, bicubic);
  if (!need_h) {
    resample_vertical(src, stride, left, top, width, c, kv, out_h, dst);
    return out;
  }
  // Horizontal pass first, over the rows the vertical pass will read, rounded to uint8.
  const int first = kv.bounds[0];
  const int last = kv.bounds[2 * (out_h - 1)] + kv.bounds[2 * (out_h - 1) + 1];
  std::vector<uint8_t> temp(static_cast<size_t>(last - first) * out_w * c);
  resample_horizontal(src, stride, left, top + first, last - first, c, precompute(width, out_w, bicubic), out_w,
                      temp.data());
  resample_vertical(temp.data(), static_cast<int64_t>(out_w) * c, 0, -first, out_w, c, kv, out_h, dst);
  return out;
}

at::Tensor resized_crop(const at::Tensor& img, int top, int left, int height, int width, int out_h, int out_w,
                        const std::string& interpolation) {
  return resized_crop(img, top, left, height, width, out_h, out_w, parse_interpolation(interpolation, "resized_crop"));
}

at::Tensor resize(const at::Tensor& img, int out_h, int out_w, Interpolation interpolation) {
  return resized_crop(img, 0, 0, static_cast<int>(img.size(0)), static_cast<int>(img.size(1)), out_h, out_w,
                      interpolation);
}

at::Tensor resize(const at::Tensor& img, int out_h, int out_w, const std::string& interpolation) {
  return resize(img, out_h, out_w, parse_interpolation(interpolation, "resize"));
}

at::Tensor crop(const at::Tensor& image, int top, int left, int height, int width) {
  const at::Tensor img = checked(image, "crop");
  if (height < 1 || width < 1)
    throw std::invalid_argument("crop: size must be positive, got " + std::to_string(height) + "x" +
                                std::to_string(width));
  const int h = static_cast<int>(img.size(0)), w = static_cast<int>(img.size(1));
  if (top >= 0 && left >= 0 && top + height <= h && left + width <= w)
    return img.slice(0, top, top + height).slice(1, left, left + width).contiguous();
  at::Tensor out = at::zeros({height, width, img.size(2)}, img.options());
  const int y0 = std::max(top, 0), y1 = std::min(top + height, h);
  const int x0 = std::max(left, 0), x1 = std::min(left + width, w);
  if (y0 < y1 && x0 < x1)
    out.slice(0, y0 - top, y1 - top).slice(1, x0 - left, x1 - left).copy_(img.slice(0, y0, y1).slice(1, x0, x1));
  return out;
}

}  // namespace twins::augment::functional

#include "twins/data/image_io.h"

#include <ATen/ATen.h>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include <algorithm>
#include <cctype>
#include <csetjmp>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <stdexcept>

#include "twins/io.h"

#ifdef TWINS_HAVE_LIBJPEG
#include <jerror.h>
#include <jpeglib.h>
#endif

namespace twins::data {

bool is_image_extension(std::string e) {
  if (!e.empty() && e[0] == '.') e.erase(0, 1);
  std::transform(e.begin(), e.end(), e.begin(), [](unsigned char c) { return std::tolower(c); });
  static const char* const known[] = {"jpg", "jpeg", "png", "webp", "bmp", "ppm", "pgm", "pnm", "tif", "tiff"};
  return std::find(std::begin(known), std::end(known), e) != std::end(known);
}
namespace {

at::Tensor from_mat(const cv::Mat& decoded, const std::string& name) {
  if (decoded.empty()) throw std::runtime_error(name + ": cannot decode image (unreadable or corrupt)");
  cv::Mat m = decoded;
  if (m.depth() != CV_8U) {  // 16-bit PNGs and the like: scale to 8 bits
    cv::Mat converted;
    m.convertTo(converted, CV_8U, m.depth() == CV_16U ? 1.0 / 257.0 : 1.0);
    m = converted;
  }
  cv::Mat rgb;
  switch (m.channels()) {
    case 1: rgb = m; break;
    case 3: cv::cvtColor(m, rgb, cv::COLOR_BGR2RGB); break;
    case 4: cv::cvtColor(m, rgb, cv::COLOR_BGRA2RGB); break;
    default: throw std::runtime_error(name + ": unsupported number of channels " + std::to_string(m.channels()));
  }
  const int c = rgb.channels();
  at::Tensor out = at::empty({rgb.rows, rgb.cols, c}, at::kByte);
  cv::Mat dst(rgb.rows, rgb.cols, CV_8UC(c), out.data_ptr<uint8_t>());
  rgb.copyTo(dst);
  return out;
}

#ifdef TWINS_HAVE_LIBJPEG
// JPEG straight through libjpeg(-turbo) into the tensor: no BGR detour, no EXIF parsing, and
// the decoder settings PIL uses (islow DCT, fancy upsampling), so pixels match what the
// official recipes saw. Returns an undefined tensor for what it does not handle (CMYK).
struct JpegError {
  jpeg_error_mgr mgr;
  std::jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
  bool truncated = false;
};

at::Tensor decode_jpeg(const std::vector<uint8_t>& bytes, const std::string& name, int64_t max_pixels) {
  jpeg_decompress_struct info;
  JpegError err;
  info.err = jpeg_std_error(&err.mgr);
  err.mgr.error_exit = [](j_common_ptr c) {
    auto* e = reinterpret_cast<JpegError*>(c->err);
    c->err->format_message(c, e->message);
    std::longjmp(e->jump, 1);
  };
  // Warnings (extraneous bytes, ...) are not errors, but a file cut short is: libjpeg would
  // fill the rest with grey and say nothing, and PIL refuses such files too.
  err.mgr.output_message = [](j_common_ptr) {};
  err.mgr.emit_message = [](j_common_ptr c, int level) {
    if (level < 0 && c->err->msg_code == JWRN_JPEG_EOF) reinterpret_cast<JpegError*>(c->err)->truncated = true;
  };
  at::Tensor out;
  if (setjmp(err.jump)) {
    jpeg_destroy_decompress(&info);
    throw std::runtime_error(name + ": cannot decode image (corrupt JPEG: " + err.message + ")");
  }
  jpeg_create_decompress(&info);
  jpeg_mem_src(&info, bytes.data(), static_cast<unsigned long>(bytes.size()));
  jpeg_read_header(&info, TRUE);
  if (static_cast<int64_t>(info.image_width) > max_pixels / std::max<int64_t>(1, info.image_height)) {
    jpeg_destroy_decompress(&info);
    throw std::runtime_error(name + ": " + std::to_string(info.image_width) + "x" + std::to_string(info.image_height) +
                             " pixels, above the limit of " + std::to_string(max_pixels));
  }
  if (info.jpeg_color_space == JCS_CMYK || info.jpeg_color_space == JCS_YCCK) {
    jpeg_destroy_decompress(&info);
    return out;
  }
  const bool grey = info.num_components == 1;
  info.out_color_space = grey ? JCS_GRAYSCALE : JCS_RGB;
  info.dct_method = JDCT_ISLOW;
  jpeg_start_decompress(&info);
  const int c = static_cast<int>(info.output_components);
  out = at::empty({static_cast<int64_t>(info.output_height), static_cast<int64_t>(info.output_width), c}, at::kByte);
  uint8_t* base = out.data_ptr<uint8_t>();
  const size_t stride = static_cast<size_t>(info.output_width) * c;
  while (info.output_scanline < info.output_height) {
    JSAMPROW row = base + info.output_scanline * stride;
    jpeg_read_scanlines(&info, &row, 1);
  }
  const bool truncated = err.truncated;
  jpeg_finish_decompress(&info);
  jpeg_destroy_decompress(&info);
  if (truncated) throw std::runtime_error(name + ": cannot decode image (truncated JPEG file)");
  return out;
}
#endif

uint32_t be32(const uint8_t* p) {
  return (uint32_t(p[0]) << 24) | (uint32_t(p[1]) << 16) | (uint32_t(p[2]) << 8) | p[3];
}
uint16_t be16(const uint8_t* p) { return static_cast<uint16_t>((p[0] << 8) | p[1]); }
uint32_t le32(const uint8_t* p) {
  return uint32_t(p[0]) | (uint32_t(p[1]) << 8) | (uint32_t(p[2]) << 16) | (uint32_t(p[3]) << 24);
}
uint16_t le16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }

// JPEG: the first start-of-frame marker's height and width.
std::pair<int64_t, int64_t> jpeg_size(const uint8_t* b, size_t n) {
  size_t i = 2;
  while (i + 4 <= n) {
    if (b[i] != 0xFF) return {0, 0};
    const uint8_t marker = b[i + 1];
    if (marker == 0xFF) {  // fill byte
      ++i;
      continue;
    }
    if (marker == 0x01 || (marker >= 0xD0 && marker <= 0xD7)) {  // no length
      i += 2;
      continue;
    }
    const size_t length = be16(b + i + 2);
    if (length < 2) return {0, 0};
    const bool sof = marker >= 0xC0 && marker <= 0xCF && marker != 0xC4 && marker != 0xC8 && marker != 0xCC;
    if (sof) {
      if (i + 9 > n) return {0, 0};
      return {be16(b + i + 7), be16(b + i + 5)};
    }
    i += 2 + length;
  }
  return {0, 0};
}

// PNM: P1-P6, then width and height as decimal text (with # comments).
std::pair<int64_t, int64_t> pnm_size(const uint8_t* b, size_t n) {
  size_t i = 2;
  int64_t values[2] = {0, 0};
  for (int64_t& v : values) {
    while (i < n && (std::isspace(b[i]) || b[i] == '#')) {
      if (b[i] == '#')
        while (i < n && b[i] != '\n') ++i;
      else
        ++i;
    }
    if (i >= n || !std::isdigit(b[i])) return {0, 0};
    while (i < n && std::isdigit(b[i]) && v < (int64_t{1} << 40)) v = v * 10 + (b[i++] - '0');
  }
  return {values[0], values[1]};
}

// TIFF: ImageWidth (256) and ImageLength (257) of the first image file directory.
std::pair<int64_t, int64_t> tiff_size(const uint8_t* b, size_t n) {
  const bool little = b[0] == 'I';
  auto u16 = [&](size_t at) -> uint32_t { return little ? le16(b + at) : be16(b + at); };
  auto u32 = [&](size_t at) -> uint32_t { return little ? le32(b + at) : be32(b + at); };
  const size_t ifd = u32(4);
  if (ifd + 2 > n) return {0, 0};
  const uint32_t count = u16(ifd);
  int64_t width = 0, height = 0;
  for (uint32_t k = 0; k < count; ++k) {
    const size_t e = ifd + 2 + 12 * static_cast<size_t>(k);
    if (e + 12 > n) break;
    const uint32_t tag = u16(e), type = u16(e + 2);
    const uint32_t value = type == 3 ? u16(e + 8) : u32(e + 8);
    if (tag == 256) width = value;
    if (tag == 257) height = value;
  }
  return {width, height};
}

void check_pixels(int64_t width, int64_t height, int64_t max_pixels, const std::string& name) {
  if (width < 1 || height < 1)
    throw std::runtime_error(name + ": the image header declares a size of " + std::to_string(width) + "x" +
                             std::to_string(height));
  if (width > max_pixels / height)
    throw std::runtime_error(name + ": " + std::to_string(width) + "x" + std::to_string(height) +
                             " pixels, above the limit of " + std::to_string(max_pixels) +
                             " (max_image_pixels; PIL refuses such images too, as decompression bombs)");
}

}  // namespace

std::pair<int64_t, int64_t> image_header_size(const uint8_t* b, size_t n) {
  if (n >= 3 && b[0] == 0xFF && b[1] == 0xD8 && b[2] == 0xFF) return jpeg_size(b, n);
  if (n >= 24 && std::memcmp(b, "\x89PNG\r\n\x1a\n", 8) == 0 && std::memcmp(b + 12, "IHDR", 4) == 0)
    return {be32(b + 16), be32(b + 20)};
  if (n >= 26 && b[0] == 'B' && b[1] == 'M') {
    if (le32(b + 14) == 12) return {le16(b + 18), le16(b + 20)};  // OS/2 BITMAPCOREHEADER
    const int64_t h = static_cast<int32_t>(le32(b + 22));
    return {static_cast<int32_t>(le32(b + 18)), h < 0 ? -h : h};  // negative height: top-down rows
  }
  if (n >= 3 && b[0] == 'P' && b[1] >= '1' && b[1] <= '6') return pnm_size(b, n);
  if (n >= 30 && std::memcmp(b, "RIFF", 4) == 0 && std::memcmp(b + 8, "WEBP", 4) == 0) {
    if (std::memcmp(b + 12, "VP8 ", 4) == 0) return {le16(b + 26) & 0x3FFF, le16(b + 28) & 0x3FFF};
    if (std::memcmp(b + 12, "VP8L", 4) == 0) {
      const uint32_t bits = le32(b + 21);
      return {(bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1};
    }
    if (std::memcmp(b + 12, "VP8X", 4) == 0)
      return {(b[24] | (b[25] << 8) | (b[26] << 16)) + 1, (b[27] | (b[28] << 8) | (b[29] << 16)) + 1};
    return {0, 0};
  }
  if (n >= 8 && (std::memcmp(b, "II*\0", 4) == 0 || std::memcmp(b, "MM\0*", 4) == 0)) return tiff_size(b, n);
  return {0, 0};
}

at::Tensor decode_image(const std::vector<uint8_t>& bytes, const std::string& name, int64_t max_pixels) {
  if (bytes.empty()) throw std::runtime_error(name + ": empty file");
  const auto [width, height] = image_header_size(bytes.data(), bytes.size());
  if (width == 0 && height == 0)
    throw std::runtime_error(
        name + ": cannot decode image (not a JPEG, PNG, BMP, PPM/PGM, WebP or TIFF file, or its header is cut short)");
  check_pixels(width, height, max_pixels, name);
  if (bytes.size() > static_cast<size_t>(INT32_MAX))
    throw std::runtime_error(name + ": an image file larger than 2 GiB");
#ifdef TWINS_HAVE_LIBJPEG
  if (bytes[0] == 0xFF && bytes[1] == 0xD8) {
    at::Tensor img = decode_jpeg(bytes, name, max_pixels);
    if (img.defined()) return img;
  }
#endif
  const cv::Mat buffer(1, static_cast<int>(bytes.size()), CV_8U, const_cast<uint8_t*>(bytes.data()));
  cv::Mat decoded;
  try {
    decoded = cv::imdecode(buffer, cv::IMREAD_ANYCOLOR | cv::IMREAD_IGNORE_ORIENTATION);
  } catch (const cv::Exception& e) {
    throw std::runtime_error(name + ": cannot decode image (" + e.what() + ")");
  }
  if (!decoded.empty()) check_pixels(decoded.cols, decoded.rows, max_pixels, name);
  try {
    return from_mat(decoded, name);
  } catch (const cv::Exception& e) {
    throw std::runtime_error(name + ": cannot convert image (" + e.what() + ")");
  }
}

at::Tensor read_image(const std::string& path, int64_t max_pixels) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open image file");
  std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return decode_image(bytes, path, max_pixels);
}

void write_image(const std::string& path, const at::Tensor& image) {
  if (image.dim() != 3 || image.scalar_type() != at::kByte || (image.size(2) != 1 && image.size(2) != 3))
    throw std::invalid_argument("write_image: expected uint8 [H, W, 1 or 3] for " + path);
  const at::Tensor img = image.contiguous();
  const int c = static_cast<int>(img.size(2));
  const cv::Mat src(static_cast<int>(img.size(0)), static_cast<int>(img.size(1)), CV_8UC(c), img.data_ptr<uint8_t>());
  cv::Mat bgr;  // a new buffer: converting into `src` would swap the caller's channels
  if (c == 3)
    cv::cvtColor(src, bgr, cv::COLOR_RGB2BGR);
  else
    bgr = src;
  // Encoded in memory, then written atomically: never half a picture on disk.
  const std::string ext = std::filesystem::path(path).extension().string();
  std::vector<uint8_t> encoded;
  try {
    if (!cv::imencode(ext.empty() ? ".png" : ext, bgr, encoded)) throw std::runtime_error("encoder failed");
  } catch (const std::exception& e) {
    throw std::runtime_error(path + ": cannot encode the image as " + (ext.empty() ? ".png" : ext) + " (" + e.what() +
                             ")");
  }
  io::write_file_atomic(path, std::string_view(reinterpret_cast<const char*>(encoded.data()), encoded.size()));
}

}  // namespace twins::data

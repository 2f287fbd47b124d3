#include "twins/data/image_io.h"

#include <ATen/ATen.h>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include <csetjmp>
#include <cstdio>
#include <fstream>
#include <stdexcept>

#ifdef TWINS_HAVE_LIBJPEG
#include <jerror.h>
#include <jpeglib.h>
#endif

namespace twins::data {
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

at::Tensor decode_jpeg(const std::vector<uint8_t>& bytes, const std::string& name) {
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

}  // namespace

at::Tensor decode_image(const std::vector<uint8_t>& bytes, const std::string& name) {
  if (bytes.empty()) throw std::runtime_error(name + ": empty file");
#ifdef TWINS_HAVE_LIBJPEG
  if (bytes.size() > 3 && bytes[0] == 0xFF && bytes[1] == 0xD8 && bytes[2] == 0xFF) {
    at::Tensor img = decode_jpeg(bytes, name);
    if (img.defined()) return img;
  }
#endif
  const cv::Mat buffer(1, static_cast<int>(bytes.size()), CV_8U, const_cast<uint8_t*>(bytes.data()));
  return from_mat(cv::imdecode(buffer, cv::IMREAD_ANYCOLOR | cv::IMREAD_IGNORE_ORIENTATION), name);
}

at::Tensor read_image(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open image file");
  std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return decode_image(bytes, path);
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
  if (!cv::imwrite(path, bgr)) throw std::runtime_error(path + ": cannot write image");
}

}  // namespace twins::data

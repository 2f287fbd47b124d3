#include "twins/data/image_io.h"

#include <ATen/ATen.h>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include <fstream>
#include <stdexcept>

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
    default:
      throw std::runtime_error(name + ": unsupported number of channels " + std::to_string(m.channels()));
  }
  const int c = rgb.channels();
  at::Tensor out = at::empty({rgb.rows, rgb.cols, c}, at::kByte);
  cv::Mat dst(rgb.rows, rgb.cols, CV_8UC(c), out.data_ptr<uint8_t>());
  rgb.copyTo(dst);
  return out;
}

}  // namespace

at::Tensor decode_image(const std::vector<uint8_t>& bytes, const std::string& name) {
  if (bytes.empty()) throw std::runtime_error(name + ": empty file");
  const cv::Mat buffer(1, static_cast<int>(bytes.size()), CV_8U, const_cast<uint8_t*>(bytes.data()));
  return from_mat(cv::imdecode(buffer, cv::IMREAD_ANYCOLOR), name);
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
  const cv::Mat src(static_cast<int>(img.size(0)), static_cast<int>(img.size(1)), CV_8UC(c),
                    img.data_ptr<uint8_t>());
  cv::Mat bgr = src;
  if (c == 3) cv::cvtColor(src, bgr, cv::COLOR_RGB2BGR);
  if (!cv::imwrite(path, bgr)) throw std::runtime_error(path + ": cannot write image");
}

}  // namespace twins::data

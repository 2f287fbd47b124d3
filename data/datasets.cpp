// The dataset formats. Binary formats are memory-mapped, so opening CIFAR-10 or STL-10's 2.7 GB
// unlabeled split costs nothing until samples are read, and every size is checked up front.
#include <ATen/ATen.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "twins/config.h"
#include "twins/data/csv.h"
#include "twins/data/dataset.h"
#include "twins/data/image_io.h"
#include "twins/data/shards.h"
#include "twins/registry.h"

#include <cerrno>
#include <cstring>

namespace twins::data {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr size_t kMaxCsvBytes = size_t{1} << 30;

// A read-only memory map of a whole file, or an owned buffer (decompressed .gz).
class Bytes {
 public:
  static std::shared_ptr<Bytes> map(const std::string& path) {
    auto b = std::make_shared<Bytes>();
    b->path_ = path;
    const int fd = ::open(path.c_str(), O_RDONLY);
    if (fd < 0) throw std::runtime_error(path + ": cannot open (" + std::strerror(errno) + ")");
    struct stat st {};
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
      ::close(fd);
      throw std::runtime_error(path + ": not a regular file");
    }
    b->size_ = static_cast<size_t>(st.st_size);
    if (b->size_ > 0) {
      void* p = ::mmap(nullptr, b->size_, PROT_READ, MAP_PRIVATE, fd, 0);
      if (p == MAP_FAILED) {
        ::close(fd);
        throw std::runtime_error(path + ": cannot map (" + std::strerror(errno) + ")");
      }
      b->mapped_ = p;
      b->data_ = static_cast<const uint8_t*>(p);
    }
    ::close(fd);
    return b;
  }
  // Decompresses a .gz file, at most `limit` bytes: more is an error, so a small file cannot
  // expand into all the memory there is.
  static std::shared_ptr<Bytes> gunzip(const std::string& path, uint64_t limit) {
    auto b = std::make_shared<Bytes>();
    b->path_ = path;
    gzFile f = gzopen(path.c_str(), "rb");
    if (!f) throw std::runtime_error(path + ": cannot open");
    std::vector<uint8_t> chunk(1 << 20);
    int n = 0;
    bool too_large = false;
    while ((n = gzread(f, chunk.data(), static_cast<unsigned>(chunk.size()))) > 0) {
      if (b->owned_.size() + static_cast<size_t>(n) > limit) {
        too_large = true;
        break;
      }
      b->owned_.insert(b->owned_.end(), chunk.begin(), chunk.begin() + n);
    }
    int err = 0;
    const std::string message = gzerror(f, &err);  // copied: gzclose frees it
    const bool truncated = !too_large && (n < 0 || (err != Z_OK && err != Z_STREAM_END));
    gzclose(f);
    if (too_large)
      throw std::runtime_error(path + ": decompresses to more than the " + std::to_string(limit) +
                               " bytes its header declares");
    if (truncated) throw std::runtime_error(path + ": corrupt or truncated gzip file (" + message + ")");
    b->data_ = b->owned_.data();
    b->size_ = b->owned_.size();
    return b;
  }
  // The first `count` decompressed bytes (fewer if the stream is shorter), for headers.
  static std::vector<uint8_t> gunzip_head(const std::string& path, unsigned count) {
    gzFile f = gzopen(path.c_str(), "rb");
    if (!f) throw std::runtime_error(path + ": cannot open");
    std::vector<uint8_t> head(count);
    const int n = gzread(f, head.data(), count);
    gzclose(f);
    head.resize(static_cast<size_t>(std::max(0, n)));
    return head;
  }
  Bytes() = default;
  Bytes(const Bytes&) = delete;
  Bytes& operator=(const Bytes&) = delete;
  ~Bytes() {
    if (mapped_) ::munmap(mapped_, size_);
  }
  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  void* mapped_ = nullptr;
  std::vector<uint8_t> owned_;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

std::string find_file(const std::string& root, const std::vector<std::string>& candidates, const std::string& what) {
  for (const auto& c : candidates) {
    const fs::path p = fs::path(root) / c;
    if (fs::exists(p)) return p.string();
  }
  std::string tried;
  for (const auto& c : candidates) tried += " " + (fs::path(root) / c).string();
  throw std::runtime_error(what + ": file not found; looked for" + tried);
}

// Records of fixed size in one or more files; pixels in planar (CHW) or STL's column-major
// planar layout.
class RecordDataset : public Dataset {
 public:
  struct File {
    std::shared_ptr<Bytes> bytes;
    std::shared_ptr<Bytes> labels;  // separate label file (STL), or null
    int64_t count = 0;
    int64_t header = 0;  // bytes before the first record
    int64_t label_header = 0;
  };
  RecordDataset(std::vector<File> files, int64_t record, int64_t label_offset, int64_t pixel_offset, int64_t h,
                int64_t w, int64_t c, bool column_major, int64_t classes, int64_t label_base)
      : files_(std::move(files)),
        record_(record),
        label_offset_(label_offset),
        pixel_offset_(pixel_offset),
        h_(h),
        w_(w),
        c_(c),
        column_major_(column_major),
        classes_(classes),
        label_base_(label_base) {
    for (const auto& f : files_) starts_.push_back(total_), total_ += f.count;
  }
  int64_t size() const override { return total_; }
  bool in_memory() const override { return true; }
  std::pair<int, int> image_size() const override { return {static_cast<int>(h_), static_cast<int>(w_)}; }
  int64_t num_classes() const override { return classes_; }
  at::Tensor image(int64_t index) const override {
    const auto [f, i] = locate(index);
    const uint8_t* p = f.bytes->data() + f.header + i * record_ + pixel_offset_;
    at::Tensor out = at::empty({h_, w_, c_}, at::kByte);
    uint8_t* o = out.data_ptr<uint8_t>();
    const int64_t plane = h_ * w_;
    for (int64_t ch = 0; ch < c_; ++ch)
      for (int64_t y = 0; y < h_; ++y)
        for (int64_t x = 0; x < w_; ++x)
          o[(y * w_ + x) * c_ + ch] = p[ch * plane + (column_major_ ? x * h_ + y : y * w_ + x)];
    return out;
  }
  int64_t label(int64_t index) const override {
    const auto [f, i] = locate(index);
    return has_labels(f) ? raw_label(f, i) - label_base_ : -1;
  }
  // Every stored label in range, or an error naming the file and record: a label outside the
  // classes is corrupt data, not an unlabelled sample.
  void check_labels(const std::string& dataset) const {
    for (const auto& f : files_) {
      if (!has_labels(f)) continue;
      for (int64_t i = 0; i < f.count; ++i) {
        const int64_t v = raw_label(f, i);
        if (v < label_base_ || v - label_base_ >= classes_)
          throw std::runtime_error((f.labels ? f.labels->path() : f.bytes->path()) + ": record " + std::to_string(i) +
                                   " has label " + std::to_string(v) + ", outside the " + std::to_string(classes_) +
                                   " classes of " + dataset + (label_base_ ? " (numbered from 1)" : "") +
                                   ": corrupt file?");
      }
    }
  }
  std::string id(int64_t index) const override {
    const auto [f, i] = locate(index);
    return f.bytes->path() + "#" + std::to_string(i);
  }
  std::vector<std::string> source_files() const override {
    std::vector<std::string> out;
    for (const auto& f : files_) {
      out.push_back(f.bytes->path());
      if (f.labels) out.push_back(f.labels->path());
    }
    return out;
  }

 private:
  bool has_labels(const File& f) const { return f.labels || label_offset_ >= 0; }
  int64_t raw_label(const File& f, int64_t i) const {
    return f.labels ? f.labels->data()[f.label_header + i] : f.bytes->data()[f.header + i * record_ + label_offset_];
  }
  std::pair<const File&, int64_t> locate(int64_t index) const {
    if (index < 0 || index >= total_)
      throw std::out_of_range("dataset index " + std::to_string(index) + " out of range [0, " + std::to_string(total_) +
                              ")");
    const size_t k = static_cast<size_t>(std::upper_bound(starts_.begin(), starts_.end(), index) - starts_.begin() - 1);
    return {files_[k], index - starts_[k]};
  }
  std::vector<File> files_;
  std::vector<int64_t> starts_;
  int64_t total_ = 0;
  int64_t record_, label_offset_, pixel_offset_, h_, w_, c_;
  bool column_major_;
  int64_t classes_, label_base_;
};

void check_size(const Bytes& b, size_t expected, const std::string& what) {
  if (b.size() != expected)
    throw std::runtime_error(b.path() + ": " + what + " must be " + std::to_string(expected) + " bytes, found " +
                             std::to_string(b.size()) + (b.size() < expected ? " (truncated?)" : ""));
}

struct Common {
  std::string root, split;
  OnBadSample on_bad_sample = OnBadSample::error;
  int64_t max_image_pixels = kDefaultMaxImagePixels;
};

// For formats of image files: the pixel limit of decoding.
void read_pixel_limit(config::ConfigReader& r, Common& c) {
  r.get("max_image_pixels", c.max_image_pixels);
  config::require(c.max_image_pixels >= 1, r.path_of("max_image_pixels"), "must be >= 1");
}

// Reads root, split, on_bad_sample; `splits` lists the valid splits (first is the default).
Common read_common(config::ConfigReader& r, const std::vector<std::string>& splits,
                   const std::string& default_root = "") {
  Common c;
  c.root = default_root;
  c.split = splits.empty() ? "" : splits.front();
  r.allow("type");
  r.get("root", c.root);
  if (!splits.empty()) r.get("split", c.split);
  std::string policy = "error";
  r.get("on_bad_sample", policy);
  config::require(policy == "error" || policy == "skip", r.path_of("on_bad_sample"),
                  "must be error or skip, got \"" + policy + "\"");
  c.on_bad_sample = policy == "skip" ? OnBadSample::skip : OnBadSample::error;
  config::require(!c.root.empty(), r.path_of("root"), "required (the dataset's folder)");
  if (!splits.empty() && std::find(splits.begin(), splits.end(), c.split) == splits.end()) {
    std::string valid;
    for (const auto& s : splits) valid += " " + s;
    throw std::invalid_argument(r.path_of("split") + ": unknown split \"" + c.split + "\"; valid:" + valid);
  }
  if (!fs::exists(c.root)) throw std::runtime_error(r.path_of("root") + ": " + c.root + " does not exist");
  return c;
}

std::shared_ptr<Dataset> make_cifar(const json& spec, const std::string& path, bool hundred) {
  config::ConfigReader r(spec, path);
  std::string label = "fine";
  if (hundred) r.get("label", label);
  const Common c = read_common(r, {"train", "test"});
  r.finish();
  config::require(label == "fine" || label == "coarse", r.path_of("label"), "must be fine or coarse");
  const std::string sub = hundred ? "cifar-100-binary" : "cifar-10-batches-bin";
  const std::string root = fs::exists(fs::path(c.root) / sub) ? (fs::path(c.root) / sub).string() : c.root;
  const int64_t label_bytes = hundred ? 2 : 1, record = label_bytes + 3072;
  std::vector<std::string> names;
  if (hundred)
    names = {c.split + ".bin"};
  else if (c.split == "test")
    names = {"test_batch.bin"};
  else
    for (int i = 1; i <= 5; ++i) names.push_back("data_batch_" + std::to_string(i) + ".bin");
  std::vector<RecordDataset::File> files;
  for (const auto& n : names) {
    RecordDataset::File f;
    f.bytes = Bytes::map(find_file(root, {n}, path + " (" + (hundred ? "cifar100" : "cifar10") + ")"));
    f.count = hundred ? (c.split == "train" ? 50000 : 10000) : 10000;
    check_size(*f.bytes, static_cast<size_t>(f.count * record),
               std::to_string(f.count) + " records of " + std::to_string(record) + " bytes");
    files.push_back(f);
  }
  auto d = std::make_shared<RecordDataset>(files, record, hundred && label == "fine" ? 1 : 0, label_bytes, 32, 32, 3,
                                           false, hundred ? (label == "fine" ? 100 : 20) : 10, 0);
  d->check_labels(hundred ? "cifar100" : "cifar10");
  d->on_bad_sample = c.on_bad_sample;
  return d;
}

std::shared_ptr<Dataset> make_stl10(const json& spec, const std::string& path) {
  config::ConfigReader r(spec, path);
  const Common c = read_common(r, {"train", "test", "unlabeled", "train+unlabeled"});
  r.finish();
  const std::string root =
      fs::exists(fs::path(c.root) / "stl10_binary") ? (fs::path(c.root) / "stl10_binary").string() : c.root;
  const int64_t record = 96 * 96 * 3;
  std::vector<RecordDataset::File> files;
  auto add = [&](const std::string& split, int64_t count, bool labeled) {
    RecordDataset::File f;
    f.bytes = Bytes::map(find_file(root, {split + "_X.bin"}, path + " (stl10)"));
    f.count = count;
    check_size(*f.bytes, static_cast<size_t>(count * record), std::to_string(count) + " images of 96x96x3");
    if (labeled) {
      f.labels = Bytes::map(find_file(root, {split + "_y.bin"}, path + " (stl10)"));
      check_size(*f.labels, static_cast<size_t>(count), std::to_string(count) + " labels");
    }
    files.push_back(f);
  };
  if (c.split == "train" || c.split == "train+unlabeled") add("train", 5000, true);
  if (c.split == "test") add("test", 8000, true);
  if (c.split == "unlabeled" || c.split == "train+unlabeled") add("unlabeled", 100000, false);
  // STL-10 stores each channel column-major, and labels from 1 to 10.
  auto d = std::make_shared<RecordDataset>(files, record, -1, 0, 96, 96, 3, true, 10, 1);
  d->check_labels("stl10");
  d->on_bad_sample = c.on_bad_sample;
  return d;
}

uint32_t big_endian(const uint8_t* p) {
  return (uint32_t(p[0]) << 24) | (uint32_t(p[1]) << 16) | (uint32_t(p[2]) << 8) | uint32_t(p[3]);
}

bool gzipped(const std::string& file) {
  return file.size() > 3 && (file.substr(file.size() - 3) == ".gz" || file.substr(file.size() - 3) == ".GZ");
}

// An IDX file (gzipped or not) of `dims` dimensions and magic 0x0000080<dims>: the whole file,
// with its size checked against its header in overflow-safe arithmetic before anything large is
// read or decompressed. `dims_out` receives the dimensions.
std::shared_ptr<Bytes> load_idx(const std::string& root, const std::string& base, const std::string& what, int dims,
                                std::vector<int64_t>& dims_out) {
  const std::string file = find_file(root, {base + ".gz", base, base + ".GZ"}, what);
  const unsigned header = 4 + 4 * static_cast<unsigned>(dims);
  std::vector<uint8_t> head;
  std::shared_ptr<Bytes> mapped;
  if (gzipped(file)) {
    head = Bytes::gunzip_head(file, header);
  } else {
    mapped = Bytes::map(file);
    head.assign(mapped->data(), mapped->data() + std::min<size_t>(mapped->size(), header));
  }
  const uint32_t magic = 0x800 + static_cast<uint32_t>(dims);
  if (head.size() < header || big_endian(head.data()) != magic) {
    char hex[16];
    std::snprintf(hex, sizeof hex, "0x%08x", magic);
    throw std::runtime_error(file + ": not an IDX " + (dims == 1 ? "label" : "image") + " file (magic " + hex +
                             " expected)");
  }
  uint64_t total = 1;
  dims_out.clear();
  for (int d = 0; d < dims; ++d) {
    const uint32_t v = big_endian(head.data() + 4 + 4 * d);
    dims_out.push_back(v);
    if (__builtin_mul_overflow(total, static_cast<uint64_t>(v), &total) || total > (uint64_t{1} << 40))
      throw std::runtime_error(file + ": its header declares more than 2^40 bytes of data: corrupt file?");
  }
  total += header;
  auto bytes = mapped ? mapped : Bytes::gunzip(file, total);
  const std::string declared = dims == 3 ? std::to_string(dims_out[0]) + " images of " + std::to_string(dims_out[1]) +
                                               "x" + std::to_string(dims_out[2])
                                         : std::to_string(dims_out[0]) + " labels";
  if (bytes->size() != total)
    throw std::runtime_error(file + ": " + std::to_string(header) + " header bytes + " + declared + " must be " +
                             std::to_string(total) + " bytes, found " + std::to_string(bytes->size()) +
                             (bytes->size() < total ? " (truncated?)" : ""));
  return bytes;
}

std::shared_ptr<Dataset> make_idx(const json& spec, const std::string& path, bool fashion) {
  config::ConfigReader r(spec, path);
  const Common c = read_common(r, {"train", "test"}, fashion ? "/usr/share/datasets/fashion-mnist" : "");
  r.finish();
  const std::string prefix = c.split == "train" ? "train" : "t10k";
  const std::string what = path + " (" + (fashion ? "fashion_mnist" : "mnist") + ")";
  std::vector<int64_t> image_dims, label_dims;
  auto images = load_idx(c.root, prefix + "-images-idx3-ubyte", what, 3, image_dims);
  auto labels = load_idx(c.root, prefix + "-labels-idx1-ubyte", what, 1, label_dims);
  const int64_t n = image_dims[0], h = image_dims[1], w = image_dims[2];
  if (n < 1 || h < 1 || w < 1)
    throw std::runtime_error(images->path() + ": declares " + std::to_string(n) + " images of " + std::to_string(h) +
                             "x" + std::to_string(w));
  if (label_dims[0] != n)
    throw std::runtime_error(labels->path() + ": holds " + std::to_string(label_dims[0]) + " labels for " +
                             std::to_string(n) + " images");
  RecordDataset::File f;
  f.bytes = images, f.labels = labels, f.count = n, f.header = 16, f.label_header = 8;
  auto d = std::make_shared<RecordDataset>(std::vector<RecordDataset::File>{f}, h * w, -1, 0, h, w, 1, false, 10, 0);
  d->check_labels(fashion ? "fashion_mnist" : "mnist");
  d->on_bad_sample = c.on_bad_sample;
  return d;
}

// Image files on disk, decoded on demand.
class FileDataset : public Dataset {
 public:
  FileDataset(std::vector<std::string> files, std::vector<int64_t> labels, int64_t classes, int64_t max_pixels)
      : files_(std::move(files)), labels_(std::move(labels)), classes_(classes), max_pixels_(max_pixels) {}
  int64_t size() const override { return static_cast<int64_t>(files_.size()); }
  at::Tensor image(int64_t index) const override {
    try {
      return read_image(files_.at(static_cast<size_t>(index)), max_pixels_);
    } catch (const std::bad_alloc&) {
      throw;
    } catch (const std::exception& e) {  // whatever the decoder threw: the file is bad
      throw BadSample(e.what());
    }
  }
  int64_t label(int64_t index) const override { return labels_.at(static_cast<size_t>(index)); }
  std::string id(int64_t index) const override { return files_.at(static_cast<size_t>(index)); }
  int64_t num_classes() const override { return classes_; }
  std::vector<std::string> source_files() const override { return files_; }

 private:
  std::vector<std::string> files_;
  std::vector<int64_t> labels_;
  int64_t classes_, max_pixels_;
};

bool is_image_file(const fs::path& p) { return is_image_extension(p.extension().string()); }

std::vector<std::string> images_under(const fs::path& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::recursive_directory_iterator(dir, fs::directory_options::follow_directory_symlink))
    if (e.is_regular_file() && is_image_file(e.path())) out.push_back(e.path().string());
  std::sort(out.begin(), out.end());
  return out;
}

std::shared_ptr<Dataset> make_image_folder(const json& spec, const std::string& path) {
  config::ConfigReader r(spec, path);
  Common c = read_common(r, {});
  read_pixel_limit(r, c);
  r.finish();
  if (!fs::is_directory(c.root)) throw std::runtime_error(r.path_of("root") + ": " + c.root + " is not a folder");
  std::vector<std::string> classes;
  for (const auto& e : fs::directory_iterator(c.root, fs::directory_options::follow_directory_symlink))
    if (e.is_directory()) classes.push_back(e.path().filename().string());
  std::sort(classes.begin(), classes.end());
  std::vector<std::string> files;
  std::vector<int64_t> labels;
  if (classes.empty()) {  // a flat, unlabeled folder
    files = images_under(c.root);
    labels.assign(files.size(), -1);
  } else {
    for (size_t k = 0; k < classes.size(); ++k)
      for (auto& f : images_under(fs::path(c.root) / classes[k]))
        files.push_back(std::move(f)), labels.push_back(static_cast<int64_t>(k));
  }
  if (files.empty()) throw std::runtime_error(r.path_of("root") + ": no image files under " + c.root);
  auto d = std::make_shared<FileDataset>(files, labels, static_cast<int64_t>(classes.size()), c.max_image_pixels);
  d->on_bad_sample = c.on_bad_sample;
  return d;
}

std::shared_ptr<Dataset> make_csv(const json& spec, const std::string& path) {
  config::ConfigReader r(spec, path);
  std::string file;
  r.get("file", file);
  config::require(!file.empty(), r.path_of("file"), "required (the CSV file of path[,label] rows)");
  // Relative paths in the file are relative to "root", by default the CSV file's folder.
  const std::string folder = fs::path(file).parent_path().string();
  Common c = read_common(r, {}, folder.empty() ? "." : folder);
  read_pixel_limit(r, c);
  r.finish();
  std::ifstream in(file, std::ios::binary);
  if (!in) throw std::runtime_error(r.path_of("file") + ": cannot open " + file);
  std::string text;
  char buffer[1 << 16];
  while (in.read(buffer, sizeof buffer) || in.gcount() > 0) {
    text.append(buffer, static_cast<size_t>(in.gcount()));
    if (text.size() > kMaxCsvBytes) throw std::runtime_error(file + ": larger than 1 GiB: not a list of images");
  }
  std::vector<std::string> files;
  std::vector<int64_t> labels;
  int64_t max_label = -1;
  auto shown = [](const std::string& t) { return t.size() > 40 ? t.substr(0, 40) + "..." : t; };
  for (const CsvRow& row : parse_csv(text, file, 4096)) {
    const std::string where = file + ":" + std::to_string(row.line);
    if (row.fields.size() > 2)
      throw std::runtime_error(where + ": " + std::to_string(row.fields.size()) +
                               " fields; expected path[,label] (quote a path that contains commas)");
    const std::string& p = row.fields[0];
    if (!p.empty() && p[0] == '#') continue;                                         // a comment
    if (row.line == 1 && (p == "path" || p == "file" || p == "filename")) continue;  // a header
    if (p.empty()) throw std::runtime_error(where + ": empty path");
    int64_t label = -1;
    if (row.fields.size() == 2 && !row.fields[1].empty()) {
      const std::string& t = row.fields[1];
      const auto v = config::parse_integer(t);
      if (!v || *v < 0 || *v >= kMaxClasses)
        throw std::runtime_error(where + ": label \"" + shown(t) + "\" is not a non-negative integer below " +
                                 std::to_string(kMaxClasses));
      label = *v;
    }
    max_label = std::max(max_label, label);
    files.push_back(fs::path(p).is_absolute() ? p : (fs::path(c.root) / p).string());
    labels.push_back(label);
  }
  if (files.empty()) throw std::runtime_error(file + ": no samples listed");
  auto d = std::make_shared<FileDataset>(files, labels, max_label + 1, c.max_image_pixels);
  d->on_bad_sample = c.on_bad_sample;
  return d;
}

const Registry<Dataset>& registry() {
  static const Registry<Dataset> r = [] {
    Registry<Dataset> r("dataset");
    r.add("cifar10", [](const json& s, const std::string& p) { return make_cifar(s, p, false); });
    r.add("cifar100", [](const json& s, const std::string& p) { return make_cifar(s, p, true); });
    r.add("stl10", make_stl10);
    r.add("mnist", [](const json& s, const std::string& p) { return make_idx(s, p, false); });
    r.add("fashion_mnist", [](const json& s, const std::string& p) { return make_idx(s, p, true); });
    r.add("image_folder", make_image_folder);
    r.add("csv", make_csv);
    r.add("shards", open_shards);
    return r;
  }();
  return r;
}

}  // namespace

std::shared_ptr<Dataset> create_dataset(const json& spec, const std::string& path) {
  return registry().create(spec, path);
}

std::vector<std::string> dataset_names() { return registry().names(); }

namespace {
class SubsetDataset : public Dataset {
 public:
  SubsetDataset(std::shared_ptr<const Dataset> base, std::vector<int64_t> indices)
      : base_(std::move(base)), indices_(std::move(indices)) {
    on_bad_sample = base_->on_bad_sample;
  }
  int64_t size() const override { return static_cast<int64_t>(indices_.size()); }
  at::Tensor image(int64_t index) const override { return base_->image(at(index)); }
  int64_t label(int64_t index) const override { return base_->label(at(index)); }
  std::string id(int64_t index) const override { return base_->id(at(index)); }
  int64_t num_classes() const override { return base_->num_classes(); }
  std::vector<std::string> source_files() const override { return base_->source_files(); }
  bool in_memory() const override { return base_->in_memory(); }
  std::pair<int, int> image_size() const override { return base_->image_size(); }

 private:
  int64_t at(int64_t index) const { return indices_.at(static_cast<size_t>(index)); }
  std::shared_ptr<const Dataset> base_;
  std::vector<int64_t> indices_;
};
}  // namespace

std::shared_ptr<Dataset> subset(std::shared_ptr<const Dataset> dataset, std::vector<int64_t> indices) {
  if (!dataset) throw std::invalid_argument("subset: no dataset");
  if (dataset->streaming())
    throw std::invalid_argument(
        "subset: a streaming dataset (tar shards) is read in its own order; a subset needs "
        "indexed access (an image folder, a list or a binary dataset)");
  for (const int64_t i : indices)
    if (i < 0 || i >= dataset->size())
      throw std::invalid_argument("subset: index " + std::to_string(i) + " outside the dataset's " +
                                  std::to_string(dataset->size()) + " samples");
  return std::make_shared<SubsetDataset>(std::move(dataset), std::move(indices));
}

std::shared_ptr<Dataset> open_images(const std::string& input, const std::string& path) {
  if (fs::is_directory(input)) return create_dataset({{"type", "image_folder"}, {"root", input}}, path);
  if (fs::path(input).extension() == ".json") return create_dataset(config::read_json_file(input), path);
  return create_dataset({{"type", "csv"}, {"file", input}}, path);
}

}  // namespace twins::data

#include <ATen/ATen.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <set>

#include "tests/test_util.h"
#include "twins/data/csv.h"
#include "twins/data/dataset.h"
#include "twins/data/image_io.h"
#include "twins/data/loader.h"

using namespace twins::data;
using nlohmann::json;
using twins::test::check_throws_with;
namespace fs = std::filesystem;

namespace {

// A fresh folder under the system temp dir, removed at scope exit.
struct TempDir {
  fs::path path;
  TempDir() {
    path = fs::temp_directory_path() / ("twins_test_" + std::to_string(::getpid()) + "_" + std::to_string(counter()++));
    fs::create_directories(path);
  }
  ~TempDir() { fs::remove_all(path); }
  std::string operator/(const std::string& name) const { return (path / name).string(); }
  static int& counter() {
    static int c = 0;
    return c;
  }
};

// A sparse file of `size` bytes with `records` written at their offsets.
void write_sparse(const std::string& file, size_t size,
                  const std::vector<std::pair<size_t, std::vector<uint8_t>>>& records) {
  { std::ofstream(file, std::ios::binary); }
  fs::resize_file(file, size);
  std::fstream f(file, std::ios::binary | std::ios::in | std::ios::out);
  for (const auto& [offset, bytes] : records) {
    f.seekp(static_cast<std::streamoff>(offset));
    f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  }
}

std::vector<uint8_t> big_endian(uint32_t v) {
  return {uint8_t(v >> 24), uint8_t(v >> 16), uint8_t(v >> 8), uint8_t(v)};
}

void write_gz(const std::string& file, const std::vector<uint8_t>& bytes) {
  gzFile f = gzopen(file.c_str(), "wb");
  gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size()));
  gzclose(f);
}

// IDX image and label files of n images h x w: pixel (i, y, x) = (i + y * w + x) % 256, label i % 10.
void write_idx(const std::string& dir, const std::string& prefix, uint32_t n, uint32_t h, uint32_t w, bool gz) {
  std::vector<uint8_t> images = big_endian(0x803), labels = big_endian(0x801);
  for (uint32_t v : {n, h, w})
    for (uint8_t b : big_endian(v)) images.push_back(b);
  for (uint8_t b : big_endian(n)) labels.push_back(b);
  for (uint32_t i = 0; i < n; ++i) {
    for (uint32_t p = 0; p < h * w; ++p) images.push_back(uint8_t((i + p) % 256));
    labels.push_back(uint8_t(i % 10));
  }
  const std::string img = dir + "/" + prefix + "-images-idx3-ubyte", lab = dir + "/" + prefix + "-labels-idx1-ubyte";
  if (gz) {
    write_gz(img + ".gz", images);
    write_gz(lab + ".gz", labels);
  } else {
    std::ofstream(img, std::ios::binary).write(reinterpret_cast<const char*>(images.data()), images.size());
    std::ofstream(lab, std::ios::binary).write(reinterpret_cast<const char*>(labels.data()), labels.size());
  }
}

}  // namespace

TEST_CASE("data: CIFAR-10 and CIFAR-100 binary records") {
  TempDir dir;
  fs::create_directories(dir / "cifar-10-batches-bin");
  // record 3 of the test batch: label 7, R plane 10.., G plane 20.., B plane 30..
  std::vector<uint8_t> record(3073);
  record[0] = 7;
  for (int p = 0; p < 1024; ++p) record[1 + p] = 10, record[1 + 1024 + p] = 20, record[1 + 2048 + p] = uint8_t(p % 32);
  write_sparse(dir / "cifar-10-batches-bin/test_batch.bin", 10000 * 3073, {{3 * 3073, record}});
  auto d = create_dataset({{"type", "cifar10"}, {"root", dir.path.string()}, {"split", "test"}});
  CHECK(d->size() == 10000);
  CHECK(d->num_classes() == 10);
  CHECK(d->label(3) == 7);
  CHECK(d->label(4) == 0);
  const at::Tensor img = d->image(3);
  CHECK(img.sizes() == std::vector<int64_t>{32, 32, 3});
  CHECK(img[5][9][0].item<int>() == 10);
  CHECK(img[5][9][1].item<int>() == 20);
  CHECK(img[5][9][2].item<int>() == 9);  // B plane: column index
  CHECK(d->id(3).find("test_batch.bin#3") != std::string::npos);

  SUBCASE("a truncated file names the file and the expected size") {
    fs::resize_file(dir / "cifar-10-batches-bin/test_batch.bin", 10000 * 3073 - 100);
    check_throws_with<std::runtime_error>(
        [&] {
          create_dataset({{"type", "cifar10"}, {"root", dir.path.string()}, {"split", "test"}});
        },
        "test_batch.bin: 10000 records of 3073 bytes must be 30730000 bytes, found 30729900 (truncated?)");
  }
  SUBCASE("missing files are named") {
    check_throws_with<std::runtime_error>(
        [&] {
          create_dataset({{"type", "cifar10"}, {"root", dir.path.string()}, {"split", "train"}});
        },
        "data_batch_1.bin");
  }
  SUBCASE("CIFAR-100: fine and coarse labels") {
    std::vector<uint8_t> r100(3074);
    r100[0] = 4, r100[1] = 77;
    write_sparse(dir / "test.bin", 10000 * 3074, {{2 * 3074, r100}});
    auto fine = create_dataset({{"type", "cifar100"}, {"root", dir.path.string()}, {"split", "test"}});
    auto coarse =
        create_dataset({{"type", "cifar100"}, {"root", dir.path.string()}, {"split", "test"}, {"label", "coarse"}});
    CHECK(fine->label(2) == 77);
    CHECK(fine->num_classes() == 100);
    CHECK(coarse->label(2) == 4);
    CHECK(coarse->num_classes() == 20);
  }
}

TEST_CASE("data: STL-10 column-major binary and 1-based labels") {
  TempDir dir;
  std::vector<uint8_t> image(96 * 96 * 3);
  // channel 1, row 2, column 5 sits at 9216 + 5 * 96 + 2 in STL's column-major planes
  image[9216 + 5 * 96 + 2] = 200;
  write_sparse(dir / "test_X.bin", 8000 * 27648, {{27648 * 10, image}});
  std::vector<uint8_t> labels(8000, 1);
  labels[10] = 10;
  write_sparse(dir / "test_y.bin", 8000, {{0, labels}});
  auto d = create_dataset({{"type", "stl10"}, {"root", dir.path.string()}, {"split", "test"}});
  CHECK(d->size() == 8000);
  CHECK(d->label(10) == 9);
  CHECK(d->label(0) == 0);
  CHECK(d->image(10)[2][5][1].item<int>() == 200);
  CHECK(d->image(10).sum().item<int64_t>() == 200);
  check_throws_with<std::runtime_error>(
      [&] {
        create_dataset({{"type", "stl10"}, {"root", dir.path.string()}, {"split", "unlabeled"}});
      },
      "unlabeled_X.bin");
  check_throws_with<std::invalid_argument>(
      [&] {
        create_dataset({{"type", "stl10"}, {"root", dir.path.string()}, {"split", "val"}});
      },
      "data.split: unknown split \"val\"; valid: train test unlabeled train+unlabeled");
}

TEST_CASE("data: MNIST/Fashion-MNIST IDX, gzipped or not") {
  for (bool gz : {true, false}) {
    CAPTURE(gz);
    TempDir dir;
    write_idx(dir.path.string(), "t10k", 12, 5, 4, gz);
    auto d = create_dataset({{"type", "fashion_mnist"}, {"root", dir.path.string()}, {"split", "test"}});
    CHECK(d->size() == 12);
    CHECK(d->label(11) == 1);
    const at::Tensor img = d->image(3);
    CHECK(img.sizes() == std::vector<int64_t>{5, 4, 1});
    CHECK(img[2][1][0].item<int>() == (3 + 2 * 4 + 1));
  }
  TempDir dir;
  write_idx(dir.path.string(), "train", 12, 5, 4, false);
  fs::resize_file(dir / "train-images-idx3-ubyte", 16 + 12 * 20 - 1);
  check_throws_with<std::runtime_error>(
      [&] {
        create_dataset({{"type", "mnist"}, {"root", dir.path.string()}});
      },
      "train-images-idx3-ubyte: 16 header bytes + 12 images of 5x4 must be 256 bytes, found 255");
  // a gzip file cut short
  write_idx(dir.path.string(), "t10k", 300, 28, 28, true);
  fs::resize_file(dir / "t10k-images-idx3-ubyte.gz", fs::file_size(dir / "t10k-images-idx3-ubyte.gz") / 2);
  check_throws_with<std::runtime_error>(
      [&] {
        create_dataset({{"type", "mnist"}, {"root", dir.path.string()}, {"split", "test"}});
      },
      "t10k-images-idx3-ubyte.gz");
  // not IDX at all
  write_idx(dir.path.string(), "t10k", 3, 2, 2, false);
  fs::remove(dir / "t10k-images-idx3-ubyte.gz");
  std::ofstream(dir / "t10k-images-idx3-ubyte", std::ios::binary) << "hello, not an IDX file";
  check_throws_with<std::runtime_error>(
      [&] {
        create_dataset({{"type", "mnist"}, {"root", dir.path.string()}, {"split", "test"}});
      },
      "not an IDX image file");
}

TEST_CASE("data: image folders, CSV lists, bad samples") {
  TempDir dir;
  for (const char* cls : {"cat", "dog"}) fs::create_directories(dir / cls);
  write_image(dir / "cat/a.png", at::full({6, 8, 3}, 50, at::kByte));
  {  // writing leaves the image untouched, and reads back the same
    const at::Tensor rgb = at::randint(0, 256, {5, 7, 3}, at::kByte), copy = rgb.clone();
    write_image(dir / "rgb.png", rgb);
    CHECK(at::equal(rgb, copy));
    CHECK(at::equal(read_image(dir / "rgb.png"), copy));
    fs::remove(dir / "rgb.png");
  }
  write_image(dir / "cat/b.PNG", at::full({6, 8, 1}, 60, at::kByte));
  write_image(dir / "dog/c.png", at::full({7, 5, 3}, 70, at::kByte));
  std::ofstream(dir / "dog/notes.txt") << "not an image";
  auto d = create_dataset({{"type", "image_folder"}, {"root", dir.path.string()}});
  REQUIRE(d->size() == 3);
  CHECK(d->num_classes() == 2);
  CHECK(d->label(0) == 0);
  CHECK(d->label(2) == 1);
  CHECK(d->image(1).sizes() == std::vector<int64_t>{6, 8, 1});
  CHECK(d->image(2)[0][0][0].item<int>() == 70);

  SUBCASE("csv") {
    std::ofstream(dir / "list.csv") << "path,label\ncat/a.png,3\n"
                                    << (dir / "dog/c.png") << ",0\n# comment\ncat/b.PNG\n";
    auto c = create_dataset({{"type", "csv"}, {"file", dir / "list.csv"}});
    CHECK(c->size() == 3);
    CHECK(c->label(0) == 3);
    CHECK(c->label(2) == -1);
    CHECK(c->num_classes() == 4);
    CHECK(c->image(1)[0][0][0].item<int>() == 70);
    std::ofstream(dir / "bad.csv") << "cat/a.png,x\n";
    check_throws_with<std::runtime_error>(
        [&] {
          create_dataset({{"type", "csv"}, {"file", dir / "bad.csv"}});
        },
        "bad.csv:1: label \"x\" is not a non-negative integer");
  }
  SUBCASE("a corrupt image stops the loader with its file, or is skipped and counted") {
    std::ofstream(dir / "dog/broken.jpg") << "\xff\xd8\xff garbage";
    const auto views = twins::augment::parse_views(json::parse(R"([[{"type": "center_crop", "size": 4}]])"));
    LoaderOptions o;
    o.batch_size = 4, o.workers = 2, o.shuffle = false;
    {
      Loader loader(create_dataset({{"type", "image_folder"}, {"root", dir.path.string()}}), views, o);
      loader.start_epoch(0);
      check_throws_with<std::runtime_error>([&] { loader.next(); }, "broken.jpg: cannot decode image");
    }
    Loader loader(create_dataset({{"type", "image_folder"}, {"root", dir.path.string()}, {"on_bad_sample", "skip"}}),
                  views, o);
    loader.start_epoch(0);
    const auto batch = loader.next();
    REQUIRE(batch);
    CHECK(loader.skipped() == 1);
    CHECK(batch->views[0].sizes() == std::vector<int64_t>{4, 3, 4, 4});
    CHECK(batch->views[0][1].min().item<int>() == 60);  // the grey image, replicated to RGB
  }
  check_throws_with<std::invalid_argument>(
      [&] {
        create_dataset({{"type", "image_folder"}, {"root", dir.path.string()}, {"on_bad_sample", "ignore"}});
      },
      "data.on_bad_sample: must be error or skip");
  check_throws_with<std::runtime_error>(
      [&] {
        create_dataset({{"type", "image_folder"}, {"root", dir / "nope"}});
      },
      "does not exist");
  check_throws_with<std::invalid_argument>(
      [&] {
        create_dataset({{"type", "imagenet"}, {"root", "x"}});
      },
      "valid types: cifar10 cifar100 csv fashion_mnist image_folder mnist shards stl10");
}

TEST_CASE("data: loader batches are identical for any number of workers and ranks") {
  TempDir dir;
  write_idx(dir.path.string(), "train", 50, 12, 12, false);
  auto d = create_dataset({{"type", "mnist"}, {"root", dir.path.string()}});
  const auto views = twins::augment::parse_views(json::parse(R"([
    [{"type": "random_resized_crop", "size": 8}, {"type": "random_horizontal_flip"}],
    [{"type": "random_resized_crop", "size": 6, "scale": [0.2, 0.5]}, {"type": "color_jitter", "brightness": 0.4}]])"));
  auto run = [&](int workers, int64_t rank, int64_t world, int64_t batch) {
    LoaderOptions o;
    o.batch_size = batch, o.workers = workers, o.seed = 3, o.rank = rank, o.world_size = world, o.channels = 3;
    Loader loader(d, views, o);
    std::map<int64_t, std::vector<at::Tensor>> by_index;  // dataset index -> its views
    std::vector<int64_t> order;
    for (int64_t epoch : {0, 1}) {
      loader.start_epoch(epoch);
      while (auto b = loader.next()) {
        for (int64_t j = 0; j < b->indices.size(0); ++j) {
          const int64_t i = b->indices[j].item<int64_t>();
          if (epoch == 1)
            by_index[i] = {b->views[0][j], b->views[1][j]};
          else
            order.push_back(i);
          CHECK(b->labels[j].item<int64_t>() == i % 10);
        }
      }
    }
    return std::make_pair(order, by_index);
  };
  const auto [order0, views0] = run(0, 0, 1, 5);
  const auto [order3, views3] = run(3, 0, 1, 5);
  CHECK(order0 == order3);
  CHECK(order0.size() == 50);
  CHECK(std::set<int64_t>(order0.begin(), order0.end()).size() == 50);  // a permutation
  for (const auto& [i, v] : views0) {
    CHECK(at::equal(v[0], views3.at(i)[0]));
    CHECK(at::equal(v[1], views3.at(i)[1]));
  }
  // Two ranks: disjoint halves of the same epoch, and the same views per sample.
  const auto [r0, v0] = run(2, 0, 2, 5);
  const auto [r1, v1] = run(1, 1, 2, 5);
  std::set<int64_t> both(r0.begin(), r0.end());
  both.insert(r1.begin(), r1.end());
  CHECK(both.size() == 50);
  CHECK(r0.size() == 25);
  for (const auto& [i, v] : v1) CHECK(at::equal(v[1], views0.at(i)[1]));
  // Three ranks pad 50 to 51 like DistributedSampler; drop_last gives 17 / 4 = 4 batches.
  LoaderOptions o;
  o.batch_size = 4, o.rank = 2, o.world_size = 3, o.workers = 0;
  Loader three(d, views, o);
  CHECK(three.epoch_indices(0).size() == 17);
  CHECK(three.batches_per_epoch() == 4);
}

TEST_CASE("data: loader resume position, errors and shutdown") {
  TempDir dir;
  write_idx(dir.path.string(), "train", 40, 10, 10, false);
  auto d = create_dataset({{"type", "mnist"}, {"root", dir.path.string()}});
  const auto views = twins::augment::parse_views(json::parse(R"([[{"type": "random_resized_crop", "size": 8}]])"));
  LoaderOptions o;
  o.batch_size = 4, o.workers = 2, o.channels = 1;
  Loader loader(d, views, o);
  loader.start_epoch(2);
  std::vector<at::Tensor> full;
  while (auto b = loader.next()) full.push_back(b->views[0]);
  CHECK(full.size() == 10);
  loader.start_epoch(2, 6);  // resume in the middle: the same batches from 6 on
  for (size_t k = 6; k < 10; ++k) {
    auto b = loader.next();
    REQUIRE(b);
    CHECK(b->index == static_cast<int64_t>(k));
    CHECK(at::equal(b->views[0], full[k]));
  }
  CHECK_FALSE(loader.next());
  // Destroying a loader with work in flight returns promptly.
  {
    Loader busy(d, views, o);
    busy.start_epoch(0);
    busy.next();
  }
  o.batch_size = 41;
  check_throws_with<std::invalid_argument>([&] { Loader(d, views, o); }, "batch_size: 41 is larger");
  // A view whose size depends on the input cannot be batched from images of different sizes.
  TempDir mixed;
  write_image(mixed / "a.png", at::zeros({6, 8, 3}, at::kByte));
  write_image(mixed / "b.png", at::zeros({7, 5, 3}, at::kByte));
  LoaderOptions m;
  m.batch_size = 2, m.workers = 1, m.shuffle = false;
  Loader bad(create_dataset({{"type", "image_folder"}, {"root", mixed.path.string()}}),
             twins::augment::parse_views(json::parse(R"([[{"type": "random_horizontal_flip"}]])")), m);
  bad.start_epoch(0);
  check_throws_with<std::runtime_error>([&] { bad.next(); }, "end the view with a fixed-size op");
}

TEST_CASE("data: JPEG decoding matches PIL's pixels and truncated files are errors") {
  const std::string dir = twins::test::reference_path("augment");
  for (const std::string name : {"jpeg_photo", "jpeg_grey"}) {
    CAPTURE(name);
    const at::Tensor ours = read_image(dir + "/" + name + ".jpg");
    const at::Tensor pil = read_image(dir + "/" + name + "_decoded.png");
    REQUIRE(ours.sizes() == pil.sizes());
    const int max_diff = (ours.to(at::kInt) - pil.to(at::kInt)).abs().max().item<int>();
    MESSAGE(name, ": max difference from PIL ", max_diff);
    CHECK(max_diff <= 1);  // 0 with libjpeg-turbo directly; OpenCV's path may differ slightly
  }
  TempDir tmp;
  std::ifstream in(dir + "/jpeg_photo.jpg", std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::ofstream(tmp / "cut.jpg", std::ios::binary) << bytes.substr(0, bytes.size() / 2);
  check_throws_with<std::runtime_error>([&] { read_image(tmp / "cut.jpg"); }, "cut.jpg: cannot decode image");
  std::ofstream(tmp / "empty.png", std::ios::binary) << "";
  check_throws_with<std::runtime_error>([&] { read_image(tmp / "empty.png"); }, "empty.png: empty file");
  check_throws_with<std::runtime_error>([&] { read_image(tmp / "missing.png"); }, "missing.png: cannot open");
}

// ---- hostile inputs: each class of fault is an error naming the file (or a counted skip), never
// a crash, a memory bomb or a silently wrong dataset ------------------------------------------

TEST_CASE("data: hostile IDX files: overflowing headers, gzip bombs, truncation, labels out of range") {
  TempDir dir;
  // Dimensions whose product overflows 64 bits: refused from the header, nothing allocated.
  std::vector<uint8_t> header = big_endian(0x803);
  for (uint32_t v : {0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu})
    for (uint8_t b : big_endian(v)) header.push_back(b);
  write_idx(dir.path.string(), "train", 4, 2, 2, false);
  std::ofstream(dir / "train-images-idx3-ubyte", std::ios::binary)
      .write(reinterpret_cast<const char*>(header.data()), 16);
  check_throws_with<std::runtime_error>(
      [&] {
        create_dataset({{"type", "mnist"}, {"root", dir.path.string()}});
      },
      "declares more than 2^40 bytes");
  // A gzip file declaring 4 images of 2x2 but expanding to 64 MB: stopped at the declared size.
  {
    std::vector<uint8_t> bomb = big_endian(0x803);
    for (uint32_t v : {4u, 2u, 2u})
      for (uint8_t b : big_endian(v)) bomb.push_back(b);
    bomb.resize(64u << 20, 0);
    fs::remove(dir / "train-images-idx3-ubyte");
    write_gz(dir / "train-images-idx3-ubyte.gz", bomb);
    check_throws_with<std::runtime_error>(
        [&] {
          create_dataset({{"type", "mnist"}, {"root", dir.path.string()}});
        },
        "decompresses to more than the 32 bytes its header declares");
    fs::remove(dir / "train-images-idx3-ubyte.gz");
  }
  // A truncated .gz: the message is readable (it was read after zlib freed it). zlib up to 1.3.1
  // reports the truncation; 1.3.2 (Debian unstable) returns the partial data without an error,
  // and the IDX size check names the file instead.
  write_idx(dir.path.string(), "train", 300, 28, 28, true);
  fs::resize_file(dir / "train-images-idx3-ubyte.gz", fs::file_size(dir / "train-images-idx3-ubyte.gz") / 2);
  try {
    create_dataset({{"type", "mnist"}, {"root", dir.path.string()}});
    FAIL("a truncated gzip file was accepted");
  } catch (const std::runtime_error& e) {
    const std::string what = e.what();
    INFO(what);
    CHECK(
        (what.find("corrupt or truncated gzip file (") != std::string::npos ||
         what.find("train-images-idx3-ubyte.gz: 16 header bytes + 300 images of 28x28 must be 235216 bytes, found ") !=
             std::string::npos));
    for (char c : what) CHECK(((c >= 32 && c < 127) || c == '\n'));  // no garbled bytes
  }
  fs::remove(dir / "train-images-idx3-ubyte.gz");
  fs::remove(dir / "train-labels-idx1-ubyte.gz");
  // A label outside the 10 classes is corrupt data, named with its record.
  write_idx(dir.path.string(), "train", 5, 2, 2, false);
  {
    std::fstream f(dir / "train-labels-idx1-ubyte", std::ios::binary | std::ios::in | std::ios::out);
    f.seekp(8 + 3);
    f.put(char(12));
  }
  check_throws_with<std::runtime_error>(
      [&] {
        create_dataset({{"type", "mnist"}, {"root", dir.path.string()}});
      },
      "train-labels-idx1-ubyte: record 3 has label 12, outside the 10 classes of mnist");
}

TEST_CASE("data: CSV lists as RFC 4180") {
  TempDir dir;
  fs::create_directories(dir / "a, b");
  write_image(dir / "a, b/x.png", at::full({4, 4, 3}, 9, at::kByte));
  write_image(dir / "y.png", at::full({4, 4, 3}, 19, at::kByte));
  // BOM, a quoted path with a comma, CRLF line ends, a doubled quote, an empty line.
  std::ofstream(dir / "list.csv", std::ios::binary)
      << "\xEF\xBB\xBFpath,label\r\n\"a, b/x.png\",2\r\n\r\ny.png,\"0\"\r\n";
  auto d = create_dataset({{"type", "csv"}, {"file", dir / "list.csv"}});
  REQUIRE(d->size() == 2);
  CHECK(d->label(0) == 2);
  CHECK(d->image(0)[0][0][0].item<int>() == 9);
  CHECK(d->num_classes() == 3);
  const auto rows = parse_csv("a,\"q\"\"uote\"\n\"multi\nline\",3", "t.csv");
  REQUIRE(rows.size() == 2);
  CHECK(rows[0].fields[1] == "q\"uote");
  CHECK(rows[1].fields[0] == "multi\nline");
  CHECK(rows[1].line == 2);
  check_throws_with<std::runtime_error>([] { parse_csv("a,\"open\n", "t.csv"); },
                                        "t.csv:1: a quoted field is not closed");
  check_throws_with<std::runtime_error>([] { parse_csv("a,\"x\"y\n", "t.csv"); }, "text after the closing quote");
  // An absurd label is refused, and quoted only in part in the message.
  std::ofstream(dir / "huge.csv") << "y.png," << std::string(100000, '9') << "\n";
  try {
    create_dataset({{"type", "csv"}, {"file", dir / "huge.csv"}});
    FAIL("a huge label was accepted");
  } catch (const std::runtime_error& e) {
    CHECK(std::string(e.what()).find("huge.csv:1: a field longer than 4096 bytes") != std::string::npos);
    CHECK(std::string(e.what()).size() < 300);
  }
  std::ofstream(dir / "three.csv") << "a.png,1,2\n";
  std::ofstream(dir / "big.csv") << "y.png,123456789012\n";
  check_throws_with<std::runtime_error>(
      [&] {
        create_dataset({{"type", "csv"}, {"file", dir / "big.csv"}});
      },
      "big.csv:1: label \"123456789012\" is not a non-negative integer below 1000000");
  check_throws_with<std::runtime_error>(
      [&] {
        create_dataset({{"type", "csv"}, {"file", dir / "three.csv"}});
      },
      "three.csv:1: 3 fields; expected path[,label]");
}

TEST_CASE("data: image headers are checked before decoding, and every undecodable file is a bad sample") {
  TempDir dir;
  // A PNG header claiming 60000 x 60000 pixels (3.6 Gpx): refused from the header alone.
  std::vector<uint8_t> png = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n', 0, 0, 0, 13, 'I', 'H', 'D', 'R'};
  for (uint8_t b : big_endian(60000)) png.push_back(b);
  for (uint8_t b : big_endian(60000)) png.push_back(b);
  for (uint8_t b : {8, 2, 0, 0, 0}) png.push_back(b);
  CHECK(image_header_size(png.data(), png.size()) == std::pair<int64_t, int64_t>{60000, 60000});
  check_throws_with<std::runtime_error>([&] { decode_image(png, "bomb.png"); },
                                        "bomb.png: 60000x60000 pixels, above the limit of 89478485");
  // A tiny JPEG whose frame header claims 20000 x 20000: refused before libjpeg allocates.
  const uint8_t frame[] = {0xFF, 0xD8, 0xFF, 0xC0, 0x00, 0x11, 0x08, 0x4E, 0x20, 0x4E, 0x20, 0x03};
  std::vector<uint8_t> jpeg(64, 0);  // (not resize(): g++ 16 warns about its inlined memset)
  std::copy(std::begin(frame), std::end(frame), jpeg.begin());
  CHECK(image_header_size(jpeg.data(), jpeg.size()) == std::pair<int64_t, int64_t>{20000, 20000});
  check_throws_with<std::runtime_error>([&] { decode_image(jpeg, "claims.jpg"); },
                                        "20000x20000 pixels, above the limit");
  // The limit is a dataset key; real images keep their header sizes.
  write_image(dir / "ok.png", at::zeros({30, 40, 3}, at::kByte));
  {
    std::ifstream in(dir / "ok.png", std::ios::binary);
    const std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    CHECK(image_header_size(bytes.data(), bytes.size()) == std::pair<int64_t, int64_t>{40, 30});
  }
  write_image(dir / "ok.bmp", at::zeros({7, 9, 3}, at::kByte));
  {
    std::ifstream in(dir / "ok.bmp", std::ios::binary);
    const std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    CHECK(image_header_size(bytes.data(), bytes.size()) == std::pair<int64_t, int64_t>{9, 7});
  }
  auto small = create_dataset({{"type", "image_folder"}, {"root", dir.path.string()}, {"max_image_pixels", 100}});
  check_throws_with<BadSample>([&] { small->image(1); }, "40x30 pixels, above the limit of 100");
  // A PNG whose data is garbage after a valid header: OpenCV's exception becomes a bad sample,
  // which "skip" replaces and counts.
  std::vector<uint8_t> broken = png;
  broken[16 + 2] = 0, broken[16 + 3] = 8, broken[20 + 2] = 0, broken[20 + 3] = 8;  // 8 x 8
  broken.resize(200, 0x55);
  std::ofstream(dir / "broken.png", std::ios::binary)
      .write(reinterpret_cast<const char*>(broken.data()), broken.size());
  auto d = create_dataset({{"type", "image_folder"}, {"root", dir.path.string()}, {"on_bad_sample", "skip"}});
  REQUIRE(d->size() == 3);
  CHECK_THROWS_AS(d->image(0), BadSample);
  const auto views = twins::augment::parse_views(json::parse(R"([[{"type": "center_crop", "size": 4}]])"));
  LoaderOptions o;
  o.batch_size = 3, o.workers = 1, o.shuffle = false, o.drop_last = false;
  Loader loader(d, views, o);
  loader.start_epoch(0);
  REQUIRE(loader.next());
  CHECK(loader.skipped() == 1);
}

TEST_CASE("data: an absurd number of loader workers is an error, not a crash") {
  TempDir dir;
  write_idx(dir.path.string(), "train", 8, 4, 4, false);
  auto d = create_dataset({{"type", "mnist"}, {"root", dir.path.string()}});
  const auto views = twins::augment::parse_views(json::parse(R"([[{"type": "center_crop", "size": 4}]])"));
  LoaderOptions o;
  o.batch_size = 2, o.workers = 1000000;
  check_throws_with<std::invalid_argument>([&] { Loader(d, views, o); }, "LoaderOptions::workers: must be in [0, 256]");
}

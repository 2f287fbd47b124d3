#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <filesystem>
#include <fstream>
#include <thread>

#include "tests/test_util.h"
#include "twins/augment/random.h"
#include "twins/data/dataset.h"
#include "twins/data/image_io.h"
#include "twins/embed.h"
#include "twins/eval/npy.h"
#include "twins/eval/plots.h"
#include "twins/eval/probe.h"
#include "twins/eval/transform.h"
#include "twins/models/resnet.h"
#include "twins/models/safetensors.h"
#include "twins/models/weights.h"

using namespace twins::eval;
using twins::test::check_throws_with;
namespace fs = std::filesystem;

namespace {

fs::path temp_dir(const std::string& name) { return twins::test::fresh_dir("eval", name); }

// Gaussian blobs: class c centred at 4 e_c in 16 dimensions (linearly separable).
Features blobs(int64_t n, int64_t classes, uint64_t seed) {
  at::manual_seed(seed);
  const at::Tensor labels = at::randint(0, classes, {n}, at::kLong);
  const at::Tensor x = at::randn({n, 16}) * 0.5 + at::one_hot(labels, 16).to(at::kFloat) * 4;
  return {x, labels};
}

}  // namespace

TEST_CASE("eval: linear probe separates separable features and not shuffled labels") {
  const Features train = blobs(2000, 10, 1), test = blobs(500, 10, 2);
  LinearProbeOptions o;
  o.epochs = 20;
  const auto r = linear_probe(train, test, 10, o, at::kCPU);
  MESSAGE("separable: test top-1 ", r.test.top1);
  CHECK(r.test.top1 > 99.0);
  CHECK(r.test.top5 == doctest::Approx(100.0));
  Features shuffled = train;
  shuffled.labels = train.labels.index_select(0, at::randperm(2000, at::kLong));
  const auto s = linear_probe(shuffled, test, 10, o, at::kCPU);
  MESSAGE("shuffled labels: test top-1 ", s.test.top1);
  CHECK(s.test.top1 < 20.0);  // chance is 10%
  check_throws_with<std::invalid_argument>(
      [&] {
        linear_probe({train.features, train.labels * 0 - 1}, test, 10, o, at::kCPU);
      },
      "no labels");
}

TEST_CASE("eval: the cached-feature probe is ProbeHead::step batch by batch, and keeps the thread count") {
  // linear_probe standardises the features once and steps without filtering, on one thread for a
  // problem this small: the same classifier as the head fed batch by batch (unlabelled rows mixed
  // in and filtered by step()), on one thread too for the same summation order.
  // Overlapping classes, so that top-1 sits far from 100% and a different classifier shows.
  auto noisy = [](Features f) { return Features{f.features / 4 + at::randn(f.features.sizes()), f.labels}; };
  const Features train = noisy(blobs(600, 10, 3)), test = noisy(blobs(400, 10, 4));
  LinearProbeOptions o;
  o.epochs = 3, o.batch_size = 64;
  const int threads = at::get_num_threads();
  const auto r = linear_probe(train, test, 10, o, at::kCPU);
  CHECK(at::get_num_threads() == threads);

  at::set_num_threads(1);
  const int64_t n = 600, batches = (n + o.batch_size - 1) / o.batch_size;
  ProbeHead head(train.features.mean(0), train.features.std(0), 10, o, batches * o.epochs, at::kCPU);
  for (int64_t e = 0; e < o.epochs; ++e) {
    const at::Tensor perm = at::tensor(
        twins::augment::permutation(n, twins::augment::Rng(o.seed, static_cast<uint64_t>(e), 0, 0)), at::kLong);
    for (int64_t b = 0; b < batches; ++b) {
      const at::Tensor idx = perm.slice(0, b * o.batch_size, std::min(n, (b + 1) * o.batch_size));
      const at::Tensor noise = at::randn({5, 16});  // unlabelled rows: left out by step()
      head.step(at::cat({train.features.index_select(0, idx), noise}),
                at::cat({train.labels.index_select(0, idx), at::full({5}, -1, at::kLong)}));
    }
  }
  at::set_num_threads(threads);
  const Accuracy by_step = head.score(test), by_step_train = head.score(train);
  MESSAGE("test top-1 ", r.test.top1, " and ", by_step.top1);
  CHECK(r.test.top1 < 90.0);
  CHECK(r.test.top1 == by_step.top1);
  CHECK(r.test.top5 == by_step.top5);
  CHECK(r.train.top1 == by_step_train.top1);
}

TEST_CASE("eval: kNN equals a brute-force reference") {
  const Features train = blobs(300, 5, 3), test = blobs(97, 5, 4);
  KnnOptions o;
  o.k = {1, 7, 20, 500};  // 500 > the training set: clamped
  o.temperature = 0.1;
  o.chunk = 13;  // uneven chunks
  const auto r = knn(train, test, 5, o, at::kCPU);
  // Brute force: every similarity, a full sort, explicit votes.
  const at::Tensor a = train.features / train.features.norm(2, {1}, true);
  const at::Tensor b = test.features / test.features.norm(2, {1}, true);
  const at::Tensor sim = b.mm(a.t());
  for (int64_t k : o.k) {
    const int64_t kk = std::min<int64_t>(k, 300);
    int correct = 0;
    for (int64_t i = 0; i < 97; ++i) {
      const at::Tensor order = std::get<1>(sim[i].sort(0, true));
      std::vector<double> votes(5, 0.0);
      for (int64_t j = 0; j < kk; ++j) {
        const int64_t n = order[j].item<int64_t>();
        votes[static_cast<size_t>(train.labels[n].item<int64_t>())] += std::exp(sim[i][n].item<double>() / 0.1);
      }
      const int64_t best = std::max_element(votes.begin(), votes.end()) - votes.begin();
      correct += best == test.labels[i].item<int64_t>();
    }
    CAPTURE(k);
    CHECK(r.at(k).top1 == doctest::Approx(100.0 * correct / 97).epsilon(1e-9));
  }
}

TEST_CASE("eval: .npy files load in NumPy") {
  const fs::path dir = temp_dir("npy");
  const at::Tensor x = at::arange(12, at::kFloat).view({3, 4}) / 4;
  write_npy((dir / "x.npy").string(), x);
  write_npy((dir / "v.npy").string(), at::arange(5, at::kLong));
  const std::string cmd = "/usr/bin/python3 -c \"import numpy as np; x = np.load('" + (dir / "x.npy").string() +
                          "'); v = np.load('" + (dir / "v.npy").string() +
                          "'); assert x.dtype == np.float32 and x.shape == (3, 4) and x[2, 3] == 2.75, x; "
                          "assert v.dtype == np.int64 and v.shape == (5,) and v[4] == 4\"";
  CHECK(std::system(cmd.c_str()) == 0);
  // The header is 64-byte aligned and starts with the magic string.
  std::ifstream in(dir / "x.npy", std::ios::binary);
  std::string head(10, '\0');
  in.read(head.data(), 10);
  CHECK(head.substr(0, 6) == "\x93NUMPY");
  CHECK((10 + (uint8_t(head[8]) | (uint8_t(head[9]) << 8))) % 64 == 0);
  fs::remove_all(dir);
}

TEST_CASE("eval: safetensors round trip, byte layout, and malformed files") {
  const fs::path dir = temp_dir("st");
  const std::string f = (dir / "t.safetensors").string();
  twins::models::NamedTensors tensors = {{"a", at::arange(6, at::kFloat).view({2, 3})},
                                         {"b", at::tensor({1, -2}, at::kLong)},
                                         {"c", at::tensor({7}, at::kByte)},
                                         {"d", at::ones({2, 2}, at::kDouble).t()}};  // non-contiguous
  twins::models::save_safetensors(f, tensors, {{"note", "hi"}});
  const auto back = twins::models::load_safetensors(f);
  REQUIRE(back.tensors.size() == 4);
  for (const auto& [name, t] : tensors) CHECK(at::equal(back.at(name), t));
  CHECK(back.metadata.at("note") == "hi");
  // Byte layout (the safetensors spec): u64 little-endian header size, JSON, data; 8-byte aligned.
  std::ifstream in(f, std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= uint64_t(uint8_t(bytes[i])) << (8 * i);
  CHECK(n % 8 == 0);
  const auto header = nlohmann::json::parse(bytes.substr(8, n));
  CHECK(header["a"]["dtype"] == "F32");
  CHECK(header["a"]["shape"] == nlohmann::json({2, 3}));
  CHECK(header["a"]["data_offsets"] == nlohmann::json({0, 24}));
  CHECK(header["b"]["data_offsets"] == nlohmann::json({24, 40}));
  CHECK(bytes.size() == 8 + n + 24 + 16 + 1 + 32);
  float first;
  std::memcpy(&first, bytes.data() + 8 + n + 4, 4);
  CHECK(first == 1.0f);
  auto write = [&](const std::string& name, const std::string& content) {
    std::ofstream(dir / name, std::ios::binary) << content;
    return (dir / name).string();
  };
  auto with_header = [](const std::string& json, const std::string& data) {
    std::string s(8, '\0');
    for (int i = 0; i < 8; ++i) s[i] = char((uint64_t(json.size()) >> (8 * i)) & 0xff);
    return s + json + data;
  };
  check_throws_with<std::runtime_error>([&] { twins::models::load_safetensors(write("short", "abc")); },
                                        "shorter than");
  check_throws_with<std::runtime_error>([&] { twins::models::load_safetensors(write("cut", bytes.substr(0, 20))); },
                                        "exceeds the file size");
  check_throws_with<std::runtime_error>(
      [&] { twins::models::load_safetensors(write("json", with_header("{not json", ""))); }, "header is not JSON");
  check_throws_with<std::runtime_error>(
      [&] {
        twins::models::load_safetensors(
            write("off", with_header(R"({"x":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", "12345678")));
      },
      "x: data_offsets [0, 16] outside the 8 bytes of data");
  check_throws_with<std::runtime_error>(
      [&] {
        twins::models::load_safetensors(
            write("dtype", with_header(R"({"x":{"dtype":"F8_E4M3","shape":[1],"data_offsets":[0,1]}})", "1")));
      },
      "unknown or unsupported dtype \"F8_E4M3\"");
  check_throws_with<std::runtime_error>(
      [&] {
        twins::models::load_safetensors(
            write("size", with_header(R"({"x":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", "12345678")));
      },
      "needs 12");
  // A flipped data byte: the CRC catches it.
  std::string corrupt = bytes;
  corrupt[corrupt.size() - 1] ^= 1;
  check_throws_with<std::runtime_error>([&] { twins::models::load_safetensors(write("crc", corrupt)); },
                                        "checksum mismatch");
  fs::remove_all(dir);
}

TEST_CASE("eval: safetensors files are validated as strictly as the safetensors library does") {
  const fs::path dir = temp_dir("st_hostile");
  auto file = [&](const std::string& name, const std::string& json, const std::string& data) {
    std::string s(8, '\0');
    for (int i = 0; i < 8; ++i) s[i] = char((uint64_t(json.size()) >> (8 * i)) & 0xff);
    std::ofstream(dir / name, std::ios::binary) << s + json + data;
    return (dir / name).string();
  };
  auto refused = [&](const std::string& name, const std::string& json, const std::string& data,
                     const std::string& why) {
    CAPTURE(name);
    check_throws_with<std::runtime_error>([&] { twins::models::load_safetensors(file(name, json, data)); }, why);
  };
  refused(
      "hole",
      R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[4,6]}})",
      "123456", "b: data_offsets start at 4 where 2 was expected");
  refused(
      "overlap",
      R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}})",
      "1234", "data_offsets start at 2 where 4 was expected");
  refused("unused", R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}})", "1234", "cover 2 of the 4 bytes");
  refused("overflow", R"({"a":{"dtype":"F64","shape":[4294967296,4294967296,16],"data_offsets":[0,8]}})", "12345678",
          "more elements than can exist");
  refused("start", R"( {"a":1})", "", "does not start with '{'");
  refused("nested", std::string(100, '[') + std::string(100, ']'), "", "does not start with '{'");
  refused("deep", "{\"a\":" + std::string(100, '[') + std::string(100, ']') + "}", "", "nested deeper than 64 levels");
  // A header length beyond the format's 100 MB limit is refused before it is read.
  std::string huge(8, '\0');
  const uint64_t n = 200'000'000;
  for (int i = 0; i < 8; ++i) huge[i] = char((n >> (8 * i)) & 0xff);
  huge.resize(8 + n + 8, ' ');
  huge[8] = '{';
  std::ofstream(dir / "huge", std::ios::binary) << huge;
  check_throws_with<std::runtime_error>([&] { twins::models::load_safetensors((dir / "huge").string()); },
                                        "above the format's limit of 100000000");
  fs::remove_all(dir);
}

TEST_CASE("eval: a backbone file whose metadata describes a giant network is refused before building it") {
  const fs::path dir = temp_dir("giant");
  twins::models::ResNetOptions o = twins::models::resnet_options("resnet18");
  o.width = 4, o.cifar_stem = true;
  twins::models::ResNet net(o);
  CHECK(twins::models::ResNet::state_elements(o) == [&] {
    int64_t n = 0;
    for (const auto& [name, t] : twins::models::backbone_state(net)) n += t.numel();
    return n;
  }());
  // The real weights of a width-4 net, with metadata claiming ResNet-50 x 1024 wide.
  twins::models::save_safetensors((dir / "giant.safetensors").string(), twins::models::backbone_state(net),
                                  {{"twins_backbone", R"({"type": "resnet50", "width": 1024})"}});
  check_throws_with<std::runtime_error>([&] { twins::models::load_backbone((dir / "giant.safetensors").string()); },
                                        "values, but the file holds");
  twins::models::save_safetensors((dir / "wide.safetensors").string(), twins::models::backbone_state(net),
                                  {{"twins_backbone", R"({"type": "resnet18", "width": 100000})"}});
  check_throws_with<std::invalid_argument>([&] { twins::models::load_backbone((dir / "wide.safetensors").string()); },
                                           "resnet.width: must be in [1, 1024]");
  fs::remove_all(dir);
}

TEST_CASE("eval: backbone import and export with torchvision names") {
  const fs::path dir = temp_dir("weights");
  twins::models::ResNetOptions o = twins::models::resnet_options("resnet18");
  o.width = 8;
  auto net = std::make_shared<twins::models::ResNet>(o);
  // A torchvision-style file: no twins metadata, plus an fc to ignore.
  auto state = twins::models::backbone_state(*net);
  state.emplace_back("fc.weight", at::zeros({10, 64}));
  state.emplace_back("fc.bias", at::zeros({10}));
  twins::models::save_safetensors((dir / "tv.safetensors").string(), state);
  auto loaded = twins::models::load_backbone((dir / "tv.safetensors").string());
  CHECK(loaded->to_json()["type"] == "resnet18");
  CHECK(loaded->to_json()["width"] == 8);
  net->eval();
  const at::Tensor x = at::randn({2, 3, 32, 32});
  CHECK(at::allclose(loaded->forward(x), net->forward(x)));
  // Wrong shapes and names: the first mismatches are listed.
  auto bad = twins::models::backbone_state(*net);
  bad[0].second = at::zeros({8, 3, 5, 5});
  bad.emplace_back("layer9.weight", at::zeros({1}));
  twins::models::save_safetensors((dir / "bad.safetensors").string(), bad, {{"twins_backbone", net->to_json().dump()}});
  check_throws_with<std::runtime_error>([&] { twins::models::load_backbone((dir / "bad.safetensors").string()); },
                                        "shape of conv1.weight: file [8, 3, 5, 5], model [8, 3, 7, 7]");
  check_throws_with<std::runtime_error>([&] { twins::models::load_backbone((dir / "bad.safetensors").string()); },
                                        "unexpected layer9.weight");
  check_throws_with<std::runtime_error>([&] { twins::models::load_backbone(dir.string()); },
                                        "without backbone.safetensors");
  fs::remove_all(dir);
}

TEST_CASE("eval: Embedder from several threads, files and tensors") {
  const fs::path dir = temp_dir("embedder");
  twins::models::ResNetOptions o = twins::models::resnet_options("resnet18");
  o.width = 8, o.cifar_stem = true;
  at::manual_seed(0);
  auto net = std::make_shared<twins::models::ResNet>(o);
  twins::models::save_backbone(
      (dir / "backbone.safetensors").string(), *net,
      {{"twins_image_size", "32"}, {"twins_normalize", R"({"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]})"}});
  twins::Embedder embedder(dir.string());
  CHECK(embedder.dim() == 64);
  CHECK(embedder.image_size() == 32);
  const at::Tensor images = at::randint(0, 256, {6, 32, 32, 3}, at::kByte);
  const at::Tensor e = embedder.embed(images);
  CHECK(e.sizes() == std::vector<int64_t>{6, 64});
  // NCHW gives the same; so does the float path with the same normalisation.
  CHECK(at::allclose(embedder.embed(images.permute({0, 3, 1, 2}).contiguous()), e, 1e-5, 1e-5));
  const at::Tensor normalised = (images.permute({0, 3, 1, 2}).to(at::kFloat) / 255 - 0.5) / 0.25;
  CHECK(at::allclose(embedder.embed(normalised), e, 1e-4, 1e-4));
  // Files always get the standard transform (resize to 37, centre crop 32), even at 32 px.
  twins::data::write_image((dir / "a.png").string(), images[0]);
  const auto standard = EvalTransform::standard(32, {{0.5, 0.5, 0.5}, {0.25, 0.25, 0.25}}).view();
  const at::Tensor crop =
      standard.apply(images[0], twins::augment::Rng(0)).permute({2, 0, 1}).unsqueeze(0).contiguous();
  CHECK(at::allclose(embedder.embed_files({(dir / "a.png").string()}), embedder.embed(crop), 1e-5, 1e-5));
  CHECK_FALSE(at::allclose(embedder.embed_files({(dir / "a.png").string()})[0], e[0], 1e-3, 1e-3));
  // Several threads at once give the same results as one.
  std::vector<at::Tensor> results(4);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] { results[static_cast<size_t>(t)] = embedder.embed(images); });
  for (auto& th : threads) th.join();
  for (const auto& r : results) {
    INFO("max difference ", (r - e).abs().max().item<double>());
    CHECK(at::allclose(r, e, 1e-4, 1e-4));  // intra-op parallelism may sum in another order
  }
  check_throws_with<std::runtime_error>([&] { embedder.embed_files({(dir / "missing.png").string()}); }, "missing.png");
  fs::remove_all(dir);
}

TEST_CASE("eval: a folder of mixed-size images gets the same features through every path") {
  // The Embedder on files, the Embedder on the folder as a dataset (`twins embed`), and the
  // evaluation extraction (`twins linear-probe`, `twins knn`): one transform, whatever the
  // first image's size. The first file has a shorter side of exactly the evaluation size.
  const fs::path dir = temp_dir("mixed");
  twins::models::ResNetOptions o = twins::models::resnet_options("resnet18");
  o.width = 8, o.cifar_stem = true;
  at::manual_seed(4);
  auto net = std::make_shared<twins::models::ResNet>(o);
  twins::models::BackboneInfo info;
  info.image_size = 32, info.mean = {0.5, 0.4, 0.3}, info.std = {0.2, 0.25, 0.3};
  twins::models::save_backbone((dir / "backbone.safetensors").string(), *net, info);
  fs::create_directories(dir / "images");
  const std::vector<std::pair<int, int>> sizes = {{32, 40}, {50, 41}, {57, 36}, {24, 30}, {64, 64}, {33, 90}};
  for (size_t i = 0; i < sizes.size(); ++i)
    twins::data::write_image((dir / "images" / ("img" + std::to_string(i) + ".png")).string(),
                             at::randint(0, 256, {sizes[i].first, sizes[i].second, 3}, at::kByte));
  twins::EmbedderOptions eo;
  eo.batch_size = 4;
  const twins::Embedder embedder((dir / "backbone.safetensors").string(), eo);
  const auto dataset = twins::data::open_images((dir / "images").string());
  REQUIRE(dataset->size() == static_cast<int64_t>(sizes.size()));
  std::vector<std::string> files;
  for (int64_t i = 0; i < dataset->size(); ++i) files.push_back(dataset->id(i));
  const at::Tensor from_files = embedder.embed_files(files);
  twins::EmbedDatasetOptions dataset_options;
  dataset_options.workers = 2;
  const at::Tensor from_dataset = embedder.embed_dataset(dataset, dataset_options);
  ExtractOptions xo;
  xo.batch_size = 4, xo.progress = false;
  twins::augment::Normalization n;
  n.mean = info.mean, n.std = info.std;
  const Features probe_path = extract_features(*net, dataset, eval_view(*dataset, 32, n), at::kCPU, xo);
  INFO("files vs dataset ", (from_files - from_dataset).abs().max().item<double>());
  CHECK(at::allclose(from_files, from_dataset, 1e-5, 1e-5));
  CHECK(at::allclose(from_files, probe_path.features, 1e-5, 1e-5));
  // Handed over batch by batch (nothing kept), from image 4 (a stopped run continuing): the same
  // rows; with the stop flag raised, one batch and no more; a start inside a batch is refused.
  std::vector<at::Tensor> rows;
  std::vector<int64_t> firsts;
  twins::EmbedDatasetOptions streamed;
  streamed.workers = 1, streamed.first = 4;
  streamed.sink = [&](int64_t at, const at::Tensor& f) { firsts.push_back(at), rows.push_back(f.clone()); };
  CHECK(embedder.embed_dataset(dataset, streamed).size(0) == 0);
  CHECK(firsts == std::vector<int64_t>{4});
  REQUIRE(rows.size() == 1);
  CHECK(at::equal(rows[0], from_dataset.slice(0, 4)));
  std::atomic<bool> stop{true};
  streamed.first = 0, streamed.stop = &stop;
  firsts.clear();
  embedder.embed_dataset(dataset, streamed);
  CHECK(firsts == std::vector<int64_t>{0});
  streamed.first = 6;  // all done: no batch
  firsts.clear();
  CHECK(embedder.embed_dataset(dataset, streamed).size(0) == 0);
  CHECK(firsts.empty());
  streamed.first = 3;
  check_throws_with<std::invalid_argument>([&] { embedder.embed_dataset(dataset, streamed); },
                                           "cannot start at sample 3 of 6 (a multiple of the batch size 4)");
  // The 32 x 40 image was resized like the others (not only cropped because it is "already 32").
  const at::Tensor first = twins::data::read_image(files[0]);
  const at::Tensor cropped = first.slice(1, 4, 36).permute({2, 0, 1}).unsqueeze(0).contiguous();
  CHECK_FALSE(at::allclose(from_files[0], embedder.embed(cropped)[0], 1e-3, 1e-3));
  fs::remove_all(dir);
}

TEST_CASE("eval: pictures are written") {
  const fs::path dir = temp_dir("plots");
  std::ofstream(dir / "metrics.jsonl")
      << R"({"step":1,"epoch":0,"lr":0.1,"loss":3.0,"invariance":1.0,"images_per_s":10})"
      << "\n"
      << R"({"step":2,"epoch":0,"lr":0.2,"loss":2.0,"invariance":0.5,"images_per_s":12})"
      << "\n"
      << R"({"epoch":0,"step":2,"epoch_seconds":1.0,"online_probe_train_top1":40.0})"
      << "\n"
      << "{\"truncated";
  write_training_curves((dir / "metrics.jsonl").string(), (dir / "curves.svg").string());
  std::ifstream svg(dir / "curves.svg");
  std::string text((std::istreambuf_iterator<char>(svg)), std::istreambuf_iterator<char>());
  CHECK(text.find("<svg") == 0);
  CHECK(text.find("invariance") != std::string::npos);
  const Features f = blobs(200, 4, 5);
  write_projection(f.features, f.labels, (dir / "pca.svg").string(), "test");
  CHECK(fs::file_size(dir / "pca.svg") > 1000);
  check_throws_with<std::runtime_error>(
      [&] { write_training_curves((dir / "none.jsonl").string(), (dir / "x.svg").string()); }, "cannot open");
  fs::remove_all(dir);
}

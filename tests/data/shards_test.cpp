// Tar shards: brace patterns, the writer and the index, the streaming dataset through the loader
// (every sample once per epoch across ranks and workers, exact resume, pipe: sources), and bad
// shards (truncated, unlabeled members, undecodable images, failing and dead commands).
#include <ATen/ATen.h>
#include <doctest/doctest.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <numeric>
#include <set>

#include "tests/test_util.h"
#include "twins/augment/pipeline.h"
#include "twins/data/dataset.h"
#include "twins/data/image_io.h"
#include "twins/data/loader.h"
#include "twins/data/shards.h"

namespace fs = std::filesystem;
using nlohmann::json;
using namespace twins::data;
using twins::test::check_throws_with;

TEST_CASE("shards: an index with counts that are not int64 integers is an error naming the key") {
  const json shard = {{"url", "s-00.tar"}, {"samples", 3}, {"bytes", 7168}};
  auto index = [&](const json& changed_shard, const json& samples) {
    return json{{"format", "twins-shard-index/1"},
                {"label", "cls"},
                {"num_classes", 10},
                {"samples", samples},
                {"shards", {shard, changed_shard}}};
  };
  CHECK(ShardIndex::from_json(index(shard, 6), "i.json").samples == 6);
  json huge = shard;
  huge["bytes"] = json::parse("9" + std::string(92, '9'));  // a float (1e93) in JSON's eyes
  check_throws_with<std::runtime_error>([&] { ShardIndex::from_json(index(huge, 6), "i.json"); },
                                        "i.json: \"bytes\" is not an integer in int64's range");
  json beyond = shard;
  beyond["samples"] = uint64_t{1} << 63;
  check_throws_with<std::runtime_error>([&] { ShardIndex::from_json(index(beyond, 3), "i.json"); }, "\"samples\"");
  json fraction = shard;
  fraction["samples"] = 2.5;
  check_throws_with<std::runtime_error>([&] { ShardIndex::from_json(index(fraction, 5.5), "i.json"); }, "\"samples\"");
  json overflow = shard;
  overflow["samples"] = INT64_MAX;
  check_throws_with<std::runtime_error>([&] { ShardIndex::from_json(index(overflow, 3), "i.json"); }, "overflow");
}

TEST_CASE("shards: brace patterns and sizes") {
  CHECK(expand_urls({"a-{008..011}.tar"}) ==
        std::vector<std::string>{"a-008.tar", "a-009.tar", "a-010.tar", "a-011.tar"});
  CHECK(expand_urls({"{train,val}-{0..1}.tar", "x.tar"}) ==
        std::vector<std::string>{"train-0.tar", "train-1.tar", "val-0.tar", "val-1.tar", "x.tar"});
  CHECK(expand_urls({"pipe:cat s-{1..2}.tar"}) == std::vector<std::string>{"pipe:cat s-1.tar", "pipe:cat s-2.tar"});
  check_throws_with<std::invalid_argument>([] { expand_urls({"a-{5..2}.tar"}); }, "runs backwards");
  check_throws_with<std::invalid_argument>([] { expand_urls({"a-{1..2.tar"}); }, "without a closing");
  check_throws_with<std::invalid_argument>([] { expand_urls({"a-{0..99999999}.tar"}); }, "10 million");
  // A product of groups is counted before any name is made (the fuzzer's: 15 million names of
  // ~170 bytes filled memory); so is the names' size, and groups do not nest.
  check_throws_with<std::invalid_argument>(
      [] { expand_urls({"s-{000..012}-{a,c}-{000..012}-{a,b}-{0..712}-{a,b}-{a,b}-{a,b}-{a,b}-{a,b}.tar"}); },
      "10 million");
  check_throws_with<std::invalid_argument>([] { expand_urls({std::string(200, 'x') + "-{0000000..1999999}.tar"}); },
                                           "MiB of names");
  check_throws_with<std::invalid_argument>([] { expand_urls({"a-{0,{1,2}}.tar"}); }, "braces do not nest");
  CHECK(expand_urls({"a-{}.tar", "b-{x}-{9..10}"}) == std::vector<std::string>{"a-.tar", "b-x-9", "b-x-10"});
  CHECK(parse_byte_size("1GB", "s") == 1000000000);
  CHECK(parse_byte_size("64KiB", "s") == 65536);
  CHECK(parse_byte_size("1.5MB", "s") == 1500000);
  CHECK(parse_byte_size("4096", "s") == 4096);
  check_throws_with<std::invalid_argument>([] { parse_byte_size("12 parsecs", "--max-size"); }, "--max-size");
  check_throws_with<std::invalid_argument>([] { parse_byte_size("-1GB", "--max-size"); }, "--max-size");
}

#ifdef TWINS_HAVE_LIBARCHIVE
namespace {

// n 12x12 RGB PNG files in `classes` class folders; pixel values encode the sample.
fs::path make_folder(const fs::path& dir, int n, int classes) {
  for (int i = 0; i < n; ++i) {
    const fs::path folder = dir / "images" / ("class" + std::to_string(i % classes));
    fs::create_directories(folder);
    at::Tensor img = at::full({12, 12, 3}, i, at::kByte);
    img[0][0][0] = static_cast<uint8_t>(i * 7 % 256);
    img[5][3][1] = static_cast<uint8_t>(255 - i);
    write_image((folder / ("img" + std::to_string(i) + ".png")).string(), img);
  }
  return dir / "images";
}

CreatedShards make_shards(const fs::path& dir, int n, int classes, int64_t per_shard, bool shuffle) {
  const auto folder = create_dataset({{"type", "image_folder"}, {"root", make_folder(dir, n, classes).string()}});
  CreateShardsOptions o;
  o.pattern = (dir / "shards" / "train-%04d.tar").string();
  o.max_count = per_shard;
  o.shuffle = shuffle;
  return create_shards(*folder, o);
}

const std::vector<twins::augment::View>& identity_views() {
  static const auto v = twins::augment::parse_views(json::parse(R"([[{"type": "center_crop", "size": 12}]])"));
  return v;
}

struct Epoch {
  std::vector<int64_t> indices, labels;
  std::vector<at::Tensor> batches;  // views[0] of each batch
};

Epoch read_epoch(const std::shared_ptr<Dataset>& d, LoaderOptions o, int64_t epoch, int64_t first = 0) {
  Loader loader(d, identity_views(), o);
  loader.start_epoch(epoch, first);
  Epoch e;
  while (auto b = loader.next()) {
    for (int64_t j = 0; j < b->indices.size(0); ++j) {
      e.indices.push_back(b->indices[j].item<int64_t>());
      e.labels.push_back(b->labels[j].item<int64_t>());
    }
    e.batches.push_back(b->views[0]);
  }
  return e;
}

void run(const std::string& command) { REQUIRE(std::system(command.c_str()) == 0); }

}  // namespace

TEST_CASE("shards: folder -> shards -> the same samples and labels, by file and through pipe:") {
  const auto dir = twins::test::fresh_dir("shards", "roundtrip");
  const CreatedShards made = make_shards(dir, 23, 3, 5, false);
  CHECK(made.files.size() == 5);  // 5 + 5 + 5 + 5 + 3
  CHECK(made.index.samples == 23);
  CHECK(made.index.num_classes == 3);
  CHECK(made.index.shards.back().samples == 3);
  CHECK(fs::exists(made.index_path));
  CHECK(made.urls == (dir / "shards" / "train-{0000..0004}.tar").string());

  const auto folder = create_dataset({{"type", "image_folder"}, {"root", (dir / "images").string()}});
  LoaderOptions o;
  o.batch_size = 4, o.workers = 2, o.shuffle = false, o.drop_last = false;
  for (const json& spec : {json{{"type", "shards"}, {"urls", made.urls}, {"index", made.index_path}},
                           json{{"type", "shards"}, {"urls", "pipe:cat " + made.urls}}}) {
    CAPTURE(spec.dump());
    const auto d = create_dataset(spec);
    CHECK(d->streaming());
    CHECK(d->size() == 23);
    CHECK(d->num_classes() == 3);
    const Epoch e = read_epoch(d, o, 0);
    REQUIRE(e.indices.size() == 23);
    for (size_t k = 0; k < e.indices.size(); ++k) {
      const int64_t i = e.indices[k];
      CHECK(i == static_cast<int64_t>(k));  // written in order, read in order
      CHECK(e.labels[k] == folder->label(i));
      const at::Tensor want = folder->image(i).permute({2, 0, 1});
      CHECK(at::equal(e.batches[k / 4][static_cast<int64_t>(k % 4)], want));
    }
  }
  // Shuffled at creation: the same multiset of (image, label).
  const auto dir2 = twins::test::fresh_dir("shards", "roundtrip_shuffled");
  const CreatedShards mixed = make_shards(dir2, 23, 3, 5, true);
  const auto d = create_dataset({{"type", "shards"}, {"urls", mixed.urls}, {"index", mixed.index_path}});
  const Epoch e = read_epoch(d, o, 0);
  std::multiset<std::pair<int64_t, int64_t>> got, want;
  for (size_t k = 0; k < e.indices.size(); ++k)
    got.insert({e.labels[k], e.batches[k / 4][static_cast<int64_t>(k % 4)][0][0][0].item<int64_t>()});
  for (int64_t i = 0; i < 23; ++i) want.insert({folder->label(i), folder->image(i)[0][0][0].item<int64_t>()});
  CHECK(got == want);
  // Gzipped shards read the same.
  run("gzip -k " + made.files[0]);
  const auto gz = create_dataset({{"type", "shards"}, {"urls", made.files[0] + ".gz"}});
  const Epoch g = read_epoch(gz, o, 0);
  REQUIRE(g.indices.size() == 5);
  for (int64_t i = 0; i < 5; ++i) {
    CHECK(g.labels[static_cast<size_t>(i)] == folder->label(i));
    CHECK(at::equal(g.batches[static_cast<size_t>(i / 4)][i % 4], folder->image(i).permute({2, 0, 1})));
  }
  fs::remove_all(dir);
  fs::remove_all(dir2);
}

TEST_CASE(
    "shards: 2 ranks x 2 workers read every sample once per epoch, in an order that depends on neither workers nor timing") {
  const auto dir = twins::test::fresh_dir("shards", "split");
  const CreatedShards made = make_shards(dir, 40, 4, 5, true);  // 8 shards of 5
  const json spec = {{"type", "shards"},
                     {"urls", made.urls},
                     {"index", made.index_path},
                     {"shuffle_buffer", 7},
                     {"shards_in_flight", 3}};
  const auto d = create_dataset(spec);
  for (int64_t epoch : {0, 1}) {
    std::vector<int64_t> all;
    std::vector<std::vector<int64_t>> per_rank;
    for (int64_t rank : {0, 1}) {
      LoaderOptions o;
      o.batch_size = 3, o.workers = 2, o.rank = rank, o.world_size = 2, o.drop_last = false, o.seed = 5;
      const Epoch e = read_epoch(d, o, epoch);
      CHECK(e.indices.size() == 20);
      Loader planner(d, identity_views(), o);
      CHECK(planner.epoch_indices(epoch) == e.indices);  // the plan is what is read
      o.workers = 0;
      CHECK(read_epoch(d, o, epoch).indices == e.indices);
      o.workers = 3;
      CHECK(read_epoch(d, o, epoch).indices == e.indices);
      all.insert(all.end(), e.indices.begin(), e.indices.end());
      per_rank.push_back(e.indices);
    }
    std::sort(all.begin(), all.end());
    std::vector<int64_t> every(40);
    std::iota(every.begin(), every.end(), int64_t{0});
    CHECK(all == every);
    // Shuffled: not the shards' order, and another order in another epoch.
    std::vector<int64_t> sorted0 = per_rank[0];
    std::sort(sorted0.begin(), sorted0.end());
    CHECK(sorted0 != per_rank[0]);
  }
  LoaderOptions o;
  o.world_size = 2, o.seed = 5, o.batch_size = 4;
  Loader l(d, identity_views(), o);
  CHECK(l.epoch_indices(0) != l.epoch_indices(1));
  // More ranks than shards: a clear error.
  o.world_size = 9, o.rank = 0;
  check_throws_with<std::runtime_error>([&] { Loader(d, identity_views(), o).epoch_indices(0); },
                                        "8 shard(s) for 9 ranks");
  // Uneven: 3 ranks over 8 shards of 5 (15 or 10 samples each) still take ceil(40 / 3) = 14.
  o.world_size = 3, o.drop_last = false, o.batch_size = 4;
  for (int64_t rank : {0, 1, 2}) {
    o.rank = rank;
    CHECK(read_epoch(d, o, 0).indices.size() == 14);
  }
  fs::remove_all(dir);
}

TEST_CASE("shards: a resumed epoch gives the batches of a run never stopped") {
  const auto dir = twins::test::fresh_dir("shards", "resume");
  const CreatedShards made = make_shards(dir, 30, 3, 4, true);
  const auto d =
      create_dataset({{"type", "shards"}, {"urls", made.urls}, {"index", made.index_path}, {"shuffle_buffer", 10}});
  const auto views = twins::augment::parse_views(json::parse(R"([[{"type": "random_resized_crop", "size": 8}]])"));
  for (int workers : {0, 2}) {
    LoaderOptions o;
    o.batch_size = 4, o.workers = workers, o.seed = 3;
    auto batches = [&](int64_t first) {
      Loader loader(d, views, o);
      loader.start_epoch(2, first);
      std::vector<at::Tensor> out;
      while (auto b = loader.next()) out.push_back(b->views[0]);
      return out;
    };
    const auto whole = batches(0);
    const auto resumed = batches(3);
    REQUIRE(whole.size() == 7);
    REQUIRE(resumed.size() == 4);
    for (size_t k = 0; k < resumed.size(); ++k) CHECK(at::equal(resumed[k], whole[k + 3]));
  }
  // An index that no longer matches its shards is refused.
  std::ofstream(made.files[1], std::ios::app) << "more";
  check_throws_with<std::runtime_error>(
      [&] {
        create_dataset({{"type", "shards"}, {"urls", made.urls}, {"index", made.index_path}});
      },
      "rebuild it");
  fs::remove_all(dir);
}

TEST_CASE("shards: bad shards are errors naming the shard and member, or counted skips") {
  const auto dir = twins::test::fresh_dir("shards", "bad");
  const CreatedShards made = make_shards(dir, 12, 2, 6, false);
  const std::string good = made.files[0];
  LoaderOptions o;
  o.batch_size = 6, o.workers = 2, o.shuffle = false, o.drop_last = false;

  // A truncated tar: the index cannot be built, and a stream of it loses the rest of the shard.
  const std::string cut = (dir / "cut.tar").string();
  run("head -c 4000 " + good + " > " + cut);
  IndexOptions io;
  check_throws_with<std::runtime_error>([&] { build_shard_index({cut}, io); }, cut + ": corrupt or truncated tar");
  ShardIndex index = build_shard_index({good}, io);
  index.shards[0].url = "pipe:head -c 4000 " + good;
  index.shards[0].bytes = -1;
  write_shard_index((dir / "cut-index.json").string(), index);
  const json cut_spec = {
      {"type", "shards"}, {"urls", index.shards[0].url}, {"index", (dir / "cut-index.json").string()}};
  check_throws_with<std::runtime_error>([&] { read_epoch(create_dataset(cut_spec), o, 0); },
                                        "corrupt or truncated tar");
  {
    json skip = cut_spec;
    skip["on_bad_sample"] = "skip";
    const auto d = create_dataset(skip);
    Loader loader(d, identity_views(), o);
    loader.start_epoch(0);
    int64_t n = 0;
    while (auto b = loader.next()) n += b->indices.size(0);
    CHECK(n == 6);
    CHECK(loader.skipped() == 5);  // 4000 bytes hold 1 of the 6 samples (2 KiB each)
  }

  // Hand-made tars: a member without a label, an undecodable image, a JSON label.
  const fs::path raw = dir / "raw";
  fs::create_directories(raw);
  fs::copy_file(dir / "images" / "class0" / "img0.png", raw / "000.png");
  fs::copy_file(dir / "images" / "class1" / "img1.png", raw / "001.png");
  fs::copy_file(dir / "images" / "class0" / "img2.png", raw / "002.png");
  std::ofstream(raw / "000.cls") << "1";
  std::ofstream(raw / "002.cls") << "0";
  std::ofstream(raw / "000.json") << R"({"label": 4})";
  std::ofstream(raw / "001.json") << R"({"label": 2})";
  std::ofstream(raw / "002.json") << R"({"label": 0})";
  std::ofstream(raw / "bad.png") << "not a png at all";
  std::ofstream(raw / "bad.cls") << "0";
  const std::string unlabeled = (dir / "unlabeled.tar").string(), broken = (dir / "broken.tar").string(),
                    with_json = (dir / "json.tar").string();
  run("cd " + raw.string() + " && tar cf " + unlabeled + " 000.png 000.cls 001.png 002.png 002.cls");
  run("cd " + raw.string() + " && tar cf " + broken + " 000.png 000.cls bad.png bad.cls 002.png 002.cls");
  run("cd " + raw.string() + " && tar cf " + with_json + " 000.png 000.json 001.png 001.json 002.png 002.json");
  check_throws_with<std::runtime_error>([&] { build_shard_index({unlabeled}, io); },
                                        unlabeled + "#002: some samples have a label (cls) and others not");
  {
    const auto d = create_dataset({{"type", "shards"}, {"urls", broken}});
    check_throws_with<std::runtime_error>([&] { read_epoch(d, o, 0); }, broken + "#bad.png");
    json skip = {{"type", "shards"}, {"urls", broken}, {"on_bad_sample", "skip"}};
    const auto s = create_dataset(skip);
    Loader loader(s, identity_views(), o);
    loader.start_epoch(0);
    const auto b = loader.next();
    REQUIRE(b);
    CHECK(loader.skipped() == 1);
    CHECK(b->labels[1].item<int64_t>() == b->labels[0].item<int64_t>());  // replaced by its neighbour
  }
  {
    const auto d = create_dataset({{"type", "shards"}, {"urls", with_json}, {"label", "json:label"}});
    CHECK(d->num_classes() == 5);
    CHECK(read_epoch(d, o, 0).labels == std::vector<int64_t>{4, 2, 0});
    check_throws_with<std::invalid_argument>(
        [&] {
          create_dataset({{"type", "shards"}, {"urls", with_json}, {"label", "json"}});
        },
        "data.label");
  }

  // Commands that fail or hang.
  check_throws_with<std::runtime_error>([&] { build_shard_index({"pipe:exit 3"}, io); }, "exited with status 3");
  io.read_timeout = 0.5;
  const auto start = std::chrono::steady_clock::now();
  check_throws_with<std::runtime_error>([&] { build_shard_index({"pipe:sleep 30"}, io); },
                                        "pipe:sleep 30: no data for");
  CHECK(std::chrono::steady_clock::now() - start < std::chrono::seconds(10));
  ShardIndex dead = build_shard_index({good}, io);
  dead.shards[0].url = "pipe:sleep 30";
  dead.shards[0].bytes = -1;
  write_shard_index((dir / "dead-index.json").string(), dead);
  check_throws_with<std::runtime_error>(
      [&] {
        read_epoch(create_dataset({{"type", "shards"},
                                   {"urls", "pipe:sleep 30"},
                                   {"index", (dir / "dead-index.json").string()},
                                   {"read_timeout", 0.5}}),
                   o, 0);
      },
      "no data for");
  CHECK(std::chrono::steady_clock::now() - start < std::chrono::seconds(20));
  // Missing keys and files are named.
  check_throws_with<std::invalid_argument>([] { create_dataset({{"type", "shards"}}); }, "data.urls");
  check_throws_with<std::runtime_error>(
      [&] {
        create_dataset({{"type", "shards"}, {"urls", (dir / "none-{0..1}.tar").string()}});
      },
      "none-0.tar: cannot open");
  fs::remove_all(dir);
}
#endif  // TWINS_HAVE_LIBARCHIVE

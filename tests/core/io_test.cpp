// Output that is whole or absent, the run-folder lock, and JSON/config input that cannot crash.
#include <fcntl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <filesystem>
#include <fstream>

#include "tests/test_util.h"
#include "twins/config.h"
#include "twins/io.h"
#include "twins/train/recipe.h"

using twins::test::check_throws_with;
namespace fs = std::filesystem;

namespace {

fs::path fresh_dir(const std::string& name) { return twins::test::fresh_dir("io", name); }

std::string read(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

}  // namespace

TEST_CASE("io: atomic writes replace whole files and leave no temporary") {
  const fs::path dir = fresh_dir("atomic");
  const std::string f = (dir / "a.txt").string();
  twins::io::write_file_atomic(f, "first");
  twins::io::write_file_atomic(f, {"sec", "ond"});
  CHECK(read(f) == "second");
  for (const auto& e : fs::directory_iterator(dir)) CHECK(e.path().filename() == "a.txt");
  check_throws_with<std::runtime_error>([&] { twins::io::write_file_atomic((dir / "no/such/dir/x").string(), "x"); },
                                        "cannot write");
  // Temporaries of interrupted writes (any pid) are found and removed; other files stay.
  std::ofstream(dir / "b.safetensors.tmp-12345") << "half";
  std::ofstream(dir / "notes.tmp") << "keep";
  CHECK(twins::io::remove_stale_temporaries(dir.string()) == 1);
  CHECK(fs::exists(dir / "notes.tmp"));
  fs::remove_all(dir);
}

TEST_CASE("io: a file-size limit fails the write with a message, never a signal or a half file") {
  // In a child process: RLIMIT_FSIZE with SIGXFSZ ignored (as the twins command does).
  const fs::path dir = fresh_dir("efbig");
  const std::string f = (dir / "big.bin").string();
  twins::io::write_file_atomic(f, "old contents");
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    std::signal(SIGXFSZ, SIG_IGN);
    rlimit limit{4096, 4096};
    ::setrlimit(RLIMIT_FSIZE, &limit);
    try {
      twins::io::write_file_atomic(f, std::string(1 << 20, 'x'));
      ::_exit(10);  // wrote past the limit?
    } catch (const std::runtime_error& e) {
      const std::string what = e.what();
      ::_exit(what.find("size limit") != std::string::npos && what.find("big.bin") != std::string::npos ? 0 : 11);
    }
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
  CHECK(read(f) == "old contents");
  int files = 0;
  for (const auto& e : fs::directory_iterator(dir)) files += e.is_regular_file();
  CHECK(files == 1);  // no temporary left behind
  fs::remove_all(dir);
}

TEST_CASE("io: appends are checked, and a folder lock excludes a second holder") {
  const fs::path dir = fresh_dir("lock");
  {
    twins::io::AppendFile log((dir / "m.jsonl").string());
    log.append("1\n");
    log.append("2\n");
    log.sync();
  }
  CHECK(read(dir / "m.jsonl") == "1\n2\n");
  {
    twins::io::FolderLock first(dir.string());
    check_throws_with<std::runtime_error>([&] { twins::io::FolderLock second(dir.string()); },
                                          "in use by another twins process (pid " + std::to_string(::getpid()) + ")");
  }
  CHECK_NOTHROW(twins::io::FolderLock again(dir.string()));  // released with its holder
  // A path that cannot become a folder is found before any work is done.
  std::ofstream(dir / "file") << "x";
  check_throws_with<std::runtime_error>([&] { twins::io::check_writable((dir / "file/sub").string()); },
                                        "cannot create");
  fs::remove_all(dir);
}

TEST_CASE("io: a file lock is taken once, and a row file continues where its state says") {
  using Opened = twins::io::RowFile::Opened;
  const fs::path dir = fresh_dir("rows");
  const std::string lock_path = (dir / "x.lock").string();
  {
    twins::io::FileLock first(lock_path);
    CHECK(first.held());
    twins::io::FileLock second(lock_path);
    CHECK_FALSE(second.held());
    // Its holder may remove it while holding it: the next one locks a new file.
    fs::remove(lock_path);
    twins::io::FileLock third(lock_path);
    CHECK(third.held());
  }
  const std::string path = (dir / "rows.bin").string();
  const auto rows = [](int first, int count) {  // row i: four times the letter 'a' + i
    std::string s;
    for (int i = first; i < first + count; ++i) s += std::string(4, static_cast<char>('a' + i));
    return s;
  };
  {
    twins::io::RowFile f(path, "HDR", 4, "k1", 10, 3);
    CHECK(f.opened() == Opened::fresh);
    f.append(rows(0, 5), 5);
    f.save();
    f.append(rows(5, 2), 2);  // not saved: the state says 5
    check_throws_with<std::invalid_argument>([&] { f.append("abc", 1); }, "3 bytes for 1 rows of 4");
  }
  CHECK(read(dir / "rows.bin") == "HDR" + rows(0, 7));
  {
    twins::io::RowFile f(path, "HDR", 4, "k1", 10, 3);  // 5 saved, continued at 3 (a multiple of 3)
    CHECK(f.opened() == Opened::continued);
    CHECK(f.rows() == 3);
    CHECK(read(dir / "rows.bin") == "HDR" + rows(0, 3));  // cut back
    std::string back(8, '\0');
    f.read(1, 2, back.data());
    CHECK(back == rows(1, 2));
    f.append(rows(3, 7), 7);
    f.save();
  }
  {
    twins::io::RowFile f(path, "HDR", 4, "k1", 10, 3);  // all 10 kept, though not a multiple of 3
    CHECK(f.rows() == 10);
  }
  {
    twins::io::RowFile f(path, "HDR", 4, "k2", 10, 3);  // another key
    CHECK(f.opened() == Opened::started_over);
    CHECK(f.rows() == 0);
    CHECK(read(dir / "rows.bin") == "HDR");
    f.append(rows(0, 2), 2);
    f.save();
  }
  // A state that claims more rows than the file holds, or is not one, starts over.
  std::ofstream(path + ".json") << R"({"key": "k2", "rows_done": 5})";
  CHECK(twins::io::RowFile(path, "HDR", 4, "k2", 10, 1).opened() == Opened::started_over);
  std::ofstream(path + ".json") << R"({"key": "k2", "rows_do)";
  CHECK(twins::io::RowFile(path, "HDR", 4, "k2", 10, 1).opened() == Opened::started_over);
  // Read only: the saved rows, or an error that leaves the files as they are.
  {
    twins::io::RowFile f(path, "HDR", 4, "k3", 10, 1);
    f.append(rows(0, 4), 4);
    f.save();
    f.append(rows(4, 1), 1);  // not saved
  }
  {
    const twins::io::RowFile saved = twins::io::RowFile::saved(path, 3, 4, "k3");
    CHECK(saved.rows() == 4);
    std::string back(8, '\0');
    saved.read(2, 2, back.data());
    CHECK(back == rows(2, 2));
  }
  const std::string state_before = read(dir / "rows.bin.json");
  twins::io::RowFile saved = twins::io::RowFile::saved(path, 3, 4, "k3");
  check_throws_with<std::logic_error>([&] { saved.append(rows(0, 1), 1); }, "opened for reading only");
  check_throws_with<std::logic_error>([&] { saved.save(); }, "opened for reading only");
  CHECK(read(dir / "rows.bin.json") == state_before);
  check_throws_with<std::runtime_error>([&] { twins::io::RowFile::saved((dir / "none").string(), 3, 4, "k3"); },
                                        "none.json: cannot open");
  check_throws_with<std::runtime_error>([&] { twins::io::RowFile::saved(path, 3, 4, "k4"); },
                                        "rows.bin.json: not the state of these rows");
  check_throws_with<std::runtime_error>([&] { twins::io::RowFile::saved(path, 3, 8, "k3"); },
                                        "rows.bin: holds fewer rows than its state claims (4)");
  CHECK(read(dir / "rows.bin") == "HDR" + rows(0, 5));
  // Row files of the stem a process holds stay; the others go, by any of their three names; other
  // names that begin with the stem stay.
  const auto touch = [&](const std::string& name) { std::ofstream(dir / name) << "x"; };
  for (const char* name : {"out.rank0-of-2.partial", "out.rank0-of-2.partial.json", "out.rank1-of-2.partial.lock",
                           "out.rank2-of-4.partial", "out.rank2-of-4.partial.json", "out.partial", "other.partial",
                           "out.ranking.npy.partial", "out.npy.partial", "out.rank1-of-2.partial.bak"})
    touch(name);
  {
    twins::io::FileLock held((dir / "out.rank2-of-4.partial.lock").string());
    REQUIRE(held.held());
    CHECK(twins::io::remove_unheld_rows(dir.string(), "out") == 3);
  }
  for (const char* gone : {"out.rank0-of-2.partial", "out.rank0-of-2.partial.json", "out.rank0-of-2.partial.lock",
                           "out.rank1-of-2.partial.lock", "out.partial"})
    CHECK_FALSE(fs::exists(dir / gone));
  for (const char* kept : {"out.rank2-of-4.partial", "out.rank2-of-4.partial.json", "other.partial",
                           "out.ranking.npy.partial", "out.npy.partial", "out.rank1-of-2.partial.bak"})
    CHECK(fs::exists(dir / kept));
  CHECK(twins::io::remove_unheld_rows((dir / "absent").string(), "out") == 0);
  touch("o.json");  // shorter than the stem once its suffix is off
  CHECK(twins::io::remove_unheld_rows(dir.string(), "o.js") == 0);
  fs::remove_all(dir);
}

TEST_CASE("config: deep nesting, non-integers and out-of-range numbers are clear errors") {
  const std::string deep = std::string(100000, '[') + std::string(100000, ']');
  check_throws_with<std::invalid_argument>([&] { twins::config::parse_json(deep, "deep.json"); },
                                           "deep.json: JSON nested deeper than 64 levels");
  CHECK(twins::config::parse_json("{\"a\": \"[[[[[[[[\", \"b\": [1, [2]]} // [[[[", "ok", true)["b"][1][0] == 2);
  nlohmann::json j = {{"train", {{"batch_size", 2.5}}}};
  twins::config::ConfigReader r(j["train"], "train");
  int64_t batch = 0;
  check_throws_with<std::invalid_argument>([&] { r.get("batch_size", batch); },
                                           "train.batch_size: expected an integer, got 2.5");
  nlohmann::json k = {{"epochs", 1e30}, {"workers", -1}, {"seed", -3}, {"whole", 256.0}, {"layers", {1, 2.5}}};
  twins::config::ConfigReader q(k, "train");
  int epochs = 0, workers = 0;
  uint64_t seed = 0;
  int64_t whole = 0;
  std::vector<int64_t> layers;
  check_throws_with<std::invalid_argument>([&] { q.get("epochs", epochs); }, "train.epochs: 1e+30 is out of range");
  check_throws_with<std::invalid_argument>([&] { q.get("seed", seed); }, "train.seed: -3 is out of range");
  check_throws_with<std::invalid_argument>([&] { q.get("layers", layers); },
                                           "train.layers: expected an integer, got [1,2.5]");
  q.get("workers", workers);
  q.get("whole", whole);
  CHECK(workers == -1);  // in int's range: the component's own validation judges it
  CHECK(whole == 256);
}

#pragma once
// Helpers shared by the test files.
#include <ATen/ATen.h>
#include <doctest/doctest.h>
#include <nlohmann/json.hpp>

#include <unistd.h>

#include <exception>
#include <filesystem>
#include <fstream>
#include <functional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "twins/distributed/communicator.h"

namespace twins::test {

/// Whether this twins has Gloo, the CPU collectives that cases with several ranks on the CPU
/// need; says that the case is skipped when not. A LibTorch without Gloo's headers (a PyTorch
/// wheel may be one) builds a twins without it, which runs one process per job on the CPU.
inline bool have_gloo() {
  for (const auto& b : twins::distributed::collective_backends())
    if (b == "gloo") return true;
  MESSAGE("skipped: this twins was built without Gloo (CPU collectives)");
  return false;
}

inline std::string reference_path(const std::string& name) {
  return std::string(TWINS_TEST_REFERENCE_DIR) + "/" + name;
}

/// An empty folder under the system's temporary directory, unique to this process, `group` and
/// `name` (emptied first if a previous run left it).
inline std::filesystem::path fresh_dir(const std::string& group, const std::string& name) {
  const std::filesystem::path p =
      std::filesystem::temp_directory_path() / ("twins_" + group + "_" + std::to_string(::getpid()) + "_" + name);
  std::filesystem::remove_all(p);
  std::filesystem::create_directories(p);
  return p;
}

inline nlohmann::json read_json(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot open " + path);
  return nlohmann::json::parse(in);
}

/// A [rows, cols] double tensor from a JSON list of lists.
inline at::Tensor tensor_from_json(const nlohmann::json& rows) {
  std::vector<double> flat;
  const int64_t n = static_cast<int64_t>(rows.size());
  int64_t d = 0;
  for (const auto& row : rows) {
    d = static_cast<int64_t>(row.size());
    for (const auto& v : row) flat.push_back(v.get<double>());
  }
  return at::tensor(flat, at::kDouble).view({n, d});
}

/// Largest |a - b| / max(|b|, floor).
inline double max_rel_error(const at::Tensor& a, const at::Tensor& b, double floor = 1e-12) {
  const at::Tensor ad = a.to(at::kDouble), bd = b.to(at::kDouble);
  return ((ad - bd).abs() / bd.abs().clamp_min(floor)).max().item<double>();
}

/// Runs f(0) ... f(n - 1), each on a thread of its own (the ranks of an in-process job, see
/// Communicator::create_local_group); rethrows the first failure once every thread has ended.
inline void on_threads(int n, const std::function<void(int)>& f) {
  std::vector<std::exception_ptr> errors(static_cast<size_t>(n));
  std::vector<std::thread> threads;
  for (int r = 0; r < n; ++r)
    threads.emplace_back([&, r] {
      try {
        f(r);
      } catch (...) {
        errors[static_cast<size_t>(r)] = std::current_exception();
      }
    });
  for (auto& t : threads) t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

/// Runs `f`, and checks it throws `E` with `fragment` in its message.
template <class E, class F>
void check_throws_with(F&& f, const std::string& fragment) {
  try {
    f();
  } catch (const E& e) {
    const std::string what = e.what();
    INFO("message: ", what);
    CHECK(what.find(fragment) != std::string::npos);
    return;
  }
  FAIL("expected an exception mentioning: ", fragment);
}

}  // namespace twins::test

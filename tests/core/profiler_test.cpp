// The operator profiler: calls counted, self time nested as torch.profiler computes it, the
// autograd engine's calls recorded, a Chrome trace that parses, one recording at a time.
#include "twins/profiler.h"

#include <ATen/ATen.h>
#include <torch/autograd.h>

#include <chrono>
#include <doctest/doctest.h>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>

namespace {

const twins::profiler::OpTotals* find(const twins::profiler::Profile& p, const std::string& name) {
  for (const auto& op : p.ops)
    if (op.name == name) return &op;
  return nullptr;
}

}  // namespace

TEST_CASE("profiler: calls, self time and the autograd engine's calls") {
  const at::Tensor a = at::randn({64, 64}).requires_grad_(true);
  const at::Tensor b = at::randn({64, 64});
  twins::profiler::Recorder recorder(/*cuda=*/false);
  at::Tensor y;
  for (int i = 0; i < 3; ++i) y = at::mm(a, b);
  at::Tensor loss = at::relu(y).sum();
  loss.backward();
  const auto p = recorder.stop();

  const auto* mm = find(p, "aten::mm");
  REQUIRE(mm);
  CHECK(mm->calls == 4);  // three forward, one for a's gradient (b needs none)
  CHECK(mm->self_ms > 0);
  CHECK(mm->self_ms <= mm->total_ms + 1e-9);
  // relu runs inside nothing else; sum's backward runs inside the engine's SumBackward0 node.
  const auto* relu = find(p, "aten::relu");
  REQUIRE(relu);
  CHECK(relu->calls == 1);
  REQUIRE(find(p, "MmBackward0"));
  // A node's self time excludes the operators it called: its total is at least their sum.
  const auto* node = find(p, "MmBackward0");
  CHECK(node->total_ms >= node->self_ms);
  // Every call is counted once, self times sum to no more than the span times the threads.
  int64_t calls = 0;
  double self = 0;
  for (const auto& op : p.ops) calls += op.calls, self += op.self_ms;
  CHECK(calls == p.calls);
  CHECK(p.wall_ms > 0);
  CHECK(self > 0);
  // Sorted by self time, largest first.
  for (size_t i = 1; i < p.ops.size(); ++i) CHECK(p.ops[i - 1].self_ms >= p.ops[i].self_ms);

  const auto trace = nlohmann::json::parse(p.chrome_trace);
  REQUIRE(trace.at("traceEvents").is_array());
  CHECK(static_cast<int64_t>(trace["traceEvents"].size()) == p.calls);
  const auto& e = trace["traceEvents"][0];
  CHECK(e.at("ph") == "X");
  CHECK(e.at("ts").get<double>() >= 0);
  CHECK(e.at("dur").get<double>() >= 0);

  const std::string table = twins::profiler::format_table(p, 3);
  CHECK(table.find("self %") != std::string::npos);
  CHECK(table.find(p.ops[0].name.substr(0, 20)) != std::string::npos);
  CHECK(table.find("span") != std::string::npos);
}

TEST_CASE("profiler: self time is a call's time less its children's") {
  // One call of known length inside another: the outer's self time is its own sleep only.
  twins::profiler::Recorder recorder(false);
  {
    RECORD_FUNCTION("outer", std::vector<c10::IValue>());
    std::this_thread::sleep_for(std::chrono::milliseconds(30));
    {
      RECORD_FUNCTION("inner", std::vector<c10::IValue>());
      std::this_thread::sleep_for(std::chrono::milliseconds(60));
    }
  }
  const auto p = recorder.stop();
  const auto *outer = find(p, "outer"), *inner = find(p, "inner");
  REQUIRE(outer);
  REQUIRE(inner);
  CHECK(outer->total_ms >= 90);
  CHECK(inner->total_ms >= 60);
  CHECK(outer->self_ms == doctest::Approx(outer->total_ms - inner->total_ms).epsilon(1e-9));
  CHECK(outer->self_ms >= 30);
  CHECK(outer->self_ms < inner->self_ms);
  CHECK(p.ops[0].name == "inner");
}

TEST_CASE("profiler: one recording at a time, none after stop") {
  twins::profiler::Recorder first(false);
  CHECK_THROWS_AS(twins::profiler::Recorder(false), std::logic_error);
  (void)first.stop();
  CHECK_THROWS_AS((void)first.stop(), std::logic_error);
  // After stop, operators are no longer recorded and a new recording may start.
  twins::profiler::Recorder second(false);
  (void)at::ones({2}).sum();
  const auto p = second.stop();
  CHECK(find(p, "aten::sum"));
  CHECK(find(p, "aten::mm") == nullptr);
}

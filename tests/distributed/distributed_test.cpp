// Data parallelism proven against one process: W ranks (threads of this process, each with its
// own Gloo group over loopback) with B samples each must give the loss, gradients and updated
// parameters of one process over the W x B samples.
#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <functional>
#include <mutex>
#include <set>
#include <thread>

#include "core/compat.h"
#include "distributed/heartbeat_watch.h"
#include "tests/test_util.h"
#include "train/ssl_model.h"
#include "twins/distributed/communicator.h"
#include "twins/distributed/data_parallel.h"
#include "twins/losses.h"
#include "twins/models/network.h"
#include "twins/models/safetensors.h"
#include "twins/models/weights.h"
#include "twins/train/recipe.h"
#include "twins/train/trainer.h"

using namespace twins;
using nlohmann::json;
using twins::test::check_throws_with;

namespace {

// Runs f(rank) on every rank's thread; rethrows the first failure.
void on_ranks(const std::vector<std::shared_ptr<distributed::Communicator>>& comms, const std::function<void(int)>& f) {
  twins::test::on_threads(static_cast<int>(comms.size()), f);
}

// Sets (or with nullptr, unsets) environment variables for the scope.
struct Env {
  std::vector<std::string> names;
  Env(std::initializer_list<std::pair<const char*, const char*>> vars) {
    for (const char* n :
         {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
          "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NODELIST", "SLURM_STEP_ID", "SLURM_LOCALID", "SLURM_JOB_NODELIST",
          "SLURM_JOB_ID", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
          "OMPI_COMM_WORLD_LOCAL_SIZE", "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_RESTART_COUNT"})
      ::unsetenv(n), names.push_back(n);
    for (const auto& [k, v] : vars) ::setenv(k, v, 1);
  }
  ~Env() {
    for (const auto& n : names) ::unsetenv(n.c_str());
  }
};

// ||a - b|| / ||b|| over lists of tensors taken together.
double relative_error(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (a[i].to(at::kDouble) - b[i].to(at::kDouble)).pow(2).sum().item<double>();
    den += b[i].to(at::kDouble).pow(2).sum().item<double>();
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

json small_recipe(const std::string& method, bool reference_compatible = false) {
  json r = {{"method", method},
            {"data", {{"type", "mnist"}, {"root", "/nonexistent"}}},
            {"views", json::parse(R"([[{"type": "normalize", "mean": [0.5], "std": [0.25]}],
                                      [{"type": "normalize", "mean": [0.5], "std": [0.25]}]])")},
            {"model",
             {{"backbone",
               {{"type", "resnet"}, {"layers", {1, 1, 1, 1}}, {"width", 4}, {"in_channels", 1}, {"cifar_stem", true}}},
              {"projector", {{"type", "mlp"}, {"spec", "32-16"}}}}},
            {"loss", {{"type", method}}},
            {"optimizer", {{"type", "lars"}, {"base_lr", 0.5}, {"weight_decay", 1e-4}, {"eta", 0.02}}},
            {"train", {{"batch_size", 4}, {"device", "cpu"}, {"sync_batchnorm", true}}}};
  if (method == "byol") r["model"]["predictor"] = {{"type", "mlp"}, {"spec", "32-16"}};
  if (method == "barlow_twins") r["loss"]["reference_compatible"] = reference_compatible;
  return r;
}

struct StepResult {
  double loss = 0;
  std::vector<at::Tensor> grads;
  std::vector<std::pair<std::string, at::Tensor>> state;  // every parameter and buffer after the step
};

std::unique_ptr<train::detail::SSLModel> make_model(const train::Recipe& recipe, at::ScalarType dtype) {
  at::manual_seed(11);
  auto m = std::make_unique<train::detail::SSLModel>(recipe, 0);
  m->to(dtype);
  m->train(true);
  return m;
}

// forward, backward, (gradient averaging), LARS step, BYOL's EMA.
StepResult step(train::detail::SSLModel& model, const train::Recipe& recipe, const std::vector<at::Tensor>& views,
                distributed::GradientReducer* reducer) {
  auto optimizer = train::detail::make_optimizer(recipe.optimizer, model, 0.4, 0.4);
  auto out = model.forward(views);
  optimizer->zero_grad();
  out.loss.total.backward();
  if (reducer) reducer->finish();
  StepResult r;
  r.loss = out.loss.total.item<double>();
  for (const auto& p : model.online_parameters())
    r.grads.push_back(p.grad().defined() ? p.grad().clone() : at::zeros_like(p));
  optimizer->step();
  if (model.target_backbone) model.ema_update(0.9);
  for (const auto& [name, t] : model.state()) r.state.emplace_back(name, t.clone());
  return r;
}

struct Comparison {
  double loss_error = 0, grad_error = 0, state_error = 0;
};

// One step at world size `world` with `per_rank` samples each, against one process.
Comparison compare_with_one_process(const json& config, int world, int64_t per_rank, at::ScalarType dtype) {
  const train::Recipe recipe = train::Recipe::parse(config);
  at::manual_seed(5);
  const at::Tensor a = at::randn({world * per_rank, 1, 12, 12}, dtype),
                   b = at::randn({world * per_rank, 1, 12, 12}, dtype);

  auto single = make_model(recipe, dtype);
  const StepResult expected = step(*single, recipe, {a, b}, nullptr);

  auto comms = distributed::Communicator::create_local_group(world);
  std::vector<std::unique_ptr<train::detail::SSLModel>> models;
  for (int r = 0; r < world; ++r) models.push_back(make_model(recipe, dtype));
  std::vector<StepResult> got(static_cast<size_t>(world));
  on_ranks(comms, [&](int r) {
    auto& m = *models[static_cast<size_t>(r)];
    m.distribute(comms[static_cast<size_t>(r)], recipe.train.sync_batchnorm);
    distributed::GradientReducer reducer(m.online_parameters(), comms[static_cast<size_t>(r)]);
    got[static_cast<size_t>(r)] =
        step(m, recipe, {a.narrow(0, r * per_rank, per_rank), b.narrow(0, r * per_rank, per_rank)}, &reducer);
  });
  Comparison c;
  double mean_loss = 0;
  for (const auto& g : got) mean_loss += g.loss / world;
  c.loss_error = std::abs(mean_loss - expected.loss) / std::abs(expected.loss);
  std::vector<at::Tensor> want_state;
  for (const auto& [name, t] : expected.state)
    if (t.is_floating_point()) want_state.push_back(t);
  for (const auto& g : got) {
    REQUIRE(g.state.size() == expected.state.size());
    std::vector<at::Tensor> state;
    for (size_t i = 0; i < g.state.size(); ++i) {
      CHECK(g.state[i].first == expected.state[i].first);
      if (g.state[i].second.is_floating_point())
        state.push_back(g.state[i].second);
      else
        CHECK(at::equal(g.state[i].second, expected.state[i].second));  // num_batches_tracked
    }
    c.grad_error = std::max(c.grad_error, relative_error(g.grads, expected.grads));
    c.state_error = std::max(c.state_error, relative_error(state, want_state));
  }
  return c;
}

}  // namespace

TEST_CASE("dist: launcher environments (torchrun, SLURM, OpenMPI)") {
  {
    Env e({});
    CHECK(distributed::detect_environment().launcher == "none");
    CHECK(distributed::detect_environment().world_size == 1);
  }
  {
    Env e(
        {{"RANK", "3"}, {"WORLD_SIZE", "8"}, {"LOCAL_RANK", "1"}, {"MASTER_ADDR", "node7"}, {"MASTER_PORT", "29400"}});
    const auto env = distributed::detect_environment();
    CHECK(env.launcher == "torchrun");
    CHECK(env.rank == 3);
    CHECK(env.world_size == 8);
    CHECK(env.local_rank == 1);
    CHECK(env.master_addr == "node7");
    CHECK(env.master_port == 29400);
    CHECK(!env.agent_store);  // twins' own launcher: rank 0 serves the store
  }
  {
    // torchrun's elastic agent serves the store itself, and restarts the job as a new attempt.
    Env e({{"RANK", "0"},
           {"WORLD_SIZE", "2"},
           {"MASTER_ADDR", "127.0.0.1"},
           {"MASTER_PORT", "29500"},
           {"TORCHELASTIC_USE_AGENT_STORE", "True"},
           {"TORCHELASTIC_RESTART_COUNT", "3"}});
    const auto env = distributed::detect_environment();
    CHECK(env.agent_store);
    CHECK(env.restart_count == 3);
  }
  {
    Env e({{"SLURM_PROCID", "5"},
           {"SLURM_NTASKS", "32"},  // the allocation's; the step's below
           {"SLURM_STEP_NUM_TASKS", "16"},
           {"SLURM_LOCALID", "5"},
           {"SLURM_JOB_NODELIST", "gpu[03-04,09]"},
           {"SLURM_JOB_ID", "123456"}});
    const auto env = distributed::detect_environment();
    CHECK(env.launcher == "slurm");
    CHECK(env.rank == 5);
    CHECK(env.world_size == 16);
    CHECK(env.local_rank == 5);
    CHECK(env.master_addr == "gpu03");
    CHECK(env.master_port == 10000 + 123456 % 20000);
  }
  {
    // A step on some of the job's nodes, beside others: rank 0 on the step's first node, the
    // port the step's own.
    Env e({{"SLURM_PROCID", "1"},
           {"SLURM_STEP_NUM_TASKS", "2"},
           {"SLURM_JOB_NODELIST", "gpu[03-09]"},
           {"SLURM_STEP_NODELIST", "gpu[05-06]"},
           {"SLURM_STEP_ID", "2"},
           {"SLURM_JOB_ID", "123456"}});
    const auto env = distributed::detect_environment();
    CHECK(env.master_addr == "gpu05");
    CHECK(env.master_port == 10000 + (123456 + 1009 * 2) % 20000);
  }
  {
    // A batch script (sbatch) or salloc's shell: SLURM_PROCID 0 and the allocation's tasks, but no
    // srun step: one process, which may launch its own ranks; as is an srun step of one task.
    Env e({{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "8"}, {"SLURM_JOB_ID", "7"}, {"SLURM_JOB_NODELIST", "gpu1"}});
    CHECK(distributed::detect_environment().launcher == "none");
    CHECK(distributed::detect_environment().world_size == 1);
  }
  {
    Env e({{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "8"}, {"SLURM_STEP_NUM_TASKS", "1"}});
    CHECK(distributed::detect_environment().launcher == "none");
  }
  {
    Env e({{"OMPI_COMM_WORLD_RANK", "1"}, {"OMPI_COMM_WORLD_SIZE", "2"}, {"OMPI_COMM_WORLD_LOCAL_RANK", "1"}});
    const auto env = distributed::detect_environment();
    CHECK(env.launcher == "openmpi");
    CHECK(env.rank == 1);
    CHECK(env.master_addr == "127.0.0.1");
  }
  CHECK(distributed::first_slurm_host("a1,b2") == "a1");
  CHECK(distributed::first_slurm_host("node[7-9]") == "node7");
  CHECK(distributed::first_slurm_host("solo") == "solo");
  {
    Env e({{"RANK", "4"}, {"WORLD_SIZE", "4"}});
    check_throws_with<std::invalid_argument>([] { distributed::detect_environment(); },
                                             "rank 4 is not below the world size 4");
  }
  {
    Env e({{"RANK", "x"}, {"WORLD_SIZE", "2"}});
    check_throws_with<std::invalid_argument>([] { distributed::detect_environment(); }, "RANK=\"x\"");
  }
  {
    Env e({{"OMPI_COMM_WORLD_RANK", "0"}, {"OMPI_COMM_WORLD_SIZE", "8"}, {"OMPI_COMM_WORLD_LOCAL_SIZE", "4"}});
    check_throws_with<std::invalid_argument>([] { distributed::detect_environment(); }, "MASTER_ADDR");
  }
}

TEST_CASE("dist: collectives over 3 ranks") {
  if (!twins::test::have_gloo()) return;  // several ranks on the CPU
  auto comms = distributed::Communicator::create_local_group(3);
  std::vector<at::Tensor> sums(3), gathered(3), broadcast(3);
  std::vector<std::vector<int64_t>> numbers(3);
  on_ranks(comms, [&](int r) {
    auto& c = *comms[static_cast<size_t>(r)];
    CHECK(c.rank() == r);
    at::Tensor s = at::full({4}, r + 1.0);
    c.all_reduce(s);
    sums[static_cast<size_t>(r)] = s;
    gathered[static_cast<size_t>(r)] = c.all_gather(at::full({2, 2}, double(r)));
    at::Tensor b = at::full({3}, r == 2 ? 7.0 : -1.0);
    c.broadcast(b, 2);
    broadcast[static_cast<size_t>(r)] = b;
    numbers[static_cast<size_t>(r)] = c.gather({r, int64_t{1} << 40, -r});
    c.barrier();
  });
  for (int r = 0; r < 3; ++r) {
    CHECK(at::equal(sums[static_cast<size_t>(r)], at::full({4}, 6.0)));
    CHECK(gathered[static_cast<size_t>(r)].sizes() == at::IntArrayRef{6, 2});
    CHECK(gathered[static_cast<size_t>(r)][5][1].item<double>() == 2.0);
    CHECK(at::equal(broadcast[static_cast<size_t>(r)], at::full({3}, 7.0)));
    CHECK(numbers[static_cast<size_t>(r)] ==
          std::vector<int64_t>{0, int64_t{1} << 40, 0, 1, int64_t{1} << 40, -1, 2, int64_t{1} << 40, -2});
  }
}

TEST_CASE("dist: SyncBatchNorm equals BatchNorm over the union batch, forward and backward") {
  if (!twins::test::have_gloo()) return;  // several ranks on the CPU
  // Each rank's batch size, and whether the batches are images [N, C, 5, 5] or vectors [N, C]:
  // uneven sizes (the counts weigh the ranks' statistics), a rank with one value per channel (it
  // checks the total), a rank with none (its mean, NaN, weighs nothing).
  struct Layout {
    std::vector<int64_t> sizes;
    bool images;
  };
  for (const Layout& layout : {Layout{{3, 3}, true}, Layout{{3, 3, 3}, true}, Layout{{5, 1}, true},
                               Layout{{5, 1}, false}, Layout{{4, 0}, true}}) {
    const std::vector<int64_t>& sizes = layout.sizes;
    const int world = static_cast<int>(sizes.size());
    CAPTURE(world);
    CAPTURE(sizes.back());
    CAPTURE(layout.images);
    at::manual_seed(3);
    const int64_t channels = 4;
    std::vector<int64_t> first(sizes.size(), 0);
    for (size_t r = 1; r < sizes.size(); ++r) first[r] = first[r - 1] + sizes[r - 1];
    const int64_t rows = first.back() + sizes.back();
    const at::Tensor x =
        (layout.images ? at::randn({rows, channels, 5, 5}, at::kDouble) : at::randn({rows, channels}, at::kDouble)) *
            3 +
        1;
    const at::Tensor upstream = at::randn_like(x);
    const at::Tensor w0 = at::rand({channels}, at::kDouble) + 0.5, b0 = at::randn({channels}, at::kDouble);
    // One process.
    at::Tensor xs = x.clone().requires_grad_(true), ws = w0.clone().requires_grad_(true),
               bs = b0.clone().requires_grad_(true);
    at::Tensor rm = at::zeros({channels}, at::kDouble), rv = at::ones({channels}, at::kDouble);
    const at::Tensor ys = at::batch_norm(xs, ws, bs, rm, rv, true, 0.1, 1e-5, false);
    (ys * upstream).sum().backward();
    // W ranks.
    auto comms = distributed::Communicator::create_local_group(world);
    std::vector<at::Tensor> ys_r(world), gx_r(world), gw_r(world), gb_r(world), rm_r(world), rv_r(world);
    on_ranks(comms, [&](int r) {
      const int64_t from = first[static_cast<size_t>(r)], rows = sizes[static_cast<size_t>(r)];
      at::Tensor xr = x.narrow(0, from, rows).clone().requires_grad_(true);
      at::Tensor wr = w0.clone().requires_grad_(true), br = b0.clone().requires_grad_(true);
      rm_r[r] = at::zeros({channels}, at::kDouble), rv_r[r] = at::ones({channels}, at::kDouble);
      const at::Tensor y =
          distributed::sync_batch_norm(xr, wr, br, rm_r[r], rv_r[r], 0.1, 1e-5, comms[static_cast<size_t>(r)]);
      (y * upstream.narrow(0, from, rows)).sum().backward();
      ys_r[r] = y.detach(), gx_r[r] = xr.grad(), gw_r[r] = wr.grad(), gb_r[r] = br.grad();
    });
    CHECK(twins::test::max_rel_error(at::cat(ys_r), ys.detach(), 1e-6) < 1e-12);
    CHECK(twins::test::max_rel_error(at::cat(gx_r), xs.grad(), 1e-6) < 1e-10);
    // Affine gradients are per-rank sums; data parallelism's averaging x W gives the total.
    CHECK(twins::test::max_rel_error(at::stack(gw_r).sum(0), ws.grad()) < 1e-10);
    CHECK(twins::test::max_rel_error(at::stack(gb_r).sum(0), bs.grad()) < 1e-10);
    for (int r = 0; r < world; ++r) {
      CHECK(twins::test::max_rel_error(rm_r[r], rm, 1e-6) < 1e-12);
      CHECK(twins::test::max_rel_error(rv_r[r], rv) < 1e-12);
    }
  }
  // One value per channel over all ranks: every rank refuses it, as BatchNorm does.
  auto comms = distributed::Communicator::create_local_group(2);
  std::vector<std::string> errors(2);
  on_ranks(comms, [&](int r) {
    const at::Tensor x = at::randn({r == 0 ? 1 : 0, 3}, at::kDouble);
    try {
      distributed::sync_batch_norm(x, at::ones({3}, at::kDouble), at::zeros({3}, at::kDouble), at::Tensor(),
                                   at::Tensor(), 0.1, 1e-5, comms[static_cast<size_t>(r)]);
    } catch (const std::exception& e) {
      errors[static_cast<size_t>(r)] = e.what();
    }
  });
  for (const std::string& e : errors)
    CHECK(e.find("needs more than one value per channel over all ranks, got 1") != std::string::npos);
}

TEST_CASE("dist: gradient buckets cover every parameter exactly once, and finish() averages") {
  if (!twins::test::have_gloo()) return;  // several ranks on the CPU
  auto net = models::create_backbone(json{{"type", "resnet18"}, {"width", 8}});
  std::vector<at::Tensor> params = net->parameters();
  params[3].set_requires_grad(false);  // frozen: in no bucket
  auto comms = distributed::Communicator::create_local_group(2);
  std::vector<std::vector<std::vector<size_t>>> buckets(2);
  std::vector<std::vector<at::Tensor>> grads(2);
  on_ranks(comms, [&](int r) {
    std::vector<at::Tensor> mine;
    for (const auto& p : params) mine.push_back(p.detach().clone().requires_grad_(p.requires_grad()));
    distributed::GradientReducerOptions o;
    o.bucket_mb = 0.05;  // many buckets
    distributed::GradientReducer reducer(mine, comms[static_cast<size_t>(r)], o);
    buckets[r] = reducer.buckets();
    // Every parameter but one used: the unused one still gets the average of what ranks hold (0).
    at::Tensor loss = at::zeros({}, at::kFloat);
    for (size_t i = 0; i + 1 < mine.size(); ++i)
      if (mine[i].requires_grad()) loss = loss + mine[i].sum() * double(r + 1) * double(i + 1);
    loss.backward();
    reducer.finish();
    for (const auto& p : mine) grads[r].push_back(p.grad().defined() ? p.grad().clone() : at::Tensor());
  });
  std::multiset<size_t> seen;
  for (const auto& b : buckets[0])
    for (size_t i : b) seen.insert(i);
  CHECK(buckets[0].size() > 3);
  CHECK(buckets[0] == buckets[1]);
  CHECK(seen.size() == params.size() - 1);
  for (size_t i = 0; i < params.size(); ++i) CHECK(seen.count(i) == (i == 3 ? 0u : 1u));
  for (size_t i = 0; i < params.size(); ++i) {
    CAPTURE(i);
    if (i == 3) continue;
    const double expected = i + 1 == params.size() ? 0.0 : 1.5 * double(i + 1);  // mean of 1x and 2x
    CHECK(at::allclose(grads[0][i], at::full_like(params[i], expected)));
    CHECK(at::equal(grads[0][i], grads[1][i]));
  }
}

TEST_CASE("dist: gradient accumulation reduces the summed gradients once") {
  if (!twins::test::have_gloo()) return;  // several ranks on the CPU
  auto comms = distributed::Communicator::create_local_group(2);
  std::vector<at::Tensor> grads(2);
  on_ranks(comms, [&](int r) {
    at::Tensor p = at::zeros({3}).requires_grad_(true);
    distributed::GradientReducer reducer({p}, comms[static_cast<size_t>(r)]);
    reducer.set_sync(false);
    (p * double(r + 1)).sum().backward();
    reducer.finish();  // no-op while not synchronising
    reducer.set_sync(true);
    (p * double(2 * (r + 1))).sum().backward();
    reducer.finish();
    grads[r] = p.grad().clone();
  });
  CHECK(at::allclose(grads[0], at::full({3}, 4.5)));  // mean over ranks of 3 (r + 1)
  CHECK(at::equal(grads[0], grads[1]));
}

TEST_CASE("dist: one data-parallel step equals one process over the union batch") {
  if (!twins::test::have_gloo()) return;  // several ranks on the CPU
  for (const std::string method : {"vicreg", "barlow_twins", "byol"}) {
    CAPTURE(method);
    const json config = small_recipe(method);
    const auto f64 = compare_with_one_process(config, 2, 4, at::kDouble);
    MESSAGE(method, " fp64 W=2: loss ", f64.loss_error, ", gradients ", f64.grad_error, ", state ", f64.state_error);
    CHECK(f64.loss_error < 1e-12);
    CHECK(f64.grad_error < 1e-10);
    CHECK(f64.state_error < 1e-12);
    const auto f32 = compare_with_one_process(config, 3, 4, at::kFloat);
    MESSAGE(method, " fp32 W=3: loss ", f32.loss_error, ", gradients ", f32.grad_error, ", state ", f32.state_error);
    CHECK(f32.loss_error < 1e-5);
    CHECK(f32.grad_error < 1e-5);
    CHECK(f32.state_error < 1e-5);
  }
}

TEST_CASE("dist: Barlow Twins' reference_compatible gradients are 1/W of the exact ones") {
  if (!twins::test::have_gloo()) return;  // several ranks on the CPU
  const int world = 2;
  const train::Recipe exact = train::Recipe::parse(small_recipe("barlow_twins", false));
  const train::Recipe official = train::Recipe::parse(small_recipe("barlow_twins", true));
  at::manual_seed(8);
  const at::Tensor a = at::randn({world * 4, 1, 12, 12}, at::kDouble),
                   b = at::randn({world * 4, 1, 12, 12}, at::kDouble);
  auto comms = distributed::Communicator::create_local_group(world);
  std::vector<std::vector<at::Tensor>> g_exact(world), g_official(world);
  // Built here, not in the ranks' threads: the seed's generator is shared.
  std::vector<std::unique_ptr<train::detail::SSLModel>> m_exact, m_official;
  for (int r = 0; r < world; ++r)
    m_exact.push_back(make_model(exact, at::kDouble)), m_official.push_back(make_model(official, at::kDouble));
  on_ranks(comms, [&](int r) {
    for (const auto* recipe : {&exact, &official}) {
      auto& m = recipe == &exact ? *m_exact[r] : *m_official[r];
      m.distribute(comms[static_cast<size_t>(r)], true);
      distributed::GradientReducer reducer(m.online_parameters(), comms[static_cast<size_t>(r)]);
      const auto out = step(m, *recipe, {a.narrow(0, r * 4, 4), b.narrow(0, r * 4, 4)}, &reducer);
      (recipe == &exact ? g_exact : g_official)[r] = out.grads;
    }
  });
  std::vector<at::Tensor> scaled;
  for (const auto& g : g_official[0]) scaled.push_back(g * world);
  CHECK(relative_error(scaled, g_exact[0]) < 1e-10);
}

TEST_CASE("dist: losses without a communicator, or with one rank, are the local losses") {
  if (!twins::test::have_gloo()) return;  // a Gloo group of one rank
  at::manual_seed(2);
  const at::Tensor za = at::randn({6, 5}, at::kDouble), zb = at::randn({6, 5}, at::kDouble);
  auto comms = distributed::Communicator::create_local_group(1);
  losses::VICRegOptions vo;
  vo.communicator = comms[0];
  CHECK(losses::vicreg_loss(za, zb, vo).total.item<double>() ==
        doctest::Approx(losses::vicreg_loss(za, zb).total.item<double>()));
  losses::BarlowTwinsOptions bo;
  bo.communicator = comms[0];
  CHECK(losses::barlow_twins_loss(za, zb, bo).total.item<double>() ==
        doctest::Approx(losses::barlow_twins_loss(za, zb).total.item<double>()));
}

TEST_CASE("dist: train.grad_cache over ranks equals one process over the union batch") {
  if (!twins::test::have_gloo()) return;  // several ranks on the CPU
  // Per-sample networks (a ViT, heads without BatchNorm), 2 ranks x 2 accumulated batches of 4
  // with the cache against one process over the 16 samples: the batch statistics of VICReg and
  // Barlow Twins span every rank's every batch.
  const int world = 2;
  at::manual_seed(3);
  std::vector<data::Batch> parts(4);
  for (auto& p : parts) {
    for (int v = 0; v < 2; ++v) p.views.push_back(at::randint(0, 256, {4, 1, 12, 12}, at::kByte));
    p.labels = at::zeros({4}, at::kLong);
  }
  data::Batch whole;
  for (int v = 0; v < 2; ++v)
    whole.views.push_back(at::cat({parts[0].views[v], parts[1].views[v], parts[2].views[v], parts[3].views[v]}));
  whole.labels = at::zeros({16}, at::kLong);
  const std::string file =
      (std::filesystem::temp_directory_path() / ("twins_grad_cache_" + std::to_string(::getpid()) + ".safetensors"))
          .string();
  for (const std::string method : {"vicreg", "barlow_twins"}) {
    CAPTURE(method);
    json cfg = small_recipe(method);
    cfg["model"]["backbone"] = {{"type", "vit"}, {"image_size", 12}, {"patch_size", 4}, {"in_channels", 1},
                                {"depth", 1},    {"hidden", 16},     {"heads", 2},      {"mlp", 32}};
    cfg["model"]["projector"] = {{"type", "mlp"}, {"spec", "32-16"}, {"batch_norm", false}};
    cfg["train"]["batch_size"] = 16;
    train::TrainerOptions o;
    o.steps_per_epoch = 2, o.total_steps = 2;
    at::manual_seed(0);
    train::Trainer single(train::Recipe::parse(cfg), o);
    models::save_safetensors(file, single.state());
    const json info = single.state_info();
    std::vector<double> expected_losses;
    for (int i = 0; i < 2; ++i) expected_losses.push_back(single.step(whole).loss);
    const models::NamedTensors expected = single.state();

    cfg["train"]["batch_size"] = 4, cfg["train"]["grad_accumulation"] = 2, cfg["train"]["grad_cache"] = true;
    const train::Recipe recipe = train::Recipe::parse(cfg);
    auto comms = distributed::Communicator::create_local_group(world);
    std::vector<models::NamedTensors> got(world);
    std::vector<std::vector<double>> losses(world);
    on_ranks(comms, [&](int r) {
      train::TrainerOptions ro = o;
      ro.communicator = comms[static_cast<size_t>(r)];
      train::Trainer trainer(recipe, ro);
      trainer.load_state(models::load_safetensors(file), info);
      const std::vector<data::Batch> mine{parts[2 * r], parts[2 * r + 1]};
      for (int i = 0; i < 2; ++i) losses[r].push_back(trainer.step(mine).loss);
      got[r] = trainer.state();
    });
    for (int i = 0; i < 2; ++i) {
      CHECK(losses[0][i] == doctest::Approx(expected_losses[i]).epsilon(1e-5));
      CHECK(losses[1][i] == losses[0][i]);
    }
    std::vector<at::Tensor> a, b;
    for (size_t k = 0; k < expected.size(); ++k)
      if (expected[k].first.find("optimizer_state") == std::string::npos) {
        REQUIRE(got[0][k].first == expected[k].first);
        a.push_back(got[0][k].second), b.push_back(expected[k].second);
        CHECK(at::equal(got[0][k].second, got[1][k].second));
      }
    const double error = relative_error(a, b);
    MESSAGE(method, " W=2 x 2 cached batches against one process: weights off by ", error);
    CHECK(error < 1e-5);
  }
  std::filesystem::remove(file);
}

TEST_CASE("dist: the online probe's counts in a checkpoint are the job's, and resumed ranks count them once") {
  if (!twins::test::have_gloo()) return;  // several ranks on the CPU
  const int world = 2;
  at::manual_seed(5);
  std::vector<data::Batch> shares(world);
  for (auto& b : shares) {
    for (int v = 0; v < 2; ++v) b.views.push_back(at::randint(0, 256, {4, 1, 12, 12}, at::kByte));
    b.labels = at::randint(0, 3, {4}, at::kLong);
  }
  const train::Recipe recipe = train::Recipe::parse(small_recipe("vicreg"));
  train::TrainerOptions o;
  o.steps_per_epoch = 4, o.total_steps = 4, o.num_classes = 3;
  auto comms = distributed::Communicator::create_local_group(world);
  const std::string file =
      (std::filesystem::temp_directory_path() / ("twins_probe_counts_" + std::to_string(::getpid()) + ".safetensors"))
          .string();
  std::vector<train::Trainer::ProbeCounts> before(world), after(world);
  std::vector<json> infos(world);
  on_ranks(comms, [&](int r) {
    train::TrainerOptions ro = o;
    ro.communicator = comms[static_cast<size_t>(r)];
    train::Trainer trainer(recipe, ro);
    REQUIRE(trainer.probing());
    for (int i = 0; i < 2; ++i) trainer.step({shares[static_cast<size_t>(r)]});
    before[static_cast<size_t>(r)] = trainer.probe_counts();  // the job's, as pretrain checkpoints them
    json info = trainer.state_info();
    info["probe_correct"] = before[static_cast<size_t>(r)].correct,
    info["probe_seen"] = before[static_cast<size_t>(r)].seen;
    infos[static_cast<size_t>(r)] = info;
    if (r == 0) models::save_safetensors(file, trainer.state());
  });
  CHECK(before[0].seen == 16);  // 2 steps x 2 ranks x 4 labelled samples
  CHECK(before[1].seen == before[0].seen);
  // Resumed on 2 ranks from rank 0's info: the sum over ranks is the saved one, not twice it.
  on_ranks(comms, [&](int r) {
    train::TrainerOptions ro = o;
    ro.communicator = comms[static_cast<size_t>(r)];
    train::Trainer trainer(recipe, ro);
    trainer.load_state(models::load_safetensors(file), infos[0]);
    after[static_cast<size_t>(r)] = trainer.end_probe_epoch();
  });
  CHECK(after[0].seen == before[0].seen);
  CHECK(after[0].correct == before[0].correct);
  std::filesystem::remove(file);
}

TEST_CASE("dist: model.backbone_init read by rank 0 reaches every rank, and its failure stops every rank at once") {
  if (!twins::test::have_gloo()) return;  // several ranks on the CPU
  const int world = 2;
  json cfg = small_recipe("vicreg");
  const train::Recipe recipe = train::Recipe::parse(cfg);
  at::manual_seed(42);
  auto source = models::create_backbone(recipe.backbone);
  const std::string file =
      (std::filesystem::temp_directory_path() / ("twins_init_" + std::to_string(::getpid()) + ".safetensors")).string();
  models::save_backbone(file, *source, models::BackboneInfo{});
  const models::NamedTensors expected = models::backbone_state(*source);
  for (const std::string& path : {file, file + ".absent"}) {
    CAPTURE(path);
    auto comms = distributed::Communicator::create_local_group(world);
    std::vector<std::string> errors(world);
    std::vector<models::NamedTensors> got(world);
    std::vector<std::thread> threads;
    for (int r = 0; r < world; ++r)
      threads.emplace_back([&, r] {
        try {
          train::TrainerOptions o;
          o.communicator = comms[static_cast<size_t>(r)];
          o.backbone_init = path;
          train::Trainer trainer(recipe, o);
          for (const auto& [name, t] : models::backbone_state(trainer.backbone())) got[r].emplace_back(name, t.clone());
        } catch (const std::exception& e) {
          errors[r] = e.what();
        }
      });
    for (auto& t : threads) t.join();
    if (path == file) {
      for (int r = 0; r < world; ++r) {
        CHECK(errors[r].empty());
        REQUIRE(got[r].size() == expected.size());
        for (size_t k = 0; k < expected.size(); ++k) CHECK(at::equal(got[r][k].second, expected[k].second));
      }
    } else {
      CHECK(errors[0].find("model.backbone_init: " + path) != std::string::npos);
      CHECK(errors[1].find("rank 1: rank 0 could not start from model.backbone_init") != std::string::npos);
    }
  }
  std::filesystem::remove(file);
}

TEST_CASE("dist: a failed collective names, from the heartbeats, the ranks that stopped or lag behind") {
  if (!twins::test::have_gloo()) return;  // several ranks on the CPU
  auto all_reduce_error = [](distributed::Communicator& comm) {
    try {
      at::Tensor t = at::ones({4});
      comm.all_reduce(t);
    } catch (const std::exception& e) {
      return std::string(e.what());
    }
    return std::string("all_reduce did not fail");
  };
  distributed::CommunicatorOptions o;
  o.timeout_s = 1, o.heartbeat_s = 0.2;
  // Rank 2 lags: it is alive (beating) at step 4 while ranks 0 and 1 wait in step 5's collective.
  {
    auto comms = distributed::Communicator::create_local_group(3, o);
    for (int r = 0; r < 3; ++r) comms[static_cast<size_t>(r)]->note_progress(r == 2 ? 4 : 5);
    std::vector<std::string> errors(2);
    std::vector<std::thread> waiting;
    for (int r = 0; r < 2; ++r)
      waiting.emplace_back([&, r] {
        try {
          at::Tensor t = at::ones({4});
          comms[static_cast<size_t>(r)]->all_reduce(t);
        } catch (const std::exception& e) {
          errors[static_cast<size_t>(r)] = e.what();
        }
      });
    for (auto& t : waiting) t.join();
    // Each tells its own analysis, or (its timeout more than 2.5 beats after the other's, on a
    // loaded machine) repeats the other's.
    for (int r = 0; r < 2; ++r) {
      const std::string& error = errors[static_cast<size_t>(r)];
      const std::string other = "rank " + std::to_string(1 - r) + "'s";
      CAPTURE(error);
      const bool own =
          error.find("rank " + std::to_string(r) + " of 3: all_reduce failed") == 0 &&
          error.find(
              "heartbeats: rank 2 at step 4 alive but behind this rank's step 5: stuck before this collective") !=
              std::string::npos;
      const bool repeated =
          error.find("rank " + std::to_string(r) + " of 3: stopping: " + other +
                     " all_reduce failed (its own output says how); heartbeats: rank 2 at step 4 alive but behind " +
                     other + " step 5: stuck before " + other + " all_reduce") == 0;
      CHECK((own || repeated));
    }
  }
  // The same hang, but rank 1 reaches the collective only after rank 0 failed in it (and left,
  // posting "rank 0 failed with an error" as a failing rank does): rank 1 repeats rank 0's analysis.
  // (Beats every 0.5 s: rank 0's analysis needs ranks 1 and 2 both to beat within 2.5 of them.)
  {
    distributed::CommunicatorOptions slower = o;
    slower.heartbeat_s = 0.5;
    auto comms = distributed::Communicator::create_local_group(3, slower);
    for (int r = 0; r < 3; ++r) comms[static_cast<size_t>(r)]->note_progress(r == 2 ? 4 : 5);
    std::string first;
    try {
      auto failing = std::move(comms[0]);
      first = all_reduce_error(*failing);
      throw std::runtime_error(first);
    } catch (const std::runtime_error&) {
    }
    CAPTURE(first);
    CHECK(first.find("rank 0 of 3: all_reduce failed") == 0);
    const std::string later = all_reduce_error(*comms[1]);
    CAPTURE(later);
    CHECK(later.find("rank 1 of 3: stopping: rank 0's all_reduce failed (its own output says how); heartbeats: rank 2 "
                     "at step 4 alive but behind rank 0's step 5: stuck before rank 0's all_reduce") == 0);
  }
  // Rank 1 left at step 7 without an error (its last beat says so): rank 0's collective names it.
  // (A rank whose beats just stop, killed or frozen, is cli_dist's SIGSTOP case.)
  {
    auto comms = distributed::Communicator::create_local_group(2, o);
    for (auto& c : comms) c->note_progress(7);
    std::this_thread::sleep_for(std::chrono::milliseconds(500));  // a beat with step 7 posted
    comms[1].reset();
    const std::string error = all_reduce_error(*comms[0]);
    CAPTURE(error);
    CHECK(error.find("heartbeats: rank 1 at step 7 left the job without an error: it finished, or called fewer "
                     "collectives (diverged)") != std::string::npos);
  }
  // Rank 1 failed with an error (its last word posted so): rank 0's collective says that, as the
  // heartbeat watch would, not that rank 1 went silent.
  {
    auto comms = distributed::Communicator::create_local_group(2, o);
    try {
      auto failing = std::move(comms[1]);
      throw std::runtime_error("a bad image in rank 1's share");
    } catch (const std::runtime_error&) {
    }
    const std::string error = all_reduce_error(*comms[0]);
    CAPTURE(error);
    CHECK(error.find("rank 0 of 2: stopping: rank 1 failed with an error (its own output says which) (all_reduce "
                     "failed: ") == 0);
  }
  // Rank 2 fails, then rank 0 (because of it, say): the first failure stays the job's cause.
  {
    auto comms = distributed::Communicator::create_local_group(3, o);
    for (int r : {2, 0}) try {
        auto failing = std::move(comms[static_cast<size_t>(r)]);
        throw std::runtime_error("rank " + std::to_string(r) + "'s own error");
      } catch (const std::runtime_error&) {
      }
    const std::string error = all_reduce_error(*comms[1]);
    CAPTURE(error);
    CHECK(error.find("rank 1 of 3: stopping: rank 2 failed with an error") == 0);
  }
}

TEST_CASE("dist: heartbeats are read back as posted, and the watch names a rank silent for its timeout") {
  using distributed::detail::Beat;
  using distributed::detail::BeatState;
  const Beat b = distributed::detail::parse_beat(distributed::detail::format_beat(12, 340));
  CHECK((b.seen && b.count == 12 && b.progress == 340 && !b.left && !b.unwatched));
  CHECK(distributed::detail::parse_beat(distributed::detail::format_beat(3, 0, BeatState::left)).left);
  CHECK(distributed::detail::parse_beat(distributed::detail::format_beat(0, 0, BeatState::unwatched)).unwatched);
  CHECK_FALSE(distributed::detail::parse_beat("garbage").seen);
  CHECK_FALSE(distributed::detail::parse_beat("").seen);

  auto beat = [](int64_t count, int64_t step, bool left = false) {
    Beat x;
    x.seen = true, x.count = count, x.progress = step, x.left = left;
    return x;
  };
  // 4 ranks watched by rank 0 with a 10 s timeout: rank 1 beats, rank 2 stops at step 41,
  // rank 3 leaves (finished); readings every 2 s, one of which failed (not fed).
  distributed::detail::SilenceWatch watch(4, 0, 10, 100, 6);
  CHECK_FALSE(watch.verdict(109).has_value());
  for (int64_t t = 0; t <= 6; ++t) {
    const double now = 100 + 2.0 * static_cast<double>(t);
    if (t == 3) continue;  // the store did not answer this time
    watch.observe({beat(t, 0), beat(t, 40 + t), beat(std::min<int64_t>(t, 2), 41), beat(t, 9, t >= 1)}, now);
  }
  // Rank 2's count last changed at the reading of t = 2 (104 s): silent from then on.
  CHECK_FALSE(watch.verdict(113).has_value());
  const auto verdict = watch.verdict(114.5);
  REQUIRE(verdict.has_value());
  CHECK(*verdict == "rank 2 sent no heartbeat for 10 s (last at step 41)");
  // A rank that never posted one is silent from the watch's start.
  distributed::detail::SilenceWatch fresh(2, 0, 5, 0, 3);
  fresh.observe({beat(1, 0), Beat{}}, 1);
  CHECK_FALSE(fresh.verdict(4.9).has_value());
  REQUIRE(fresh.verdict(5).has_value());
  CHECK(*fresh.verdict(5) == "rank 1 sent no heartbeat for 5 s (it never sent one)");
  // The watching rank never names itself, nor a rank without heartbeats of its own.
  Beat unwatched = beat(0, 0);
  unwatched.unwatched = true;
  distributed::detail::SilenceWatch self(2, 0, 5, 0, 3);
  self.observe({beat(1, 0), unwatched}, 1);
  CHECK_FALSE(self.verdict(100).has_value());
  // The watcher suspended for 19 s (the whole job stopped, then continued): rank 1 has not beaten
  // again yet at the first reading after, which starts its silence afresh.
  distributed::detail::SilenceWatch suspended(2, 0, 5, 0, 3);
  suspended.observe({beat(1, 0), beat(1, 7)}, 0);
  suspended.observe({beat(2, 0), beat(2, 7)}, 1);
  suspended.observe({beat(3, 0), beat(2, 7)}, 20);
  CHECK_FALSE(suspended.verdict(20).has_value());
  suspended.observe({beat(4, 0), beat(2, 7)}, 22);
  suspended.observe({beat(5, 0), beat(2, 7)}, 24);
  CHECK_FALSE(suspended.verdict(24).has_value());
  suspended.observe({beat(6, 0), beat(2, 7)}, 25.5);
  CHECK(suspended.verdict(25.5).value_or("") == "rank 1 sent no heartbeat for 5 s (last at step 7)");
}

TEST_CASE("dist: a rank that fails stops the others through the heartbeats, one that finishes does not") {
  if (!twins::test::have_gloo()) return;  // several ranks on the CPU
  std::mutex mutex;
  std::vector<std::string> reports;
  distributed::CommunicatorOptions o;
  o.heartbeat_s = 0.05, o.heartbeat_timeout_s = 1.5;  // 30 beats: a loaded machine's delays are far shorter
  o.on_job_failure = [&](const std::string& reason) {
    std::lock_guard<std::mutex> lock(mutex);
    reports.push_back(reason);
  };
  auto comms = distributed::Communicator::create_local_group(3, o);
  auto reported = [&] {
    std::lock_guard<std::mutex> lock(mutex);
    return reports;
  };
  // Rank 2 finishes: no one is stopped, long past the timeout.
  comms[2].reset();
  std::this_thread::sleep_for(std::chrono::milliseconds(2500));
  CHECK(reported().empty());
  // Rank 1 fails (its communicator goes while an error unwinds): rank 0 is told within beats.
  try {
    auto failing = std::move(comms[1]);
    throw std::runtime_error("a bad image in rank 1's share");
  } catch (const std::runtime_error&) {
  }
  for (int i = 0; i < 100 && reported().empty(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  std::this_thread::sleep_for(std::chrono::milliseconds(300));  // more beats: still one report
  const auto got = reported();
  REQUIRE(got.size() == 1);
  CHECK(got[0] == "rank 0 of 3: stopping: rank 1 failed with an error (its own output says which)");
}

TEST_CASE("dist: ranks that fail at once each print their own error, not another's failure") {
  if (!twins::test::have_gloo()) return;  // several ranks on the CPU
  // Every rank refuses the same bad setting: rank 1 first, rank 0 a moment later, after its
  // heartbeat has read rank 1's failure (within a beat, 1 s) but while it still serves its store
  // (2.5 beats after that read).
  // Rank 0 leaves with its own error, which says why; being told "rank 1 failed" says less.
  std::mutex mutex;
  std::vector<std::string> reports;
  distributed::CommunicatorOptions o;
  o.heartbeat_s = 1, o.heartbeat_timeout_s = 60;
  o.on_job_failure = [&](const std::string& reason) {
    std::lock_guard<std::mutex> lock(mutex);
    reports.push_back(reason);
  };
  auto comms = distributed::Communicator::create_local_group(2, o);
  try {
    auto failing = std::move(comms[1]);
    throw std::invalid_argument("finetune.batch_size: 7 does not divide over 2 ranks");
  } catch (const std::invalid_argument&) {
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(1200));  // rank 0's next beat read it
  try {
    auto failing = std::move(comms[0]);
    throw std::invalid_argument("finetune.batch_size: 7 does not divide over 2 ranks");
  } catch (const std::invalid_argument&) {
  }
  std::lock_guard<std::mutex> lock(mutex);
  CHECK(reports.empty());
}

TEST_CASE("dist: on_rank0 runs the work on rank 0 alone, and its failure reaches every rank") {
  if (!twins::test::have_gloo()) return;  // several ranks on the CPU
  auto comms = distributed::Communicator::create_local_group(3);
  std::vector<int> ran(3, 0);
  std::vector<std::string> errors(3);
  for (const bool fail : {false, true}) {
    CAPTURE(fail);
    on_ranks(comms, [&](int r) {
      try {
        distributed::on_rank0(
            comms[static_cast<size_t>(r)],
            [&] {
              ++ran[static_cast<size_t>(r)];
              if (fail) throw std::invalid_argument("probe.json: not writable");
            },
            "write probe.json");
      } catch (const std::invalid_argument& e) {  // rank 0's own, of its own type
        errors[static_cast<size_t>(r)] = std::string("invalid_argument: ") + e.what();
      } catch (const std::runtime_error& e) {
        errors[static_cast<size_t>(r)] = e.what();
      }
    });
    CHECK(ran == std::vector<int>{fail ? 2 : 1, 0, 0});
    if (!fail) CHECK(errors == std::vector<std::string>(3));
  }
  CHECK(errors[0] == "invalid_argument: probe.json: not writable");
  for (int r : {1, 2})
    CHECK(errors[static_cast<size_t>(r)] ==
          "rank " + std::to_string(r) + ": rank 0 could not write probe.json (its error says why)");
  // Without a communicator: the work, in this process.
  int here = 0;
  distributed::on_rank0(
      nullptr, [&] { ++here; }, "count");
  CHECK(here == 1);
}

TEST_CASE(
    "dist: on_rank0_long lets rank 0 work past the collectives' timeout, the others waiting, and tells its failure") {
  if (!twins::test::have_gloo()) return;  // several ranks on the CPU
  // A 2 s timeout and 3 s of work: the others wait in collectives of 0.5 s, which rank 0's
  // keep-alive (called every 20 ms) joins; one collective as long as the work would time out.
  distributed::CommunicatorOptions o;
  o.timeout_s = 2, o.heartbeat_s = 0;
  auto comms = distributed::Communicator::create_local_group(3, o);
  std::vector<std::string> errors(3);
  for (const bool fail : {false, true}) {
    CAPTURE(fail);
    int worked = 0;
    on_ranks(comms, [&](int r) {
      try {
        distributed::on_rank0_long(
            comms[static_cast<size_t>(r)].get(),
            [&](const std::function<void()>& keep_alive) {
              for (int i = 0; i < 150; ++i) {
                std::this_thread::sleep_for(std::chrono::milliseconds(20));
                keep_alive();
              }
              ++worked;
              if (fail) throw std::invalid_argument("online kNN bank: a bad image");
            },
            "score online_probe.eval_data");
      } catch (const std::invalid_argument& e) {
        errors[static_cast<size_t>(r)] = std::string("invalid_argument: ") + e.what();
      } catch (const std::runtime_error& e) {
        errors[static_cast<size_t>(r)] = e.what();
      }
    });
    CHECK(worked == 1);
    if (!fail) CHECK(errors == std::vector<std::string>(3));
  }
  CHECK(errors[0] == "invalid_argument: online kNN bank: a bad image");
  for (int r : {1, 2})
    CHECK(errors[static_cast<size_t>(r)] ==
          "rank " + std::to_string(r) + ": rank 0 could not score online_probe.eval_data (its error says why)");
  // The communicator still works: the ranks took part in as many collectives.
  std::vector<int64_t> sums(3);
  on_ranks(comms, [&](int r) { sums[static_cast<size_t>(r)] = comms[static_cast<size_t>(r)]->sum(1); });
  CHECK(sums == std::vector<int64_t>{3, 3, 3});
}

namespace {

// A TCP port free on the loopback now (the kernel's choice).
int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  REQUIRE(fd >= 0);
  sockaddr_in a{};
  a.sin_family = AF_INET, a.sin_addr.s_addr = htonl(INADDR_LOOPBACK), a.sin_port = 0;
  socklen_t size = sizeof a;
  REQUIRE(::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
  REQUIRE(::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &size) == 0);
  ::close(fd);
  return ntohs(a.sin_port);
}

}  // namespace

TEST_CASE("dist: the rendezvous names the ranks that never came, and stops at once when one failed before it joined") {
  if (!twins::test::have_gloo()) return;  // several ranks on the CPU
  using Clock = std::chrono::steady_clock;
  distributed::Environment e;
  e.world_size = 3, e.master_addr = "127.0.0.1", e.launcher = "torchrun";
  distributed::CommunicatorOptions o;
  o.heartbeat_s = 0;
  // Rank 0 fails before it joins (its node lacks the config file, say) while ranks 1 and 2 wait
  // for it with an hour's timeout: rank 0 hosts the store long enough to tell them, and they stop.
  e.master_port = free_port();
  o.timeout_s = 3600;
  std::vector<std::string> errors(3);
  std::vector<std::thread> waiting;
  for (int r : {1, 2})
    waiting.emplace_back([&, r] {
      distributed::Environment mine = e;
      mine.rank = r;
      try {
        distributed::Communicator::create(mine, at::kCPU, o);
        errors[static_cast<size_t>(r)] = "joined";
      } catch (const std::exception& ex) {
        errors[static_cast<size_t>(r)] = ex.what();
      }
    });
  std::this_thread::sleep_for(std::chrono::milliseconds(300));  // they are trying to reach rank 0
  const auto start = Clock::now();
  distributed::report_failure_before_join(e, 30);  // e.rank is 0
  for (auto& t : waiting) t.join();
  const double took = std::chrono::duration<double>(Clock::now() - start).count();
  CAPTURE(took);
  CHECK(took < 20);  // rank 0 left once both had read it, not after its 30 s
  for (int r : {1, 2})
    CHECK(errors[static_cast<size_t>(r)] == "rank " + std::to_string(r) +
                                                " of 3: stopping before the job formed: rank 0 failed before it "
                                                "joined the job (its own output says why)");
  // Once told, a process does not tell again (nor serve a store on the port).
  const auto again = Clock::now();
  distributed::report_failure_before_join(e, 30);
  CHECK(std::chrono::duration<double>(Clock::now() - again).count() < 1);
  // Rank 2 never comes: rank 0 names it after its timeout, and tells rank 1, which came.
  e.master_port = free_port();
  std::string rank1;
  o.timeout_s = 60;  // (a test that failed would not wait an hour)
  std::thread one([&, patient = o] {
    distributed::Environment mine = e;
    mine.rank = 1;
    try {
      distributed::Communicator::create(mine, at::kCPU, patient);
    } catch (const std::exception& ex) {
      rank1 = ex.what();
    }
  });
  o.timeout_s = 4;  // after the above: a process that was told still waits for its ranks
  const std::string missing =
      "rank 2 did not join the job at 127.0.0.1:" + std::to_string(e.master_port) + " within 4 s (dist_timeout_s)";
  check_throws_with<std::runtime_error>([&] { distributed::Communicator::create(e, at::kCPU, o); },
                                        "rank 0 of 3: " + missing);
  one.join();
  INFO("rank 1: ", rank1);
  CHECK(rank1.find("rank 1 of 3: stopping before the job formed: rank 0 gave up: " + missing) == 0);
  // A rank started twice (or another job on the port) is refused; the job itself goes on.
  e.world_size = 2, e.master_port = free_port();
  std::vector<std::shared_ptr<distributed::Communicator>> job(2);
  twins::test::on_threads(2, [&](int r) {
    distributed::Environment mine = e;
    mine.rank = r;
    job[static_cast<size_t>(r)] = distributed::Communicator::create(mine, at::kCPU, o);
  });
  distributed::Environment twice = e;
  twice.rank = 1;
  check_throws_with<std::runtime_error>([&] { distributed::Communicator::create(twice, at::kCPU, o); },
                                        "rank 1 of 2: the rendezvous at 127.0.0.1:" + std::to_string(e.master_port) +
                                            " already has a rank 1: this rank was started twice");
  std::vector<int64_t> sums(2);
  twins::test::on_threads(2, [&](int r) { sums[static_cast<size_t>(r)] = job[static_cast<size_t>(r)]->sum(1); });
  CHECK(sums == std::vector<int64_t>{2, 2});
}

TEST_CASE(
    "dist: under torchrun's agent store every rank is a client, a restarted attempt forms afresh, and rank 0's silence "
    "is seen") {
  if (!twins::test::have_gloo()) return;  // several ranks on the CPU
  // The agent: a TCP store this test serves on MASTER_PORT, as torchrun's elastic agent does
  // (TORCHELASTIC_USE_AGENT_STORE=True) before it starts the ranks.
  distributed::Environment e;
  e.world_size = 2, e.master_addr = "127.0.0.1", e.master_port = free_port(), e.launcher = "torchrun";
  c10d::TCPStoreOptions so;
  so.port = static_cast<uint16_t>(e.master_port), so.isServer = true, so.waitWorkers = false;
  compat::set_store_libuv(so, false);
  const auto agent = c10::make_intrusive<c10d::TCPStore>(e.master_addr, so);
  distributed::CommunicatorOptions o;
  o.timeout_s = 60;
  // Rank 0 serving the store itself, as elsewhere, finds the port taken.
  distributed::Environment serving = e;
  serving.world_size = 1;
  check_throws_with<std::runtime_error>([&] { distributed::Communicator::create(serving, at::kCPU, o); },
                                        "rank 0: rendezvous at 127.0.0.1:" + std::to_string(e.master_port) + " failed");
  e.agent_store = true;
  for (int attempt : {0, 1}) {  // the same ranks again: torchrun's restart, on the same agent store
    CAPTURE(attempt);
    e.restart_count = attempt;
    std::vector<int64_t> sums(2);
    twins::test::on_threads(2, [&](int r) {
      distributed::Environment mine = e;
      mine.rank = r;
      sums[static_cast<size_t>(r)] = distributed::Communicator::create(mine, at::kCPU, o)->sum(r + 1);
    });
    CHECK(sums == std::vector<int64_t>{3, 3});
  }
  // Rank 0 goes silent (no heartbeats) while the agent's store still answers: rank 1 reads rank
  // 0's beats itself and stops the job, as it would when rank 0's own store stopped answering.
  e.restart_count = 2;
  std::mutex mutex;
  std::vector<std::string> reports;
  distributed::CommunicatorOptions beating = o;
  beating.heartbeat_s = 0.05, beating.heartbeat_timeout_s = 1;
  beating.on_job_failure = [&](const std::string& reason) {
    std::lock_guard<std::mutex> lock(mutex);
    reports.push_back(reason);
  };
  distributed::CommunicatorOptions silent = o;
  silent.heartbeat_s = 0;
  std::vector<std::shared_ptr<distributed::Communicator>> job(2);
  twins::test::on_threads(2, [&](int r) {
    distributed::Environment mine = e;
    mine.rank = r;
    job[static_cast<size_t>(r)] = distributed::Communicator::create(mine, at::kCPU, r == 0 ? silent : beating);
  });
  auto reported = [&] {
    std::lock_guard<std::mutex> lock(mutex);
    return reports;
  };
  for (int i = 0; i < 250 && reported().empty(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  const auto got = reported();
  REQUIRE(got.size() == 1);
  CHECK(got[0].find("rank 1 of 2: stopping: rank 0 sent no heartbeat for 1 s (it never sent one)") == 0);
}

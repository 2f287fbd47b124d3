// The `twins` command: parses the command line, runs one subcommand, and is the only place
// that turns exceptions into messages and exit codes (2: usage or configuration, 1: runtime).
#include <csignal>
#include <cstdlib>
#include <exception>
#include <iostream>
#include <stdexcept>
#include <vector>

#include "cli/commands.h"
#include "twins/distributed/communicator.h"
#include "twins/runtime.h"
#include "twins/version.h"

// In a multi-rank job (any launcher twins knows), which rank speaks, unless the message says so.
static std::string rank_prefix(const std::string& message) {
  try {
    const auto env = twins::distributed::detect_environment();
    if (env.world_size <= 1 || message.rfind("rank ", 0) == 0) return "";
    return "rank " + std::to_string(env.rank) + ": ";
  } catch (const std::exception&) {  // a malformed environment is reported by the command itself
    return "";
  }
}

int main(int argc, char** argv) {
  // A file-size limit (ulimit -f) must fail a write with EFBIG, which twins reports naming the
  // file, instead of killing the process with SIGXFSZ and no word.
  std::signal(SIGXFSZ, SIG_IGN);
  twins::tune_allocator();
  // A rank of a multi-rank job whose heartbeat watch learns that another rank failed or went
  // silent ends here at once, from the heartbeat thread: its collectives could only wait for
  // dist_timeout_s (NCCL's for ever). Checkpoints are written atomically (a partial one is a
  // temporary file, removed by the next run); metrics since the last flush are lost.
  twins::distributed::set_job_failure_handler([](const std::string& reason) {
    std::cerr << ("error: " + reason + "\n");  // one write: ranks share stderr
    std::_Exit(1);
  });
  CLI::App app{"twins: non-contrastive self-supervised learning (VICReg, Barlow Twins, BYOL)"};
  app.require_subcommand(0, 1);
  bool show_version = false;
  app.add_flag("--version", show_version, "Print the twins and LibTorch versions and CUDA status");

  std::vector<std::pair<CLI::App*, twins::cli::Command>> commands;
  auto add = [&](twins::cli::Command (*adder)(CLI::App&)) {
    const size_t before = app.get_subcommands({}).size();
    twins::cli::Command run = adder(app);
    commands.emplace_back(app.get_subcommands({})[before], std::move(run));
  };
  add(twins::cli::add_pretrain);
  add(twins::cli::add_linear_probe);
  add(twins::cli::add_knn);
  add(twins::cli::add_finetune);
  add(twins::cli::add_embed);
  add(twins::cli::add_export);
  add(twins::cli::add_plot);
  add(twins::cli::add_list);
  add(twins::cli::add_preview);
  add(twins::cli::add_bench);
  add(twins::cli::add_shards);

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // --help and --version-like successes print and exit 0; every usage error exits 2.
    const int code = app.exit(e);
    return code == 0 ? 0 : 2;
  }
  // A rank of a job command that fails before it joined the job tells the ranks waiting for it
  // (they would wait dist_timeout_s); once joined, its heartbeats tell.
  bool job_command = false;
  for (const char* name : {"pretrain", "linear-probe", "knn", "finetune", "embed"})
    job_command = job_command || app.got_subcommand(name);
  auto tell_the_job = [job_command] {
    if (!job_command) return;
    try {
      twins::distributed::report_failure_before_join(twins::distributed::detect_environment());
    } catch (const std::exception&) {  // a malformed environment: there is no job to tell
    }
  };
  try {
    if (show_version) {
      std::cout << "twins " << twins::version() << "\n"
                << "LibTorch " << twins::torch_version() << "\n"
                << "CUDA " << (twins::cuda_available() ? "available (" + twins::cuda_summary() + ")" : "not available")
                << "\n"
                << "CPU bf16 "
                << (twins::cpu_has_native_bf16() ? "native" : "emulated (bf16 training may be slower than fp32)")
                << "\n";
      std::string collectives;
      for (const auto& b : twins::distributed::collective_backends())
        collectives += (collectives.empty() ? "" : ", ") + b + (b == "gloo" ? " (CPU)" : " (GPU)");
      std::cout << "collectives " << (collectives.empty() ? "none (one process per job)" : collectives) << "\n";
      return 0;
    }
    for (auto& [sub, run] : commands)
      if (sub->parsed()) return run();
    std::cout << app.help();
    return 0;
  } catch (const std::invalid_argument& e) {
    std::cerr << ("error: " + rank_prefix(e.what()) + e.what() + "\n");  // one write: ranks share stderr
    tell_the_job();
    twins::distributed::linger_after_failure();
    return 2;
  } catch (const std::exception& e) {
    std::cerr << ("error: " + rank_prefix(e.what()) + e.what() + "\n");  // one write: ranks share stderr
    tell_the_job();
    twins::distributed::linger_after_failure();
    return 1;
  }
}

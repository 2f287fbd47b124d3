#pragma once
// Each subcommand adds itself to the app and returns the function that runs it.
#include <CLI/CLI.hpp>

#include <atomic>
#include <functional>
#include <string>

namespace twins::cli {

using Command = std::function<int()>;

Command add_list(CLI::App& app);
Command add_preview(CLI::App& app);
Command add_bench(CLI::App& app);
Command add_shards(CLI::App& app);
Command add_pretrain(CLI::App& app);
Command add_linear_probe(CLI::App& app);
Command add_knn(CLI::App& app);
Command add_finetune(CLI::App& app);
Command add_embed(CLI::App& app);
Command add_export(CLI::App& app);
Command add_plot(CLI::App& app);

/// Where this machine's ranks sit in the job: torchrun's flags (--nproc-per-node, --nnodes,
/// --node-rank, --master-addr, --master-port).
struct LaunchPlan {
  int nproc_per_node = 0;  ///< 0: no launch (this process is the rank, or a launcher started it)
  int nnodes = 1, node_rank = 0;
  std::string master_addr;  ///< empty: 127.0.0.1 (one node only)
  int master_port = 0;      ///< 0: MASTER_PORT, else a free port (one node only)
  /// Adds the flags to a subcommand.
  void add_options(CLI::App& sub);
  /// The flags to give again to resume (this node's --node-rank), or "" without a launch.
  std::string resume_flags() const;
  /// Throws std::invalid_argument when node flags come without --nproc-per-node.
  void check() const;
};

/// Runs this command as the plan's local ranks (see cli/launch.cpp); returns the job's exit
/// code. A failed rank's peers on this machine get SIGTERM, then SIGKILL after `grace_seconds`;
/// those on other machines fail in their next collective (train.dist_timeout_s at most).
int launch_local(const LaunchPlan& plan, double grace_seconds);

/// SIGINT and SIGTERM ask this process to stop cleanly: `request` (async-signal-safe) is called,
/// and with `speaks` a line on stderr says so. The same stop arriving again within 2 s is ignored
/// (a terminal's Ctrl-C or a scheduler reaches every rank, and the launcher forwards it too); a
/// signal after that stops the process at once.
void catch_stop_signals(void (*request)(), bool speaks);
/// catch_stop_signals with a flag that the first stop signal sets, for a command that checks
/// it between its batches (evaluations, embed).
const std::atomic<bool>* stop_flag_on_signals(bool speaks);

}  // namespace twins::cli

#pragma once
// Each subcommand adds itself to the app and returns the function that runs it.
#include <CLI/CLI.hpp>

#include <functional>

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

/// Runs this command as `nproc` local ranks (see cli/launch.cpp); returns the job's exit code.
/// A failed rank's peers get SIGTERM, then SIGKILL after `grace_seconds`.
int launch_local(int nproc, double grace_seconds);

}  // namespace twins::cli

// twins pretrain: trains a recipe into a run folder; SIGINT/SIGTERM finish the step, write a
// checkpoint and exit 0 with the command that resumes.
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "twins/config.h"
#include "twins/distributed/communicator.h"
#include "twins/train/pretrain.h"

namespace twins::cli {
namespace {

struct PretrainArgs {
  std::string config, out, device;
  std::vector<std::string> set;
  bool resume = false, auto_resume = false;
  int64_t stop_after = 0;
  LaunchPlan launch;
};

int run_pretrain(const PretrainArgs& a) {
  namespace fs = std::filesystem;
  a.launch.check();
  if (a.launch.nproc_per_node > 0) return launch_local(a.launch, 5.0);
  if (a.config.empty() && !a.resume) throw std::invalid_argument("--config is required (or --resume with --out)");
  const std::string out = !a.out.empty() ? a.out : "runs/" + fs::path(a.config).stem().string();
  nlohmann::json cfg = a.config.empty() ? nlohmann::json::object() : config::load_config(a.config, a.set);
  if (a.resume && !a.set.empty()) throw std::invalid_argument("--set cannot change a run being resumed");
  catch_stop_signals(train::request_stop, distributed::detect_environment().rank == 0);
  train::PretrainOptions o;
  o.out_dir = out, o.resume = a.resume, o.auto_resume = a.auto_resume, o.device = a.device, o.stop_after = a.stop_after;
  const auto r = train::pretrain(cfg, o);
  if (!r.main_rank) return 0;  // rank 0 speaks for the job
  if (r.interrupted) {
    // The same launcher again: ours passes its rank count down; others are the user's command.
    const char* flags = std::getenv("TWINS_RESUME_FLAGS");
    const std::string command = "twins pretrain --out " + out + " --resume";
    if (flags && std::string(flags).find("--nnodes") != std::string::npos)
      std::cerr << "resume with, on each node (its own --node-rank): " << command << " " << flags << "\n";
    else if (flags && *flags)
      std::cerr << "resume with: " << command << " " << flags << "\n";
    else if (distributed::detect_environment().launcher != "none")
      std::cerr << "resume with the same launcher and: " << command << "\n";
    else
      std::cerr << "resume with: " << command << "\n";
  }
  if (!r.interrupted && r.online_probe_top1) std::cout << "online probe top-1: " << *r.online_probe_top1 << "%\n";
  if (!r.interrupted && r.online_knn_top1) std::cout << "online kNN top-1: " << *r.online_knn_top1 << "%\n";
  std::cout << "run folder: " << out << "\n";
  return 0;
}

}  // namespace

Command add_pretrain(CLI::App& app) {
  auto a = std::make_shared<PretrainArgs>();
  auto* sub = app.add_subcommand("pretrain", "Pretrain a backbone with VICReg, Barlow Twins or BYOL");
  sub->add_option("--config", a->config, "Recipe JSON (configs/*.json)");
  sub->add_option("--set", a->set, "Override a config key: a.b=value (repeatable)");
  sub->add_option("--out", a->out, "Run folder (default: runs/<recipe name>)");
  auto* resume = sub->add_flag("--resume", a->resume, "Continue from the latest valid checkpoint of the run folder");
  sub->add_flag("--auto-resume", a->auto_resume,
                "Continue the run folder's run when it holds a checkpoint (of this --config), else start it: the same "
                "command for a first start and every restart (torchrun --max-restarts, a requeued job)")
      ->excludes(resume);
  sub->add_option("--device", a->device, "auto, cpu, cuda or cuda:N (overrides train.device)");
  sub->add_option("--stop-after", a->stop_after, "Stop (checkpoint, resumable) after N steps of this invocation")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 40));
  a->launch.add_options(*sub);
  return [a] { return run_pretrain(*a); };
}

}  // namespace twins::cli

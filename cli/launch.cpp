// `--nproc-per-node N`: starts N ranks of this same command on this machine, as torchrun does
// (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), forwards SIGINT/SIGTERM to them,
// and when one fails stops the others, so that no rank outlives the job. With `--nnodes M
// --node-rank i --master-addr host --master-port p` on each of M machines, machine i's ranks
// are i x N ... i x N + N - 1 of M x N (torchrun's static rendezvous, without Python).
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <fstream>
#include <iostream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "cli/commands.h"
#include "twins/distributed/communicator.h"
#include "twins/runtime.h"

namespace twins::cli {
namespace {

volatile std::sig_atomic_t g_signal = 0;
void on_launcher_signal(int sig) { g_signal = sig; }

// A rank's (or a single process's) stop request: see catch_stop_signals.
void (*g_request_stop)() = nullptr;
volatile std::sig_atomic_t g_stop_speaks = 0;
std::atomic<int64_t> g_first_stop_ns{0};  // when the first came (0: none yet)
static_assert(std::atomic<int64_t>::is_always_lock_free, "the signal handler needs a lock-free atomic");
void on_stop_signal(int sig) {
  const int saved_errno = errno;
  timespec now{};
  ::clock_gettime(CLOCK_MONOTONIC, &now);
  const int64_t ns = static_cast<int64_t>(now.tv_sec) * 1000000000 + now.tv_nsec + 1;
  int64_t first = 0;
  if (g_first_stop_ns.compare_exchange_strong(first, ns)) {
    g_request_stop();
    if (g_stop_speaks) {
      static const char said[] =
          "\nstopping after this step, keeping the state (a signal 2 s from now stops at once)\n";
      [[maybe_unused]] const ssize_t n = ::write(2, said, sizeof(said) - 1);
    }
  } else if (ns - first >= 2000000000) {  // earlier: the same stop again
    ::signal(sig, SIG_DFL);
    ::raise(sig);
  }
  errno = saved_errno;
}

// The launcher's own flags, each with a value: the ranks get the other arguments.
const char* const kLaunchFlags[] = {"--nproc-per-node", "--nnodes", "--node-rank", "--master-addr", "--master-port"};

// This process's arguments, without the launcher's flags (`--flag value` or `--flag=value`).
std::vector<std::string> child_arguments() {
  std::ifstream in("/proc/self/cmdline", std::ios::binary);
  const std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::string> args;
  for (size_t start = 0; start < all.size();) {
    const size_t end = all.find('\0', start);
    args.push_back(all.substr(start, end - start));
    start = end == std::string::npos ? all.size() : end + 1;
  }
  std::vector<std::string> out;
  for (size_t i = 0; i < args.size(); ++i) {
    bool launcher_flag = false;
    for (const char* flag : kLaunchFlags) {
      if (args[i] == flag) {
        ++i;  // and its value
        launcher_flag = true;
        break;
      }
      if (args[i].rfind(std::string(flag) + "=", 0) == 0) {
        launcher_flag = true;
        break;
      }
    }
    if (!launcher_flag) out.push_back(args[i]);
  }
  return out;
}

int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) throw std::runtime_error("--nproc-per-node: cannot open a socket to find a free port");
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof addr;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    ::close(fd);
    throw std::runtime_error("--nproc-per-node: cannot find a free port on 127.0.0.1; set MASTER_PORT");
  }
  ::close(fd);
  return ntohs(addr.sin_port);
}

std::string describe(int status) {
  if (WIFEXITED(status)) return "exit code " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status))
    return std::string("killed by signal ") + std::to_string(WTERMSIG(status)) + " (" + strsignal(WTERMSIG(status)) +
           ")";
  return "status " + std::to_string(status);
}

}  // namespace

void LaunchPlan::add_options(CLI::App& sub) {
  sub.add_option("--nproc-per-node", nproc_per_node,
                 "Start N ranks on this machine (data parallel: one per GPU, or N CPU ranks with Gloo)")
      ->check(CLI::Range(1, 1024));
  sub.add_option("--nnodes", nnodes, "Machines in the job, each running this command with its --node-rank")
      ->check(CLI::Range(1, 65536));
  sub.add_option("--node-rank", node_rank, "This machine's place among --nnodes (0: the one at --master-addr)")
      ->check(CLI::Range(0, 65535));
  sub.add_option("--master-addr", master_addr, "Host of node 0, where the ranks meet (several nodes)");
  sub.add_option("--master-port", master_port, "A free port on --master-addr (several nodes)")
      ->check(CLI::Range(1, 65535));
}

void LaunchPlan::check() const {
  if (nproc_per_node <= 0 && (nnodes > 1 || node_rank > 0 || !master_addr.empty() || master_port > 0))
    throw std::invalid_argument(
        "--nnodes, --node-rank, --master-addr and --master-port go with --nproc-per-node (ranks per node)");
}

void catch_stop_signals(void (*request)(), bool speaks) {
  g_request_stop = request, g_stop_speaks = speaks ? 1 : 0;
  struct sigaction sa {};
  sa.sa_handler = on_stop_signal;
  sa.sa_flags = SA_RESTART;
  sigemptyset(&sa.sa_mask);  // neither nests in the other on one thread (the exchange orders threads)
  sigaddset(&sa.sa_mask, SIGINT);
  sigaddset(&sa.sa_mask, SIGTERM);
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
}

namespace {
std::atomic<bool> g_stop_flag{false};
void set_stop_flag() { g_stop_flag.store(true); }
}  // namespace

const std::atomic<bool>* stop_flag_on_signals(bool speaks) {
  catch_stop_signals(set_stop_flag, speaks);
  return &g_stop_flag;
}

std::string LaunchPlan::resume_flags() const {
  if (nproc_per_node <= 0) return "";
  std::string flags = "--nproc-per-node " + std::to_string(nproc_per_node);
  if (nnodes > 1)
    flags += " --nnodes " + std::to_string(nnodes) + " --node-rank " + std::to_string(node_rank) + " --master-addr " +
             master_addr + " --master-port " + std::to_string(master_port);
  return flags;
}

int launch_local(const LaunchPlan& plan, double grace_seconds) {
  const int nproc = plan.nproc_per_node;
  if (nproc < 1) throw std::invalid_argument("--nproc-per-node: must be >= 1");
  if (plan.node_rank >= plan.nnodes)
    throw std::invalid_argument("--node-rank: " + std::to_string(plan.node_rank) + " is not below --nnodes " +
                                std::to_string(plan.nnodes));
  if (plan.nnodes > 1 && (plan.master_addr.empty() || plan.master_port == 0))
    throw std::invalid_argument(
        "--nnodes " + std::to_string(plan.nnodes) +
        ": every node needs the same --master-addr (the host of node 0) and --master-port (a free port there)");
  const auto env = distributed::detect_environment();
  if (env.launcher != "none")
    throw std::invalid_argument("--nproc-per-node: this process is already rank " + std::to_string(env.rank) +
                                " of a " + env.launcher + " job; use either a launcher or --nproc-per-node");
  const std::vector<std::string> args = child_arguments();
  const char* port_env = std::getenv("MASTER_PORT");
  const std::string port = plan.master_port > 0    ? std::to_string(plan.master_port)
                           : port_env && *port_env ? port_env
                                                   : std::to_string(free_port());
  const std::string host = plan.master_addr.empty() ? "127.0.0.1" : plan.master_addr;
  const int world = plan.nnodes * nproc, first_rank = plan.node_rank * nproc;
  // The cores shared out among the ranks (torchrun sets 1 each), unless OMP_NUM_THREADS says.
  const char* omp = std::getenv("OMP_NUM_THREADS");
  const std::string threads = omp && *omp ? std::string(omp) : std::to_string(std::max(1, usable_cores() / nproc));
  const std::string each =
      " rank(s) of " + threads + " thread(s)" + (omp && *omp ? "" : " (OMP_NUM_THREADS to change)");
  if (plan.nnodes > 1)
    std::cerr << "launching ranks " << first_rank << "-" << first_rank + nproc - 1 << " of " << world
              << " on this machine, node " << plan.node_rank << " of " << plan.nnodes << ", " << nproc << each
              << " (rendezvous " << host << ":" << port << ")\n";
  else
    std::cerr << "launching " << nproc << each << " on this machine (rendezvous " << host << ":" << port << ")\n";
  const std::string resume_flags = plan.resume_flags();

  struct sigaction sa {};
  sa.sa_handler = on_launcher_signal;
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);

  const pid_t launcher = ::getpid();
  std::vector<pid_t> pids(static_cast<size_t>(nproc), -1);
  std::vector<int> statuses(static_cast<size_t>(nproc), 0);
  std::vector<bool> running(static_cast<size_t>(nproc), false);
  for (int r = 0; r < nproc; ++r) {
    const pid_t pid = ::fork();
    if (pid < 0) throw std::runtime_error("--nproc-per-node: fork failed: " + std::string(std::strerror(errno)));
    if (pid == 0) {
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);  // no rank outlives a killed launcher
      if (::getppid() != launcher) ::_exit(1);
      ::signal(SIGINT, SIG_DFL);
      ::signal(SIGTERM, SIG_DFL);
      ::setenv("RANK", std::to_string(first_rank + r).c_str(), 1);
      ::setenv("LOCAL_RANK", std::to_string(r).c_str(), 1);
      ::setenv("WORLD_SIZE", std::to_string(world).c_str(), 1);
      ::setenv("LOCAL_WORLD_SIZE", std::to_string(nproc).c_str(), 1);
      ::setenv("GROUP_RANK", std::to_string(plan.node_rank).c_str(), 1);
      ::setenv("MASTER_ADDR", host.c_str(), 1);
      ::setenv("MASTER_PORT", port.c_str(), 1);
      ::setenv("TWINS_RESUME_FLAGS", resume_flags.c_str(), 1);              // for the resume command
      ::setenv("TWINS_LAUNCHER_PID", std::to_string(launcher).c_str(), 1);  // for TWINS_FAULT's :TERM
      ::setenv("OMP_NUM_THREADS", threads.c_str(), 1);
      std::vector<char*> argv;
      for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
      argv.push_back(nullptr);
      ::execv("/proc/self/exe", argv.data());
      std::cerr << "error: rank " << first_rank + r << ": cannot start /proc/self/exe: " << std::strerror(errno)
                << "\n";
      ::_exit(127);
    }
    pids[static_cast<size_t>(r)] = pid;
    running[static_cast<size_t>(r)] = true;
  }

  using Clock = std::chrono::steady_clock;
  int alive = nproc, first_failure = -1;
  bool stopping = false;
  Clock::time_point kill_at{};
  auto signal_all = [&](int sig) {
    for (int r = 0; r < nproc; ++r)
      if (running[static_cast<size_t>(r)]) ::kill(pids[static_cast<size_t>(r)], sig);
  };
  while (alive > 0) {
    if (g_signal) {  // Ctrl-C / SIGTERM: every rank finishes its step and checkpoints
      const int sig = g_signal;
      g_signal = 0;
      signal_all(sig);
    }
    int status = 0;
    const pid_t pid = ::waitpid(-1, &status, WNOHANG);
    if (pid > 0) {
      for (int r = 0; r < nproc; ++r)
        if (pids[static_cast<size_t>(r)] == pid && running[static_cast<size_t>(r)]) {
          running[static_cast<size_t>(r)] = false, statuses[static_cast<size_t>(r)] = status, --alive;
          const bool ok = WIFEXITED(status) && WEXITSTATUS(status) == 0;
          if (!ok && first_failure < 0) {
            first_failure = r;
            if (alive > 0) {
              // One write per line: the ranks print to the same stderr meanwhile.
              std::cerr << ("error: rank " + std::to_string(first_rank + r) + " failed (" + describe(status) +
                            "); stopping the other " + std::to_string(alive) + " rank(s)\n");
              signal_all(SIGTERM);
              stopping = true;
              kill_at = Clock::now() + std::chrono::milliseconds(static_cast<int64_t>(grace_seconds * 1000));
            }
          }
        }
      continue;
    }
    if (stopping && Clock::now() >= kill_at) {
      signal_all(SIGKILL);
      stopping = false;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  if (first_failure < 0) return 0;
  const int s = statuses[static_cast<size_t>(first_failure)];
  std::cerr << ("error: rank " + std::to_string(first_rank + first_failure) + " failed first (" + describe(s) + ")\n");
  return WIFEXITED(s) ? WEXITSTATUS(s) : 128 + WTERMSIG(s);
}

}  // namespace twins::cli

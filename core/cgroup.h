#pragma once
// The CPU limits a process's control groups put on it (cgroup v2, and v1 as older hosts, Docker
// on them and SLURM's cgroup plugin use it), read from their files: how many cores a container's
// --cpus or a job's cpuset leave the thread pools and loader threads. Private to the library
// (core/runtime.cpp); no LibTorch here.
#include <string>

namespace twins::cgroup {

struct CpuLimits {
  /// The tightest CPU quota over the process's group and each parent (v2 cpu.max, v1
  /// cpu.cfs_quota_us per cpu.cfs_period_us), in cores rounded up; 0 when there is none.
  int quota_cores = 0;
  /// The CPUs in the process's cpuset (its group's, else the hierarchy's root as the container
  /// sees it); 0 when none can be read.
  int cpuset_cores = 0;
};

/// The limits of a process whose /proc/self/cgroup reads `membership` ("0::/path" for v2,
/// "N:cpu,cpuacct:/path" and "N:cpuset:/path" for v1), from the cgroup file systems mounted under
/// `root`: v2's at root itself, v1's at root/<controllers> ("cpu", "cpu,cpuacct", "cpuset"). A
/// group the process names but the mount does not hold (a container that sees its own group as
/// the root) is read at the root. Text that is not a limit counts as none.
CpuLimits read_cpu_limits(const std::string& membership, const std::string& root);
/// The same for this process (/proc/self/cgroup, /sys/fs/cgroup).
CpuLimits this_process_cpu_limits();

/// The CPUs a list such as "0-3,8-11" names; 0 for text that is not one.
int cpu_list_count(const std::string& text);

}  // namespace twins::cgroup

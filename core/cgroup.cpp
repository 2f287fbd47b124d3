#include "core/cgroup.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <sstream>
#include <vector>

namespace twins::cgroup {

namespace {

std::string first_line(const std::string& file) {
  std::ifstream in(file);
  std::string line;
  std::getline(in, line);
  return line;
}

// Cores of CPU time a quota of `quota` per `period` microseconds allows, rounded up; 0: no quota.
int quota_cores(double quota, double period) {
  if (!(quota > 0) || !(period > 0)) return 0;
  return static_cast<int>(std::min(1e6, std::max(1.0, std::ceil(quota / period))));
}

// A group, then each parent, then the hierarchy's root (""): "/a/b", "/a", "".
std::vector<std::string> group_and_parents(std::string group) {
  std::vector<std::string> dirs;
  while (!group.empty() && group != "/") {
    dirs.push_back(group);
    group.resize(group.find_last_of('/') == std::string::npos ? 0 : group.find_last_of('/'));
  }
  dirs.emplace_back();
  return dirs;
}

struct Membership {
  bool v2 = false;
  std::string v2_group;
  // v1: where the hierarchy holding the controller is mounted ("" when none is), and the group.
  std::string cpu_mount, cpu_group, cpuset_mount, cpuset_group;
};

bool has_controller(const std::string& controllers, const std::string& name) {
  std::istringstream in(controllers);
  for (std::string c; std::getline(in, c, ',');)
    if (c == name) return true;
  return false;
}

// v1 mounts a hierarchy at root/<its controllers> ("cpu,cpuacct"), often with a link named after
// each controller ("cpu").
std::string v1_mount(const std::string& root, const std::string& controllers, const std::string& name) {
  std::error_code ec;
  for (const std::string& dir : {root + "/" + controllers, root + "/" + name})
    if (std::filesystem::is_directory(dir, ec)) return dir;
  return "";
}

Membership parse(const std::string& membership, const std::string& root) {
  Membership m;
  std::istringstream in(membership);
  for (std::string line; std::getline(in, line);) {
    const size_t a = line.find(':'), b = a == std::string::npos ? a : line.find(':', a + 1);
    if (b == std::string::npos) continue;
    const std::string id = line.substr(0, a), controllers = line.substr(a + 1, b - a - 1), group = line.substr(b + 1);
    if (id == "0" && controllers.empty()) {
      m.v2 = true, m.v2_group = group;
      continue;
    }
    if (has_controller(controllers, "cpu")) m.cpu_mount = v1_mount(root, controllers, "cpu"), m.cpu_group = group;
    if (has_controller(controllers, "cpuset"))
      m.cpuset_mount = v1_mount(root, controllers, "cpuset"), m.cpuset_group = group;
  }
  return m;
}

}  // namespace

int cpu_list_count(const std::string& text) {
  int count = 0;
  std::istringstream in(text);
  for (std::string part; std::getline(in, part, ',');) {
    if (part.empty() || part == "\n") continue;
    char* end = nullptr;
    const long first = std::strtol(part.c_str(), &end, 10);
    if (end == part.c_str()) return 0;
    long last = first;
    if (*end == '-') {
      const char* from = end + 1;
      last = std::strtol(from, &end, 10);
      if (end == from) return 0;
    }
    if (*end != '\0' && *end != '\n') return 0;
    if (first < 0 || last < first || last - first > 1000000) return 0;
    count += static_cast<int>(last - first + 1);
  }
  return count;
}

CpuLimits read_cpu_limits(const std::string& membership, const std::string& root) {
  const Membership m = parse(membership, root);
  CpuLimits limits;
  auto take = [&limits](int cores) {
    if (cores > 0) limits.quota_cores = limits.quota_cores == 0 ? cores : std::min(limits.quota_cores, cores);
  };
  if (m.v2)
    for (const std::string& dir : group_and_parents(m.v2_group)) {
      std::istringstream in(first_line(root + dir + "/cpu.max"));  // "max 100000" or "150000 100000"
      std::string quota;
      double period = 0;
      if (in >> quota >> period && quota != "max") take(quota_cores(std::strtod(quota.c_str(), nullptr), period));
    }
  if (!m.cpu_mount.empty())
    for (const std::string& dir : group_and_parents(m.cpu_group)) {
      std::ifstream quota_in(m.cpu_mount + dir + "/cpu.cfs_quota_us"),
          period_in(m.cpu_mount + dir + "/cpu.cfs_period_us");
      double quota = 0, period = 0;  // quota -1: none
      if (quota_in >> quota && period_in >> period) take(quota_cores(quota, period));
    }

  std::vector<std::string> cpusets;  // the most specific first
  if (m.v2)
    for (const std::string& dir : group_and_parents(m.v2_group))
      cpusets.push_back(root + dir + "/cpuset.cpus.effective");
  if (!m.cpuset_mount.empty())
    for (const std::string& dir : group_and_parents(m.cpuset_group))
      for (const char* file : {"/cpuset.effective_cpus", "/cpuset.cpus"})
        cpusets.push_back(m.cpuset_mount + dir + file);
  for (const std::string& file : cpusets)
    if (const int n = cpu_list_count(first_line(file)); n > 0) {
      limits.cpuset_cores = n;
      break;
    }
  return limits;
}

CpuLimits this_process_cpu_limits() {
  std::ifstream in("/proc/self/cgroup");
  const std::string membership((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return read_cpu_limits(membership, "/sys/fs/cgroup");
}

}  // namespace twins::cgroup

#include "train/run_log.h"

#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <optional>
#include <sstream>
#include <string_view>

#include "core/tensorboard.h"

namespace twins::train::detail {
namespace fs = std::filesystem;
using nlohmann::json;
using Clock = std::chrono::steady_clock;

namespace {
double since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// A resumed run's metrics.jsonl without what the run before it logged past its checkpoint: step
// lines from `first_step` on, epoch lines from `first_epoch` on; the summaries of earlier
// invocations stay. A line torn by a crash goes, except the whole line that an earlier version's
// resume appended right after the tear; every line ends in a newline. Rewritten (atomically) only
// when something changes.
void drop_lines_after(const std::string& path, int64_t first_step, int64_t first_epoch) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return;
  std::ostringstream buffer;
  buffer << in.rdbuf();
  const std::string text = buffer.str();
  std::error_code size_error;  // (a read error only ends the copy early: told by the size)
  if (text.size() != fs::file_size(path, size_error) || size_error)
    throw std::runtime_error("could not read " + path + " (to drop the lines logged after its checkpoint)");
  auto integer = [](const json& j, const char* key) {
    return j.contains(key) && j[key].is_number_integer() ? std::optional<int64_t>(j[key].get<int64_t>()) : std::nullopt;
  };
  std::string kept;
  bool changed = !text.empty() && text.back() != '\n';
  for (size_t begin = 0; begin < text.size();) {
    const size_t end = std::min(text.find('\n', begin), text.size());
    std::string_view line(text.data() + begin, end - begin);
    begin = end + 1;
    json j = json::parse(line, nullptr, false);
    if (!j.is_object()) {
      changed = true;
      for (size_t at = line.find('{', 1); at != std::string_view::npos; at = line.find('{', at + 1))
        if (json tail = json::parse(line.substr(at), nullptr, false); tail.is_object()) {
          j = std::move(tail), line = line.substr(at);
          break;
        }
      if (!j.is_object()) continue;
    }
    bool keep = true;
    if (!j.contains("summary")) {
      if (j.contains("epoch_seconds"))
        keep = integer(j, "epoch").value_or(first_epoch) < first_epoch;
      else if (const auto step = integer(j, "step"))
        keep = *step < first_step;
    }
    if (keep)
      kept.append(line).push_back('\n');
    else
      changed = true;
  }
  if (changed) io::write_file_atomic(path, kept);
}
}  // namespace

std::string format_duration(double s) {
  const int64_t t = static_cast<int64_t>(s);
  std::ostringstream o;
  if (t >= 3600)
    o << t / 3600 << "h" << std::setw(2) << std::setfill('0') << (t % 3600) / 60 << "m";
  else
    o << t / 60 << "m" << std::setw(2) << std::setfill('0') << t % 60 << "s";
  return o.str();
}

RunLog::RunLog(fs::path out_dir, bool writer, bool progress, bool tensorboard, int64_t first_step,
               int64_t resumed_epoch)
    : out_dir_(std::move(out_dir)),
      writer_(writer),
      progress_(progress && writer),
      start_(Clock::now()),
      window_start_(start_) {
  tty_ = progress_ && ::isatty(STDERR_FILENO);
  if (!writer_) return;
  fs::create_directories(out_dir_);
  const std::string metrics = (out_dir_ / "metrics.jsonl").string();
  if (resumed_epoch >= 0) drop_lines_after(metrics, first_step, resumed_epoch);
  metrics_ = std::make_unique<io::AppendFile>(metrics);
  if (tensorboard) events_ = std::make_unique<::twins::detail::EventFile>(out_dir_.string(), first_step);
}

RunLog::~RunLog() = default;

void RunLog::write_config(const json& config) const {
  if (writer_) io::write_file_atomic((out_dir_ / "config.json").string(), config.dump(2) + "\n");
}

void RunLog::append(const json& line) {
  if (!writer_) return;
  metrics_->append(line.dump() + "\n");
  if (!events_ || !line.contains("step") || !line["step"].is_number_integer()) return;
  const std::string group = line.contains("epoch_seconds") ? "epoch/" : "train/";
  std::vector<std::pair<std::string, double>> scalars;
  for (const auto& [key, value] : line.items())
    if (key != "step" && value.is_number()) scalars.emplace_back(group + key, value.get<double>());
  events_->scalars(line["step"].get<int64_t>(), scalars);
}

void RunLog::sync() {
  if (!writer_) return;
  metrics_->sync();
  if (events_) events_->sync();
}

void RunLog::count(int64_t images, double data_wait_seconds, int64_t skipped) {
  skipped_ = skipped;
  images_ += images, window_images_ += images;
  wait_ += data_wait_seconds, window_wait_ += data_wait_seconds;
}

double RunLog::seconds() const { return since(start_) - left_out_; }

void RunLog::leave_out(double seconds) {
  left_out_ += seconds;
  window_start_ += std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
}
double RunLog::data_wait_fraction() const { return wait_ / std::max(1e-9, seconds()); }

double RunLog::peak_rss_mb() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::stod(line.substr(6)) / 1024.0;
  return 0;
}

void RunLog::step(const StepResult& r, const RunPosition& p) {
  const double window = std::max(1e-9, since(window_start_));
  json line = {{"step", r.step}, {"epoch", p.epoch}, {"lr", r.lr}, {"loss", r.loss}};
  for (const auto& [name, value] : r.terms) line[name] = value;
  const double rate = static_cast<double>(window_images_) / window;
  line["images_per_s"] = rate;
  line["data_wait"] = window_wait_ / window;
  line["peak_rss_mb"] = peak_rss_mb();
  if (r.tau) line["tau"] = *r.tau;
  if (r.skipped) line["skipped"] = true;
  if (skipped_ > 0) line["skipped_samples"] = skipped_;
  append(line);
  if (progress_) {
    const double per_step = seconds() / static_cast<double>(std::max<int64_t>(1, p.step - p.start_step));
    std::ostringstream s;
    s << "epoch " << p.epoch + 1 << "/" << p.epochs << " step " << p.epoch_step << "/" << p.steps_per_epoch << " ["
      << p.step << "/" << p.max_steps << "] " << std::fixed << std::setprecision(0) << rate << " img/s  loss "
      << std::setprecision(4) << r.loss << "  data " << std::setprecision(0) << 100 * window_wait_ / window << "%  ETA "
      << format_duration(static_cast<double>(p.max_steps - p.step) * per_step);
    if (tty_)
      std::cerr << "\r" << s.str() << "\033[K" << std::flush, line_open_ = true;
    else
      std::cerr << s.str() << "\n";
  }
  window_images_ = 0, window_wait_ = 0, window_start_ = Clock::now();
}

void RunLog::end_progress() {
  if (line_open_) std::cerr << "\n";
  line_open_ = false;
}

void RunLog::say(const std::string& text) {
  if (!progress_) return;
  end_progress();
  std::cerr << text << "\n";
}

}  // namespace twins::train::detail

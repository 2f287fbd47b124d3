#include "twins/train/recipe.h"

#include <algorithm>

#include "twins/config.h"
#include "twins/losses.h"
#include "twins/registry.h"
#include "twins/runtime.h"

namespace twins::train {

using config::ConfigReader;
using config::require;
using nlohmann::json;

namespace {

// A config section, or an empty object. `key` is a char* so that no temporary std::string is passed
// (gcc 14's -Wdangling-reference suspects the returned reference of outliving one).
const json& section(const json& root, const char* key) {
  static const json empty = json::object();
  return root.contains(key) ? root.at(key) : empty;
}

}  // namespace

Precision parse_precision(const std::string& name, const std::string& path) {
  if (name == "auto") return Precision::automatic;
  if (name == "fp32") return Precision::fp32;
  if (name == "bf16") return Precision::bf16;
  if (name == "fp16") return Precision::fp16;
  throw std::invalid_argument(path + ": must be auto, fp32, bf16 or fp16, got \"" + name + "\"");
}

const char* to_string(Precision p) {
  switch (p) {
    case Precision::automatic: return "auto";
    case Precision::fp32: return "fp32";
    case Precision::bf16: return "bf16";
    case Precision::fp16: return "fp16";
  }
  return "?";
}

Precision resolve_precision(Precision p, bool cuda) {
  return p == Precision::automatic ? (cuda ? Precision::bf16 : Precision::fp32) : p;
}

int Recipe::in_channels() const { return backbone.is_object() ? backbone.value("in_channels", 3) : 3; }

Recipe Recipe::parse(const json& root) {
  Recipe r;
  r.resolved = root;
  ConfigReader top(root, "");
  for (const auto& item : root.items())
    if (!item.key().empty() && item.key()[0] == '_') top.allow(item.key());
  for (const char* key : {"data", "views", "model", "loss"}) {
    top.allow(key);
    require(root.contains(key), key, "required");
  }
  r.data = root.at("data");
  r.views = root.at("views");
  r.loss = root.at("loss");
  // The loss is the method; "method" may repeat it.
  const auto loss = losses::create_loss(r.loss, "loss");
  r.method = loss->name();
  if (root.contains("method")) {
    std::string method;
    top.get("method", method);
    require(method == r.method, "loss.type", "\"" + r.method + "\" does not match method \"" + method + "\"");
  }
  top.allow("method");
  const losses::LossNeeds needs = loss->needs();

  ConfigReader model(root.at("model"), "model");
  model.allow("backbone"), model.allow("projector"), model.allow("predictor");
  model.get("backbone_init", r.backbone_init);
  model.finish();
  require(root["model"].contains("backbone"), "model.backbone", "required");
  require(root["model"].contains("projector"), "model.projector", "required");
  r.backbone = root["model"]["backbone"];
  r.projector = root["model"]["projector"];
  if (root["model"].contains("predictor") && !root["model"]["predictor"].is_null())
    r.predictor = root["model"]["predictor"];
  require(!needs.predictor || !r.predictor.is_null(), "model.predictor", loss->title() + " needs a predictor");
  require(needs.predictor || r.predictor.is_null(), "model.predictor", loss->title() + " has no predictor");

  top.allow("byol");
  if (root.contains("byol")) {
    require(needs.momentum_target, "byol", loss->title() + " has no momentum target (byol.tau_base sets its decay)");
    ConfigReader b(root["byol"], "byol");
    b.get("tau_base", r.tau_base);
    b.finish();
    require(r.tau_base >= 0 && r.tau_base <= 1, "byol.tau_base", "must be in [0, 1]");
  }

  top.allow("optimizer");
  {
    const json& j = section(root, "optimizer");
    ConfigReader o(j, "optimizer");
    auto& c = r.optimizer;
    o.get("type", c.type);
    o.get("base_lr", c.base_lr);
    o.get("bias_base_lr", c.bias_base_lr);
    o.get("weight_decay", c.weight_decay);
    o.get("momentum", c.momentum);
    o.get("eta", c.eta);
    o.get("clip", c.clip);
    o.get("exclude_1d", c.exclude_1d);
    o.get("betas", c.betas);
    o.get("eps", c.eps);
    o.get("fixed_predictor_lr", c.fixed_predictor_lr);
    o.get("lars_variant", c.lars_variant);
    o.get("lars_eps", c.lars_eps);
    o.get("lars_exclude", c.lars_exclude);
    o.finish();
    require(c.lars_variant == "official" || c.lars_variant == "solo_learn", "optimizer.lars_variant",
            "must be official or solo_learn, got \"" + c.lars_variant + "\"");
    require(c.lars_exclude == "1d" || c.lars_exclude == "zero_weight_decay", "optimizer.lars_exclude",
            "must be 1d or zero_weight_decay, got \"" + c.lars_exclude + "\"");
    require(c.lars_eps >= 0, "optimizer.lars_eps", "must be >= 0");
    const auto names = optimizer_names();
    require(std::find(names.begin(), names.end(), c.type) != names.end(), "optimizer.type",
            "must be " + one_of(names) + ", got \"" + c.type + "\"");
    require(!c.fixed_predictor_lr || needs.predictor, "optimizer.fixed_predictor_lr",
            loss->title() + " has no predictor");
    require(c.base_lr > 0, "optimizer.base_lr", "must be > 0");
    require(c.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0");
    require(c.momentum >= 0 && c.momentum < 1, "optimizer.momentum", "must be in [0, 1)");
    require(c.eta > 0, "optimizer.eta", "must be > 0");
    require(c.betas.size() == 2, "optimizer.betas", "needs two values");
  }
  top.allow("schedule");
  {
    ConfigReader s(section(root, "schedule"), "schedule");
    s.get("warmup_epochs", r.schedule.warmup_epochs);
    s.get("final_lr_ratio", r.schedule.final_lr_ratio);
    s.get("warmup_start_lr", r.schedule.warmup_start_lr);
    s.finish();
    require(r.schedule.warmup_epochs >= 0 && r.schedule.warmup_epochs <= 1e6, "schedule.warmup_epochs",
            "must be in [0, 10^6]");
    require(r.schedule.warmup_start_lr >= 0, "schedule.warmup_start_lr", "must be >= 0");
    require(r.schedule.final_lr_ratio >= 0 && r.schedule.final_lr_ratio <= 1, "schedule.final_lr_ratio",
            "must be in [0, 1]");
  }
  top.allow("online_probe");
  {
    const json& j = section(root, "online_probe");
    ConfigReader p(j, "online_probe");
    p.get("enabled", r.probe.enabled);
    p.get("lr", r.probe.lr);
    p.get("weight_decay", r.probe.weight_decay);
    p.allow("eval_data");
    p.allow("knn");
    p.finish();
    if (j.contains("eval_data")) r.probe.eval_data = j.at("eval_data");
    require(r.probe.lr > 0, "online_probe.lr", "must be > 0");
    if (j.contains("knn")) {
      KnnMonitorConfig& m = r.probe.knn;
      ConfigReader k(j.at("knn"), "online_probe.knn");
      m.enabled = true;
      k.get("enabled", m.enabled);
      eval::read_knn_options(k, m.options);
      k.get("every_epochs", m.every_epochs);
      k.get("bank_size", m.bank_size);
      k.allow("bank_data");
      k.finish();
      if (j.at("knn").contains("bank_data")) m.bank_data = j.at("knn").at("bank_data");
      require(m.every_epochs >= 1, "online_probe.knn.every_epochs", "must be >= 1");
      require(m.bank_size >= 0, "online_probe.knn.bank_size", "must be >= 0 (0: all of the bank data)");
      require(!m.enabled || !r.probe.eval_data.is_null(), "online_probe.knn",
              "needs online_probe.eval_data, the labelled data it classifies (e.g. the test split)");
    }
  }
  top.allow("train");
  {
    ConfigReader t(section(root, "train"), "train");
    auto& c = r.train;
    t.get("epochs", c.epochs);
    t.get("max_steps", c.max_steps);
    t.get("batch_size", c.batch_size);
    t.get_or_auto("workers", c.workers, kAutoWorkers, 0, 256);
    t.get("device", c.device);
    t.get("seed", c.seed);
    t.get("log_every", c.log_every);
    t.get("checkpoint_every_steps", c.checkpoint_every_steps);
    t.get("checkpoint_every_epochs", c.checkpoint_every_epochs);
    t.get("keep_checkpoints", c.keep_checkpoints);
    t.get("deterministic", c.deterministic);
    std::string precision = to_string(c.precision);
    t.get("precision", precision);
    c.precision = parse_precision(precision, "train.precision");
    t.get("channels_last", c.channels_last);
    t.get("float32_matmul_precision", c.float32_matmul_precision);
    t.get("threads", c.threads);
    t.get("sync_batchnorm", c.sync_batchnorm);
    t.get("dist_backend", c.dist_backend);
    t.get("dist_timeout_s", c.dist_timeout_s);
    t.get("dist_heartbeat_timeout_s", c.dist_heartbeat_timeout_s);
    t.get("bucket_mb", c.bucket_mb);
    t.get("grad_accumulation", c.grad_accumulation);
    t.get("grad_cache", c.grad_cache);
    t.get("cuda_graph", c.cuda_graph);
    t.get("tensorboard", c.tensorboard);
    t.finish();
    // Ranges that keep every step count of the run far inside 64 bits.
    require(c.epochs >= 1 && c.epochs <= 1000000, "train.epochs", "must be in [1, 10^6]");
    require(c.max_steps >= 0 && c.max_steps <= (int64_t{1} << 40), "train.max_steps", "must be in [0, 2^40]");
    require(c.batch_size >= 2 && c.batch_size <= (1 << 20), "train.batch_size",
            "must be in [2, 2^20] (the losses use batch statistics)");
    require(c.workers == kAutoWorkers || (c.workers >= 0 && c.workers <= 256), "train.workers",
            "must be in [0, 256] or \"auto\"");
    require(c.log_every >= 1, "train.log_every", "must be >= 1");
    require(c.checkpoint_every_steps >= 0, "train.checkpoint_every_steps", "must be >= 0");
    require(c.checkpoint_every_epochs >= 0, "train.checkpoint_every_epochs", "must be >= 0");
    require(c.keep_checkpoints >= 1 && c.keep_checkpoints <= 1000, "train.keep_checkpoints", "must be in [1, 1000]");
    require(c.threads >= 0 && c.threads <= 4096, "train.threads", "must be in [0, 4096]");
    check_float32_matmul_precision(c.float32_matmul_precision, "train.float32_matmul_precision");
    require(c.dist_backend == "auto" || c.dist_backend == "nccl" || c.dist_backend == "gloo", "train.dist_backend",
            "must be auto, nccl or gloo, got \"" + c.dist_backend + "\"");
    require(c.dist_timeout_s > 0 && c.dist_timeout_s <= 1e7, "train.dist_timeout_s", "must be in (0, 10^7]");
    require(c.dist_heartbeat_timeout_s == 0 || (c.dist_heartbeat_timeout_s >= 5 && c.dist_heartbeat_timeout_s <= 1e7),
            "train.dist_heartbeat_timeout_s", "must be 0 (off) or in [5, 10^7] seconds (heartbeats come every 2 s)");
    require(c.bucket_mb > 0 && c.bucket_mb <= 1e5, "train.bucket_mb", "must be in (0, 10^5]");
    require(c.grad_accumulation >= 1 && c.grad_accumulation <= 65536, "train.grad_accumulation",
            "must be in [1, 65536]");
  }
  top.finish();
  return r;
}

}  // namespace twins::train

#pragma once
// The evaluation commands as library calls: an eval config names the train and test datasets,
// the image size and normalisation, and the probe and kNN settings:
// {"train_data": {...}, "test_data": {...}, "image_size": 32,
//  "normalize": {"mean": [...], "std": [...]},
//  "probe": {"epochs": 100, "batch_size": 256, "lr": 0.1, "weight_decay": 0, "momentum": 0.9,
//            "seed": 0, "augment": false, "crop_scale": [0.08, 1.0], "checkpoint_every_steps": 0},
//  "knn": {"k": [10, 20, 100, 200], "temperature": 0.07, "variant": "dino" | "lightly"},
//  "finetune": {"epochs": 20, "batch_size": 256, "lr_backbone": 0.03, "lr_head": 0.08,
//               "weight_decay": 0, "momentum": 0.9, "train_percent": 100, "subset": "<file>",
//               "crop_scale": [0.08, 1.0], "precision": "fp32", "seed": 0, "eval_every_epochs": 0,
//               "checkpoint_every_steps": 0},
//  "batch_size": 256, "workers": 2 | "auto", "device": "auto", "dist_backend": "auto",
//  "dist_timeout_s": 1800, "dist_heartbeat_timeout_s": 60, "features_save_every_s": 10}
// Features are extracted once per backbone and split and cached in the output folder
// (features-<split>-<key>.safetensors), so linear-probe and knn on the same backbone share them.
// A single process extracting them keeps the rows done in <that file>.partial (its state in
// .partial.json, saved every features_save_every_s seconds), each of several ranks its share's in
// <that file>.rank<r>-of-<W>.partial: the same command, killed, continues.
#include <nlohmann/json.hpp>

#include <atomic>
#include <memory>
#include <string>

#include "twins/eval/features.h"
#include "twins/eval/finetune.h"
#include "twins/eval/probe.h"
#include "twins/models/network.h"

namespace twins::eval {

struct EvalConfig {
  nlohmann::json train_data, test_data;
  int image_size = 224;
  augment::Normalization normalization;
  LinearProbeOptions probe;
  KnnOptions knn;
  FinetuneOptions finetune;
  int64_t batch_size = 256;
  /// Loader threads; "auto" (kAutoWorkers): see twins::loader_workers.
  int workers = 2;
  std::string device = "auto";
  /// How often a single process extracting features for the cache saves how far it got (0: after
  /// every batch; each save waits for the disk).
  double features_save_every_s = 10;
  /// With several ranks (--nproc-per-node, torchrun, SLURM): the backend ("auto": NCCL on CUDA,
  /// else Gloo) and the time after which a collective waiting for a dead or hung rank fails.
  std::string dist_backend = "auto";
  double dist_timeout_s = 1800;
  /// A rank that fails, or whose heartbeats stop for this long, stops the others within seconds
  /// (0: only dist_timeout_s), as train.dist_heartbeat_timeout_s.
  double dist_heartbeat_timeout_s = 60;
  static EvalConfig parse(const nlohmann::json& config);
};

/// Train and test features of `backbone` (a file, a run folder, or "random:<backbone json>" for
/// a randomly initialised network), cached in `cache_dir` when not empty. With a communicator of
/// several ranks each extracts its share (as extract_features_shared; with a cache, kept on disk
/// as it comes) and rank 0 alone gets the features, looks for and writes the cache; the other
/// ranks get empty Features. Every rank must call it.
std::pair<Features, Features> eval_features(const std::string& backbone, const EvalConfig& config,
                                            const std::string& cache_dir, int64_t* num_classes,
                                            const std::shared_ptr<distributed::Communicator>& communicator = nullptr);

/// The same with a backbone already open.
std::pair<Features, Features> eval_features(models::Network& backbone, const EvalConfig& config,
                                            const std::string& cache_dir, int64_t* num_classes,
                                            const std::shared_ptr<distributed::Communicator>& communicator = nullptr);

/// `twins linear-probe` as a library call: features, then the probe by the protocol that
/// config.probe.augment names.
struct LinearProbeRun {
  LinearProbeResult result;
  /// Which protocol produced the numbers, for probe.json and the output.
  std::string protocol;
  /// The centre-crop features (what the classifier is scored on).
  Features train, test;
  int64_t num_classes = 0;
  /// Seconds this call spent on the centre-crop features: extracting them, or reading them from
  /// the cache (probe.json's feature_seconds; not in result.seconds).
  double feature_seconds = 0;
  /// false on the ranks other than 0 of a data-parallel run: they extracted their shares of
  /// the features, and rank 0 alone trains and scores the probe (the rest is empty).
  bool main_rank = true;
  /// probe.augment's classifier: weight [C, D] and bias [C] (CPU, float32) over the features
  /// standardised with the centre-crop training features' statistics (undefined otherwise).
  at::Tensor head_weight, head_bias;
  /// False when LinearProbeControl::stop_after_epochs or stop stopped probe.augment before its
  /// end (nothing scored); the epoch this call started from (the checkpoint's), and the epochs
  /// done in all.
  bool finished = true;
  int64_t start_epoch = 0, epochs_done = 0;
  /// Where in an epoch this call started (a checkpoint written mid-epoch), and where it stopped
  /// (LinearProbeControl::stop): the batches of epoch start_epoch + 1 / epochs_done + 1 done before.
  int64_t start_batch = 0, stopped_at_batch = 0;
};

/// How one call of run_linear_probe runs (not part of the protocol). Only probe.augment keeps
/// state, its epochs each taking the training set through the backbone; the probe on cached
/// features takes seconds to minutes and starts over.
struct LinearProbeControl {
  /// Where probe.augment's classifier, optimizer and place are kept after every epoch, every
  /// probe.checkpoint_every_steps batches and when stopped (written atomically by rank 0); empty:
  /// nowhere. A file there from the same backbone and settings is resumed from where it was
  /// written (mid-epoch too), with the result an uninterrupted run gives; one from other settings
  /// is an error naming it. The caller removes it once it has kept the results.
  std::string checkpoint;
  /// Stop probe.augment after this many epochs of this call, checkpointed (0: run to the end).
  int64_t stop_after_epochs = 0;
  /// A stop request (a signal handler's flag), or null: read after every batch of probe.augment
  /// (with ranks sharing its epochs on CUDA: after every 16th batch of the run and each epoch's
  /// last); once it is set on any rank, every rank stops after the same batch, checkpointed
  /// there, and the run returns unfinished (unless that batch was the last). Not read while the
  /// centre-crop features are extracted: a request then takes effect after the first batch the
  /// ranks agree at (one process, or on the CPU: the first).
  const std::atomic<bool>* stop = nullptr;
};
LinearProbeRun run_linear_probe(const std::string& backbone, const EvalConfig& config, const std::string& cache_dir,
                                const std::shared_ptr<distributed::Communicator>& communicator = nullptr,
                                const LinearProbeControl& control = {});

/// Loads a backbone path, or builds "random:<backbone JSON>" or "random:<recipe file>" (its
/// model.backbone) with seed 0: the random-initialisation baseline.
std::shared_ptr<models::Network> open_backbone(const std::string& backbone);

/// CRC-32 of a backbone's tensors and their names: what identifies its weights in the feature
/// cache and in fine-tuning checkpoints.
uint32_t backbone_checksum(const models::Network& backbone);

/// twins::resolve_device(name, "device").
at::Device resolve_eval_device(const std::string& name);

}  // namespace twins::eval

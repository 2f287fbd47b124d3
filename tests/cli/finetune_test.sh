#!/usr/bin/env bash
# `twins finetune` as a user runs it: 10% of the labels through --train-percent, a file list
# through --subset, the files it writes (the fine-tuned backbone loads in `twins knn`), a stopped
# run continued by the same command (after an epoch; within one after SIGTERM or SIGKILL), on 2
# data-parallel ranks (--nproc-per-node 2, stopped and continued; knn and linear-probe too), and
# its errors (a value out of range: exit 2; a list naming no sample: exit 1, naming the line).
set -euo pipefail
twins=$1
quickstart=$2
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT

# Random 28x28 grey images, labels 0-9 (sample i has label i % 10), as uncompressed IDX files:
# 200 for training, 50 for testing.
byte() { printf '%b' "\\x$(printf %02x "$1")"; }
idx() {  # prefix count (< 256)
  { printf '\x00\x00\x08\x03\x00\x00\x00'; byte "$2"; printf '\x00\x00\x00\x1c\x00\x00\x00\x1c'
    head -c $(($2 * 784)) /dev/urandom; } > "$dir/$1-images-idx3-ubyte"
  { printf '\x00\x00\x08\x01\x00\x00\x00'; byte "$2"
    for ((i = 0; i < $2; i++)); do byte $((i % 10)); done; } > "$dir/$1-labels-idx1-ubyte"
}
idx train 200
idx t10k 50
cat > "$dir/eval.json" <<JSON
{"train_data": {"type": "fashion_mnist", "root": "$dir", "split": "train"},
 "test_data": {"type": "fashion_mnist", "root": "$dir", "split": "test"},
 "image_size": 28, "normalize": {"mean": [0.5], "std": [0.3]},
 "finetune": {"epochs": 2, "batch_size": 8, "lr_backbone": 0.01, "lr_head": 0.05},
 "knn": {"k": [5]}, "batch_size": 32, "workers": 1, "device": "cpu"}
JSON

# 1. 10% of each class: 2 of the 20 samples of each of the 10 classes.
"$twins" finetune --backbone "random:$quickstart" --config "$dir/eval.json" --train-percent 10 --out "$dir/ft" \
  > "$dir/out1" 2> "$dir/err1" || { cat "$dir/out1" "$dir/err1"; exit 1; }
grep -q "^finetune: top-1 [0-9.]*%, top-5 [0-9.]*% (fine-tuned backbone, 20 training samples (10% of each class)" \
  "$dir/out1" || { cat "$dir/out1" "$dir/err1"; exit 1; }
for key in '"train_samples": 20' '"train_percent": 10.0' '"test_samples": 50' '"epochs": 2' '"top1":' '"epoch_loss":'; do
  grep -q "$key" "$dir/ft/finetune.json" || { echo "finetune.json lacks $key"; cat "$dir/ft/finetune.json"; exit 1; }
done
[ -s "$dir/ft/finetune-head.safetensors" ] || { echo "no finetune-head.safetensors"; exit 1; }
# The fine-tuned backbone is a backbone file like any other.
"$twins" knn --backbone "$dir/ft/finetuned-backbone.safetensors" --config "$dir/eval.json" --out "$dir/knn" \
  > "$dir/knn.out" 2>&1 || { cat "$dir/knn.out"; exit 1; }
grep -q "^kNN k=5" "$dir/knn.out" || { cat "$dir/knn.out"; exit 1; }

# 2. The samples a file names (ids as `twins embed` writes them, or their file names).
printf '%s\n' "train-images-idx3-ubyte#0" "train-images-idx3-ubyte#11" "$dir/train-images-idx3-ubyte#22" > "$dir/list.txt"
"$twins" finetune --backbone "random:$quickstart" --config "$dir/eval.json" --subset "$dir/list.txt" \
  --set finetune.epochs=1 --out "$dir/ft_list" > "$dir/out2" 2> "$dir/err2" || { cat "$dir/out2" "$dir/err2"; exit 1; }
grep -q '"train_samples": 3' "$dir/ft_list/finetune.json" || { cat "$dir/ft_list/finetune.json"; exit 1; }

# 3. Stopped after an epoch, then the same command again: it resumes, finishes, and removes its
#    checkpoint.
resume=(finetune --backbone "random:$quickstart" --config "$dir/eval.json" --train-percent 10 --out "$dir/ft_resume"
  --set finetune.eval_every_epochs=1)
"$twins" "${resume[@]}" --stop-after-epochs 1 > "$dir/out5" 2> "$dir/err5" || { cat "$dir/out5" "$dir/err5"; exit 1; }
if ! grep -q "stopped after epoch 1 of 2" "$dir/out5" || [ ! -s "$dir/ft_resume/finetune-checkpoint.safetensors" ] \
  || [ -e "$dir/ft_resume/finetune.json" ]; then cat "$dir/out5" "$dir/err5"; ls "$dir/ft_resume"; exit 1; fi
"$twins" "${resume[@]}" > "$dir/out6" 2> "$dir/err6" || { cat "$dir/out6" "$dir/err6"; exit 1; }
if ! grep -q "resuming from .*finetune-checkpoint.safetensors after epoch 1 of 2" "$dir/err6" \
  || ! grep -q '"resumed_from_epoch": 1' "$dir/ft_resume/finetune.json" \
  || ! grep -q '"best_epoch": [12]' "$dir/ft_resume/finetune.json" || ! grep -q "; best [0-9.]*% after epoch" "$dir/out6" \
  || [ -e "$dir/ft_resume/finetune-checkpoint.safetensors" ]; then cat "$dir/out6" "$dir/err6"; exit 1; fi
# The per-epoch log over both calls, and its TensorBoard run (a folder of its own, a file per call).
[ "$(grep -c '"test_top1"' "$dir/ft_resume/finetune-metrics.jsonl")" -eq 2 ] || { cat "$dir/ft_resume/finetune-metrics.jsonl"; exit 1; }
grep -q '^{"epoch":2,' "$dir/ft_resume/finetune-metrics.jsonl" || { cat "$dir/ft_resume/finetune-metrics.jsonl"; exit 1; }
[ "$(find "$dir/ft_resume/finetune" -name 'events.out.tfevents.*' | wc -l)" -eq 2 ] || { ls -R "$dir/ft_resume"; exit 1; }

# 3b. Within an epoch: SIGTERM (a scheduler's preemption) after batch 2 of 3 finishes the
#     batch, checkpoints there and exits 0; SIGKILL
#     after batch 5 with a checkpoint every 2 batches loses batch 5 only. The same command
#     continues each to the uninterrupted run's files.
mid=(finetune --backbone "random:$quickstart" --config "$dir/eval.json" --train-percent 10)
TWINS_FAULT="finetune_batch@#2:TERM" "$twins" "${mid[@]}" --out "$dir/ft_term" > "$dir/out11" 2> "$dir/err11" \
  || { cat "$dir/out11" "$dir/err11"; exit 1; }
if ! grep -q "stopped at batch 2 of epoch 1 of 2" "$dir/out11" || [ -e "$dir/ft_term/finetune.json" ] \
  || [ ! -s "$dir/ft_term/finetune-checkpoint.safetensors" ]; then cat "$dir/out11" "$dir/err11"; exit 1; fi
"$twins" "${mid[@]}" --out "$dir/ft_term" > "$dir/out12" 2> "$dir/err12" || { cat "$dir/out12" "$dir/err12"; exit 1; }
grep -q "resuming from .*finetune-checkpoint.safetensors at batch 2 of 3 in epoch 1 of 2" "$dir/err12" \
  || { cat "$dir/out12" "$dir/err12"; exit 1; }
rc=0
TWINS_FAULT="finetune_batch@#5" "$twins" "${mid[@]}" --set finetune.checkpoint_every_steps=2 --out "$dir/ft_kill" \
  > "$dir/out13" 2> "$dir/err13" || rc=$?
[ "$rc" -eq 137 ] || { echo "expected death by SIGKILL (137), got $rc"; cat "$dir/out13" "$dir/err13"; exit 1; }
"$twins" "${mid[@]}" --set finetune.checkpoint_every_steps=2 --out "$dir/ft_kill" > "$dir/out14" 2> "$dir/err14" \
  || { cat "$dir/out14" "$dir/err14"; exit 1; }
grep -q "resuming from .*finetune-checkpoint.safetensors at batch 1 of 3 in epoch 2 of 2" "$dir/err14" \
  || { cat "$dir/out14" "$dir/err14"; exit 1; }
for run in ft_term ft_kill; do
  for file in finetune-head.safetensors finetuned-backbone.safetensors; do
    cmp "$dir/ft/$file" "$dir/$run/$file" || { echo "$run: $file differs from the uninterrupted run's"; exit 1; }
  done
  [ ! -e "$dir/$run/finetune-checkpoint.safetensors" ] || { echo "$run kept its checkpoint"; exit 1; }
done

# 4. Two data-parallel ranks on this machine (Gloo): stopped after an epoch, then the same
#    command continues; rank 0 alone prints and writes.
ranks_section() {
  ranks=(finetune --nproc-per-node 2 --backbone "random:$quickstart" --config "$dir/eval.json" --train-percent 10
    --set dist_timeout_s=120 --out "$dir/ft_ranks")
  "$twins" "${ranks[@]}" --stop-after-epochs 1 > "$dir/out7" 2> "$dir/err7" || { cat "$dir/out7" "$dir/err7"; exit 1; }
  if [ "$(grep -c "stopped after epoch 1 of 2" "$dir/out7")" != 1 ] \
    || [ ! -s "$dir/ft_ranks/finetune-checkpoint.safetensors" ]; then cat "$dir/out7" "$dir/err7"; exit 1; fi
  "$twins" "${ranks[@]}" > "$dir/out8" 2> "$dir/err8" || { cat "$dir/out8" "$dir/err8"; exit 1; }
  if [ "$(grep -c "^finetune: top-1" "$dir/out8")" != 1 ] || ! grep -q "2 ranks x 4 images per batch" "$dir/out8" \
    || ! grep -q '"world_size": 2' "$dir/ft_ranks/finetune.json" \
    || ! grep -q '"resumed_from_epoch": 1' "$dir/ft_ranks/finetune.json"; then cat "$dir/out8" "$dir/err8"; exit 1; fi
  # SIGTERM to the whole job (launcher and ranks, as a scheduler or a terminal's Ctrl-C sends it;
  # each rank sends it in its first batch), which the launcher forwards to the ranks again: they
  # stop after that batch together, and the same command continues to the weights above.
  ranks_term=("${ranks[@]:0:${#ranks[@]}-2}" --out "$dir/ft_ranks_term")
  TWINS_FAULT="finetune_batch@#1:TERM" "$twins" "${ranks_term[@]}" > "$dir/out15" 2> "$dir/err15" \
    || { cat "$dir/out15" "$dir/err15"; exit 1; }
  if [ "$(grep -c "stopped at batch 1 of epoch 1 of 2" "$dir/out15")" != 1 ] \
    || [ "$(grep -c "stopping after this step, keeping the state" "$dir/err15")" != 1 ]; then
    cat "$dir/out15" "$dir/err15"; exit 1
  fi
  "$twins" "${ranks_term[@]}" > "$dir/out16" 2> "$dir/err16" || { cat "$dir/out16" "$dir/err16"; exit 1; }
  for file in finetune-head.safetensors finetuned-backbone.safetensors; do
    cmp "$dir/ft_ranks/$file" "$dir/ft_ranks_term/$file" || { echo "2 ranks: $file differs after SIGTERM"; exit 1; }
  done
  # kNN and the linear probe on 2 ranks: each extracts half the features, rank 0 scores and writes.
  for cmd in knn linear-probe; do
    "$twins" "$cmd" --nproc-per-node 2 --backbone "random:$quickstart" --config "$dir/eval.json" \
      --set dist_timeout_s=120 --set probe.epochs=2 --out "$dir/$cmd-ranks" > "$dir/$cmd.out" 2> "$dir/$cmd.err" \
      || { cat "$dir/$cmd.out" "$dir/$cmd.err"; exit 1; }
    if [ "$(grep -c "^kNN k=5\|^linear probe: top-1" "$dir/$cmd.out")" != 1 ] \
      || ! grep -q "extracting train features (200 images, 2 ranks)" "$dir/$cmd.err"; then
      cat "$dir/$cmd.out" "$dir/$cmd.err"; exit 1
    fi
  done
  if [ ! -s "$dir/knn-ranks/knn.json" ] || [ ! -s "$dir/linear-probe-ranks/probe.json" ]; then
    echo "no knn.json or probe.json"; exit 1
  fi
  for key in '"num_classes": 10' '"train_samples": 200' '"test_samples": 50' '"feature_dim": ' '"feature_seconds": ' \
    '"knn_seconds": '; do
    grep -q "$key" "$dir/knn-ranks/knn.json" || { echo "knn.json lacks $key"; cat "$dir/knn-ranks/knn.json"; exit 1; }
  done
  grep -q '"feature_seconds": ' "$dir/linear-probe-ranks/probe.json" || { cat "$dir/linear-probe-ranks/probe.json"; exit 1; }
  # The augmented linear probe stopped after an epoch on 2 ranks, continued by the same command.
  aug=(linear-probe --nproc-per-node 2 --backbone "random:$quickstart" --config "$dir/eval.json" --set dist_timeout_s=120
    --set probe.augment=true --set probe.epochs=2 --set probe.batch_size=8 --out "$dir/aug")
  "$twins" "${aug[@]}" --stop-after-epochs 1 > "$dir/aug1.out" 2> "$dir/aug1.err" || { cat "$dir/aug1.out" "$dir/aug1.err"; exit 1; }
  if ! grep -q "linear probe: stopped after epoch 1 of 2" "$dir/aug1.out" || [ -e "$dir/aug/probe.json" ] \
    || [ ! -s "$dir/aug/probe-checkpoint.safetensors" ]; then cat "$dir/aug1.out" "$dir/aug1.err"; exit 1; fi
  # SIGTERM to the job in the second epoch's first batch: stopped there, continued by the same command.
  TWINS_FAULT="probe_batch@#1:TERM" "$twins" "${aug[@]}" > "$dir/aug3.out" 2> "$dir/aug3.err" \
    || { cat "$dir/aug3.out" "$dir/aug3.err"; exit 1; }
  if ! grep -q "linear probe: stopped at batch 1 of epoch 2 of 2" "$dir/aug3.out" || [ -e "$dir/aug/probe.json" ] \
    || [ ! -s "$dir/aug/probe-checkpoint.safetensors" ]; then cat "$dir/aug3.out" "$dir/aug3.err"; exit 1; fi
  "$twins" "${aug[@]}" > "$dir/aug2.out" 2> "$dir/aug2.err" || { cat "$dir/aug2.out" "$dir/aug2.err"; exit 1; }
  if ! grep -q "resuming from .*probe-checkpoint.safetensors at batch 1 of [0-9]* in epoch 2 of 2" "$dir/aug2.err" \
    || ! grep -q '"resumed_from_epoch": 1' "$dir/aug/probe.json" || ! grep -q '"resumed_from_batch": 1' "$dir/aug/probe.json" \
    || [ -e "$dir/aug/probe-checkpoint.safetensors" ]; then
    cat "$dir/aug2.out" "$dir/aug2.err"; exit 1
  fi
  # A global batch the ranks cannot share evenly.
  status=0
  "$twins" finetune --nproc-per-node 2 --backbone "random:$quickstart" --config "$dir/eval.json" \
    --set finetune.batch_size=7 --out "$dir/bad" > /dev/null 2> "$dir/err9" || status=$?
  if [ "$status" = 0 ] || ! grep -q "finetune.batch_size: 7 is the global batch" "$dir/err9"; then
    echo "exit $status"; cat "$dir/err9"; exit 1
  fi
}
if "$twins" --version | grep -q '^collectives .*gloo'; then
  ranks_section
else
  echo "finetune, knn and linear-probe on 2 ranks: skipped (this twins was built without Gloo)"
fi
status=0  # only probe.augment keeps state between calls
"$twins" linear-probe --backbone "random:$quickstart" --config "$dir/eval.json" --stop-after-epochs 1 --out "$dir/bad" \
  > /dev/null 2> "$dir/err10" || status=$?
if [ "$status" != 2 ] || ! grep -q -- "--stop-after-epochs: only probe.augment" "$dir/err10"; then
  echo "exit $status"; cat "$dir/err10"; exit 1
fi

# 5. Errors.
status=0
"$twins" finetune --backbone "random:$quickstart" --config "$dir/eval.json" --train-percent 0 --out "$dir/bad" \
  > /dev/null 2> "$dir/err3" || status=$?
if [ "$status" != 2 ] || ! grep -q "finetune.train_percent" "$dir/err3"; then echo "exit $status"; cat "$dir/err3"; exit 1; fi
printf 'train-images-idx3-ubyte#0\nno-such-image.png\n' > "$dir/bad.txt"
status=0
"$twins" finetune --backbone "random:$quickstart" --config "$dir/eval.json" --subset "$dir/bad.txt" --out "$dir/bad" \
  > /dev/null 2> "$dir/err4" || status=$?
if [ "$status" != 1 ] || ! grep -q "bad.txt line 2: \"no-such-image.png\" names no sample of train_data" "$dir/err4"; then
  echo "exit $status"; cat "$dir/err4"; exit 1
fi
[ ! -e "$dir/bad/finetune.json" ] || { echo "a failed finetune wrote finetune.json"; exit 1; }
echo "finetune: --train-percent, --subset, the written files, 2 ranks and the errors ok"

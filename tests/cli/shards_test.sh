#!/usr/bin/env bash
# Tar shards end to end, as a user would: `twins shards create` from a dataset JSON file,
# `twins shards index`, then `twins pretrain` on the shards with 2 CPU ranks, stopped and resumed,
# on one rank through `pipe:cat` commands, `twins knn`, `linear-probe` and `embed` on the shards, and
# `twins finetune` on them stopped within an epoch on 2 ranks (refused on 1, continued on 2).
set -euo pipefail
twins=$1
quickstart=$2
# Most cases here run 2 CPU ranks (and later ones use their run), through Gloo: a twins built
# without it (against a LibTorch without Gloo's headers, as a PyTorch wheel may be) skips them
# (ctest: SKIP_RETURN_CODE).
if ! "$twins" --version | grep -q '^collectives .*gloo'; then
  echo "skipped: this twins was built without Gloo (CPU collectives)"
  exit 77
fi
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT

# 256 random 28x28 grey images with labels 0-9, as uncompressed IDX files, and a dataset JSON.
n=256
{ printf '\x00\x00\x08\x03\x00\x00\x01\x00\x00\x00\x00\x1c\x00\x00\x00\x1c'; head -c $((n * 784)) /dev/urandom; } \
  > "$dir/train-images-idx3-ubyte"
{ printf '\x00\x00\x08\x01\x00\x00\x01\x00'; for ((i = 0; i < n; i++)); do printf "\\x0$((i % 10))"; done; } \
  > "$dir/train-labels-idx1-ubyte"
echo "{\"type\": \"fashion_mnist\", \"root\": \"$dir\", \"split\": \"train\"}" > "$dir/dataset.json"

# 1. create: 8 shards of 32 samples, the index beside them, and the data block to use.
"$twins" shards create --input "$dir/dataset.json" --output "$dir/shards/train-%03d.tar" --max-count 32 \
  > "$dir/create.out" 2> "$dir/create.err"
grep -q "wrote 256 samples (10 classes) in 8 shard(s)" "$dir/create.out" || { cat "$dir/create.out" "$dir/create.err"; exit 1; }
grep -q "shards create: samples 256/256" "$dir/create.err" || { cat "$dir/create.err"; exit 1; }
grep -q "\"urls\":\"$dir/shards/train-{000..007}.tar\"" "$dir/create.out" || { cat "$dir/create.out"; exit 1; }
[ "$(tar tf "$dir/shards/train-000.tar" | head -2 | sed 's/^[0-9]*//' | tr '\n' ' ')" = ".png .cls " ] \
  || { tar tf "$dir/shards/train-000.tar" | head; exit 1; }

# 2. index: the same counts as the writer's index.
"$twins" shards index --urls "$dir/shards/train-{000..007}.tar" --output "$dir/index2.json" > "$dir/index.out" 2>&1
grep -q "indexed 8 shard(s): 256 samples, 10 classes" "$dir/index.out" || { cat "$dir/index.out"; exit 1; }
cmp <(grep -v '"bytes"' "$dir/index2.json") <(grep -v '"bytes"' "$dir/shards/train-index.json") \
  || { diff "$dir/index2.json" "$dir/shards/train-index.json"; exit 1; }

# 3. pretrain on the shards, 2 ranks, stopped after 2 steps and resumed (4 steps per epoch:
#    256 samples / 2 ranks / 32 per batch).
data="{\"type\": \"shards\", \"urls\": \"$dir/shards/train-{000..007}.tar\", \"index\": \"$dir/shards/train-index.json\", \"shuffle_buffer\": 64}"
common=(--config "$quickstart" --set "data=$data" --set train.batch_size=32 --set train.threads=1
        --set train.workers=1 --set train.log_every=1 --set online_probe.eval_data=null --set train.dist_timeout_s=30)
"$twins" pretrain "${common[@]}" --set train.max_steps=6 --out "$dir/run" --nproc-per-node 2 --stop-after 2 \
  > "$dir/out1" 2> "$dir/err1"
grep -q "interrupted at step 2" "$dir/err1" || { cat "$dir/err1"; exit 1; }
grep -q "4 steps/epoch" "$dir/err1" || { cat "$dir/err1"; exit 1; }
"$twins" pretrain --resume --out "$dir/run" --nproc-per-node 2 > "$dir/out2" 2> "$dir/err2"
grep -q "resuming from" "$dir/err2" || { cat "$dir/err2"; exit 1; }
[ -f "$dir/run/backbone.safetensors" ] || { cat "$dir/err2"; exit 1; }
grep -q '"steps":6' "$dir/run/metrics.jsonl" || { cat "$dir/run/metrics.jsonl"; exit 1; }
echo "shards: 2 ranks, stop and resume ok"

# 3b. Killed at step 3 (SIGKILL) and resumed: the same backbone, byte for byte, as the run never
#     stopped (the loader test checks that the order does not depend on the number of workers).
exact=("${common[@]}" --set train.deterministic=true --set train.checkpoint_every_steps=1 --set train.max_steps=6)
"$twins" pretrain "${exact[@]}" --set train.workers=2 --out "$dir/ref" > /dev/null 2> "$dir/err.ref" || { cat "$dir/err.ref"; exit 1; }
rc=0
TWINS_FAULT="step@#3" "$twins" pretrain "${exact[@]}" --set train.workers=2 --out "$dir/killed" > /dev/null 2> "$dir/err.kill" || rc=$?
[ "$rc" -eq 137 ] || { echo "expected death by SIGKILL (137), got $rc"; cat "$dir/err.kill"; exit 1; }
"$twins" pretrain --resume --out "$dir/killed" > /dev/null 2> "$dir/err.resume" || { cat "$dir/err.resume"; exit 1; }
cmp "$dir/ref/backbone.safetensors" "$dir/killed/backbone.safetensors" || { echo "resumed run differs"; exit 1; }
echo "shards: kill -9 and resume: identical backbone"

# 4. pipe: sources on one rank, the index built on the fly.
pipe="{\"type\": \"shards\", \"urls\": \"pipe:cat $dir/shards/train-{000..007}.tar\"}"
"$twins" pretrain "${common[@]}" --set "data=$pipe" --set train.max_steps=3 --out "$dir/run_pipe" \
  > "$dir/out3" 2> "$dir/err3"
[ -f "$dir/run_pipe/backbone.safetensors" ] || { cat "$dir/err3"; exit 1; }

# 5. A failing command is an error naming it, with exit code 1.
bad="{\"type\": \"shards\", \"urls\": \"pipe:cat $dir/missing.tar\"}"
rc=0
"$twins" pretrain "${common[@]}" --set "data=$bad" --set train.max_steps=1 --out "$dir/run_bad" > /dev/null 2> "$dir/err4" || rc=$?
[ "$rc" -eq 1 ] || { echo "exit code $rc"; cat "$dir/err4"; exit 1; }
grep -q "pipe:cat $dir/missing.tar" "$dir/err4" || { cat "$dir/err4"; exit 1; }
grep -q "exited with status 1" "$dir/err4" || { cat "$dir/err4"; exit 1; }
echo "shards: pipe: sources ok"

# 6. Evaluation reads shards too: kNN on the shards equals kNN on the same PNG files unpacked into
#    an image folder (features do not depend on the order), and the linear probe and embed run on
#    them. (Not the IDX files: images read from files are resized before the centre crop.)
mkdir -p "$dir/unpacked"
for t in "$dir"/shards/train-*.tar; do tar xf "$t" -C "$dir/unpacked"; done
for f in "$dir"/unpacked/*.png; do
  c=$(cat "${f%.png}.cls"); mkdir -p "$dir/folder/$c"; mv "$f" "$dir/folder/$c/"
done
eval_json() {  # $1: the data block of both splits
  echo "{\"train_data\": $1, \"test_data\": $1, \"image_size\": 28, \"normalize\": {\"mean\": [0.286], \"std\": [0.353]},
         \"probe\": {\"epochs\": 3}, \"knn\": {\"k\": [5]}, \"batch_size\": 64, \"workers\": 1}"
}
eval_json "$data" > "$dir/eval_shards.json"
eval_json "{\"type\": \"image_folder\", \"root\": \"$dir/folder\"}" > "$dir/eval_folder.json"
knn_top1() { sed -n 's/.*top-1 \([0-9.]*\)%.*/\1/p' "$1" | head -1; }
"$twins" knn --backbone "$dir/run" --config "$dir/eval_shards.json" --out "$dir/eval_s" > "$dir/knn_s" 2>&1 || { cat "$dir/knn_s"; exit 1; }
"$twins" knn --backbone "$dir/run" --config "$dir/eval_folder.json" --out "$dir/eval_i" > "$dir/knn_i" 2>&1 || { cat "$dir/knn_i"; exit 1; }
# Equal up to one test sample of the 256: the same images in other batches can come out of the
# convolutions a rounding apart, which flips a near tie among the neighbours now and then (seen
# once under the sanitizers: 68.75 vs 69.14).
[ -n "$(knn_top1 "$dir/knn_s")" ] &&
  awk -v a="$(knn_top1 "$dir/knn_s")" -v b="$(knn_top1 "$dir/knn_i")" 'BEGIN { d = a - b; exit !(d * d <= 0.40 * 0.40) }' \
  || { echo "kNN on shards $(knn_top1 "$dir/knn_s") vs folder $(knn_top1 "$dir/knn_i")"; cat "$dir/knn_s"; exit 1; }
# On 2 ranks rank 0 extracts the stream alone, the other waiting in short collectives (a quarter of
# dist_timeout_s each) rather than in one as long as the extraction.
"$twins" knn --backbone "$dir/run" --config "$dir/eval_shards.json" --set dist_timeout_s=10 --out "$dir/eval_s2" \
  --nproc-per-node 2 > "$dir/knn_s2" 2>&1 || { cat "$dir/knn_s2"; exit 1; }
grep -q "extracting train features (256 images on rank 0 alone, a stream of shards" "$dir/knn_s2" || { cat "$dir/knn_s2"; exit 1; }
awk -v a="$(knn_top1 "$dir/knn_s")" -v b="$(knn_top1 "$dir/knn_s2")" 'BEGIN { d = a - b; exit !(d * d <= 0.40 * 0.40) }' \
  || { echo "kNN on shards, 1 rank $(knn_top1 "$dir/knn_s")% vs 2 $(knn_top1 "$dir/knn_s2")%"; cat "$dir/knn_s2"; exit 1; }
"$twins" linear-probe --backbone "$dir/run" --config "$dir/eval_shards.json" --out "$dir/eval_s" > "$dir/probe_s" 2>&1 \
  || { cat "$dir/probe_s"; exit 1; }
grep -q '"top1"' "$dir/eval_s/probe.json" || { cat "$dir/probe_s"; exit 1; }
echo "$data" > "$dir/shards.json"
"$twins" embed --backbone "$dir/run" --input "$dir/shards.json" --output "$dir/emb.npy" > "$dir/embed_s" 2>&1 \
  || { cat "$dir/embed_s"; exit 1; }
[ "$(wc -l < "$dir/emb.ids.txt")" -eq 256 ] || { cat "$dir/embed_s"; head "$dir/emb.ids.txt"; exit 1; }
# On 2 ranks, rank 0 embeds the stream alone: one process's ids and shape (the features may differ
# in their last bits: the rank has fewer threads).
"$twins" embed --backbone "$dir/run" --input "$dir/shards.json" --output "$dir/emb2.npy" --nproc-per-node 2 \
  > "$dir/embed_s2" 2>&1 || { cat "$dir/embed_s2"; exit 1; }
if ! grep -q "rank 0 embeds them alone" "$dir/embed_s2" || ! cmp "$dir/emb.ids.txt" "$dir/emb2.ids.txt" \
  || [ "$(stat -c %s "$dir/emb.npy")" != "$(stat -c %s "$dir/emb2.npy")" ]; then
  cat "$dir/embed_s2"; exit 1
fi
echo "shards: knn (top-1 $(knn_top1 "$dir/knn_s")% as on the unpacked files), linear-probe and embed ok"

# 7. Fine-tuning on the shards with 2 ranks, stopped by SIGTERM within the epoch (batch 2 of 8:
#    256 samples / 32 per batch): shards are dealt to the ranks whole, so resuming with 1 rank is
#    refused, naming the checkpoint and the rank count; the same command (2 ranks) continues it.
ft=(finetune --backbone "$dir/run" --config "$dir/eval_shards.json" --set finetune.epochs=1
    --set finetune.batch_size=32 --set dist_timeout_s=120 --out "$dir/ft")
TWINS_FAULT="finetune_batch@#2:TERM" "$twins" "${ft[@]}" --nproc-per-node 2 > "$dir/ft1.out" 2> "$dir/ft1.err" \
  || { cat "$dir/ft1.out" "$dir/ft1.err"; exit 1; }
grep -q "stopped at batch 2 of epoch 1 of 1" "$dir/ft1.out" || { cat "$dir/ft1.out" "$dir/ft1.err"; exit 1; }
rc=0
"$twins" "${ft[@]}" > "$dir/ft2.out" 2> "$dir/ft2.err" || rc=$?
if [ "$rc" -ne 1 ] || ! grep -q "finetune-checkpoint.safetensors was written within an epoch by 2 rank(s) reading tar shards" \
  "$dir/ft2.err"; then echo "exit $rc"; cat "$dir/ft2.out" "$dir/ft2.err"; exit 1; fi
"$twins" "${ft[@]}" --nproc-per-node 2 > "$dir/ft3.out" 2> "$dir/ft3.err" || { cat "$dir/ft3.out" "$dir/ft3.err"; exit 1; }
if ! grep -q "at batch 2 of 8 in epoch 1 of 1" "$dir/ft3.err" || ! grep -q '"resumed_from_batch": 2' "$dir/ft/finetune.json" \
  || ! grep -q "scoring the test set on rank 0 alone (a stream of shards)" "$dir/ft3.err"
then cat "$dir/ft3.out" "$dir/ft3.err"; exit 1; fi
echo "shards: finetune on 2 ranks stopped within an epoch, refused on 1 rank, continued on 2"

#!/usr/bin/env bash
# Training speed of the CIFAR-10 ResNet-18 recipes: twins beside the same recipes written in plain
# PyTorch (bench/reference/pretrain_torch.py, Debian's python3-torch), same machine, same run.
#   bench/pretrain.sh [steps] [batch] [repeats]        (needs scripts/setup-reference.sh)
# Both sides use the same BLAS (libblas.so.3: OpenBLAS when installed by scripts/setup.sh) and the
# same number of threads. "step": the full training step on synthetic batches (model only);
# "end to end": real CIFAR-10 through each side's loader and augmentations.
# PyTorch runs twice: with its defaults, and with the settings the twins command gives itself
# (core/runtime.cpp: tune_allocator's MALLOC_MMAP_MAX_=0 and no trimming; set_compute_threads's one
# OpenBLAS thread beside LibTorch's), so the part of the difference that is those settings shows
# as such. Everything is measured `repeats`
# times (default 2), interleaved, and each cell shows the lowest and highest value.
# PRECISION=bf16 runs both sides under bf16 autocast (losses in fp32 on both), fp32 by default.
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-3}
batch=${2:-256}
repeats=${3:-2}
threads=$(nproc)
precision=${PRECISION:-fp32}
case "$precision" in
  fp32) torch_precision=() ;;
  bf16) torch_precision=(--bf16) ;;
  *) echo "bench/pretrain.sh: PRECISION must be fp32 or bf16, got '$precision'" >&2; exit 2 ;;
esac
cifar=${CIFAR_ROOT:-../shared/data/cifar10/cifar-10-batches-bin}
twins=build/cli/twins
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
ips() { sed -n 's/.*"images_per_s": \([0-9.e+-]*\).*/\1/p'; }
for ((r = 0; r < repeats; r++)); do
  for method in vicreg barlow_twins byol; do
    cfg=configs/${method}_cifar10.json
    step=$($twins bench step --config "$cfg" --set "train.batch_size=$batch" --set "train.threads=$threads" \
             --set "train.precision=$precision" --steps "$steps" --warmup 1 --json | ips)
    echo "$method step twins $step" >> "$out/all"
    rm -rf "$out/run"
    $twins pretrain --config "$cfg" --out "$out/run" --set "data.root=$cifar" --set "train.batch_size=$batch" \
      --set "train.max_steps=$((steps + 1))" --set "train.threads=$threads" --set train.log_every=1 \
      --set online_probe.enabled=false --set "train.precision=$precision" > /dev/null 2>&1
    # end to end: the steps after the first (which includes start-up), from metrics.jsonl
    e2e=$(tail -n +2 "$out/run/metrics.jsonl" | sed -n 's/.*"images_per_s":\([0-9.e+-]*\).*/\1/p' | head -n "$steps" |
          awk '{s += 1 / $1; n++} END {printf "%.3f", n / s}')
    echo "$method end_to_end twins $e2e" >> "$out/all"
    for alloc in default same; do
      env=()
      [ "$alloc" = same ] && env=(MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 MALLOC_TOP_PAD_=1073741824
                                  OPENBLAS_NUM_THREADS=1)
      env "${env[@]}" /usr/bin/python3 bench/reference/pretrain_torch.py --method "$method" --root "$cifar" \
        --batch-size "$batch" --steps "$steps" --warmup 1 --mode both --threads "$threads" --workers 2 "${torch_precision[@]}" |
        sed -n "s/.*\"mode\": \"\([a-z_]*\)\".*\"images_per_s\": \([0-9.e+-]*\).*/$method \1 pytorch_$alloc \2/p" >> "$out/all"
    done
  done
done
/usr/bin/python3 - "$out/all" "$threads" "$steps" "$batch" "$repeats" "$precision" <<'PY'
import collections, sys
path, threads, steps, batch, repeats, precision = sys.argv[1:]
v = collections.defaultdict(list)
for line in open(path):
    method, mode, who, x = line.split()
    v[method, mode, who].append(float(x))
span = lambda xs: f"{min(xs):.1f}-{max(xs):.1f}" if len(xs) > 1 else f"{xs[0]:.1f}"
ratio = lambda a, b: f"{min(a) / max(b):.2f}-{max(a) / min(b):.2f}x" if len(a) > 1 else f"{a[0] / b[0]:.2f}x"
print(f"images/s, {threads} threads, batch {batch}, {precision}, {steps} timed steps, {repeats} repeats (lowest-highest)")
print("| method | mode | twins | PyTorch | twins / PyTorch | PyTorch, twins' allocator and BLAS threads | twins / that |")
print("|---|---|---:|---:|---:|---:|---:|")
for method in ["vicreg", "barlow_twins", "byol"]:
    for mode in ["step", "end_to_end"]:
        t, d, s = (v[method, mode, w] for w in ["twins", "pytorch_default", "pytorch_same"])
        print(f"| {method} | {mode.replace('_', ' ')} | {span(t)} | {span(d)} | {ratio(t, d)} | {span(s)} | {ratio(t, s)} |")
PY

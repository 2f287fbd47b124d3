#!/usr/bin/env bash
# Training speed of the CIFAR-10 ResNet-18 recipes: twins beside the same recipes written in plain
# PyTorch (bench/reference/pretrain_torch.py, Debian's python3-torch), same machine, same run.
#   bench/pretrain.sh [steps] [batch]        (needs scripts/setup-reference.sh)
# Both sides use the same BLAS (libblas.so.3: OpenBLAS when installed by scripts/setup.sh) and the
# same number of threads. "step": the full training step on synthetic batches (model only);
# "end to end": real CIFAR-10 through each side's loader and augmentations.
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-3}
batch=${2:-256}
threads=$(nproc)
cifar=${CIFAR_ROOT:-../shared/data/cifar10/cifar-10-batches-bin}
twins=build/cli/twins
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
printf '%-13s %-11s %10s %12s %7s\n' method mode twins pytorch ratio
for method in vicreg barlow_twins byol; do
  cfg=configs/${method}_cifar10.json
  t_step=$($twins bench step --config "$cfg" --set "train.batch_size=$batch" --set "train.threads=$threads" \
             --steps "$steps" --warmup 1 --json | sed -n 's/.*"images_per_s": \([0-9.e+-]*\).*/\1/p')
  $twins pretrain --config "$cfg" --out "$out/$method" --set "data.root=$cifar" --set "train.batch_size=$batch" \
    --set "train.max_steps=$((steps + 1))" --set "train.threads=$threads" --set train.log_every=1 \
    --set online_probe.enabled=false > /dev/null 2>&1
  # end to end: the steps after the first (which includes start-up), from metrics.jsonl
  t_e2e=$(tail -n +2 "$out/$method/metrics.jsonl" | sed -n 's/.*"images_per_s":\([0-9.e+-]*\).*/\1/p' | head -n "$steps" |
          awk '{s += 1 / $1; n++} END {printf "%.3f", n / s}')
  ref=$(/usr/bin/python3 bench/reference/pretrain_torch.py --method "$method" --root "$cifar" --batch-size "$batch" \
          --steps "$steps" --warmup 1 --mode both --threads "$threads" --workers 2)
  r_step=$(echo "$ref" | grep '"step"' | sed -n 's/.*"images_per_s": \([0-9.e+-]*\).*/\1/p')
  r_e2e=$(echo "$ref" | grep '"end_to_end"' | sed -n 's/.*"images_per_s": \([0-9.e+-]*\).*/\1/p')
  awk -v m="$method" -v a="$t_step" -v b="$r_step" 'BEGIN {printf "%-13s %-11s %10.1f %12.1f %6.2fx\n", m, "step", a, b, a / b}'
  awk -v m="$method" -v a="$t_e2e" -v b="$r_e2e" 'BEGIN {printf "%-13s %-11s %10.1f %12.1f %6.2fx\n", m, "end to end", a, b, a / b}'
done

#!/usr/bin/env bash
# ViT-S/16 training step (224 px, both views forward and backward, loss, AdamW, online probe) on
# synthetic batches: twins (`twins bench step`, the step `pretrain` runs) beside the same model in
# plain PyTorch (bench/reference/pretrain_torch.py: torchvision's VisionTransformer), same machine,
# same threads, same allocator settings and one OpenBLAS thread (what twins' CLI sets for itself),
# in one run.
#   bench/vit.sh [steps] [batch] [methods] [warmup]       (needs scripts/setup-reference.sh)
# Warm-up: 3 untimed steps on each side (the first steps of this model, 160 M parameters with its
# projector, still grow the heap: with one, both sides timed some of their page faults).
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-3}
batch=${2:-16}
methods=${3:-"vicreg barlow_twins byol"}
warmup=${4:-3}
threads=$(nproc)
twins=build/cli/twins
export MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 MALLOC_TOP_PAD_=1073741824 OPENBLAS_NUM_THREADS=1
printf '%-13s %6s %12s %12s %7s\n' method batch twins pytorch ratio
for method in $methods; do
  cfg=configs/${method}_vit_small_imagenet.json
  t=$($twins bench step --config "$cfg" --set "train.batch_size=$batch" --set "train.threads=$threads" \
        --steps "$steps" --warmup "$warmup" --json | sed -n 's/.*"images_per_s": \([0-9.e+-]*\).*/\1/p')
  r=$(/usr/bin/python3 bench/reference/pretrain_torch.py --method "$method" --config "$cfg" --mode step \
        --batch-size "$batch" --steps "$steps" --warmup "$warmup" --threads "$threads" |
      sed -n 's/.*"images_per_s": \([0-9.e+-]*\).*/\1/p')
  awk -v m="$method" -v b="$batch" -v a="$t" -v p="$r" 'BEGIN {printf "%-13s %6d %12.2f %12.2f %6.2fx\n", m, b, a, p, a / p}'
done

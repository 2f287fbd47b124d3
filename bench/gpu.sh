#!/usr/bin/env bash
# One go on a GPU machine (issue 12): build twins against the machine's CUDA LibTorch, print what
# it runs on, run the whole test suite, then the training step of each method beside the same
# recipe in the machine's PyTorch, eager and torch.compile (bench/reference/pretrain_torch.py), in
# bf16 + channels_last (fp32 in the dry run): CIFAR-10 ResNet-18 at batch 256 and 512, ResNet-50 at 224 px at 128 and
# 256. Everything it writes goes to $OUT (default runs/gpu): build.log, version.txt, ctest.log,
# step.jsonl (one line per measurement) and step.md (the table).
#
#   bench/gpu.sh                 on the GPU machine: TWINS_PREFIX names the folder holding OpenCV,
#                                CLI11, json and doctest (default: .gpu-kit, see README "On a GPU machine")
#   bench/gpu.sh --dry-run       the same steps on this CPU with Debian's LibTorch and tiny sizes,
#                                so that GPU time is spent running the script, not debugging it
# Device calls are limited (10 minutes each): STAGES="build test" then STAGES=bench splits the
# work (a warm machine keeps build-gpu/ between calls); METHODS="vicreg byol" and
# SIZES="vicreg_cifar10 512" narrow the benchmark; STEPS/WARMUP set its length (30/10).
set -uo pipefail
cd "$(dirname "$0")/.."
dry=0
[ "${1:-}" = "--dry-run" ] && dry=1
out=${OUT:-runs/gpu}
mkdir -p "$out"
log() { echo "== $*" | tee -a "$out/summary.txt"; }
: > "$out/summary.txt"
start=$(date +%s)

stages=${STAGES:-build test bench}
if ((dry)); then
  build=build
  device=cpu
  steps=1
  warmup=1
  sizes=("vicreg_cifar10 8" "vicreg_imagenet 2")
  methods=(vicreg byol)
  python=/usr/bin/python3
  precision=(fp32)  # bf16 autocast is a CUDA path
  ctest_args=(-R "shards|losses")
else
  build=build-gpu
  device=cuda
  steps=${STEPS:-30}
  warmup=${WARMUP:-10}
  sizes=("vicreg_cifar10 256" "vicreg_cifar10 512" "vicreg_imagenet 128" "vicreg_imagenet 256")
  methods=(vicreg barlow_twins byol)
  python=python3
  precision=(bf16 --bf16)
  ctest_args=()
fi
[ -n "${METHODS:-}" ] && read -r -a methods <<< "$METHODS"
[ -n "${SIZES:-}" ] && sizes=("$SIZES")
if [[ $stages == *build* ]]; then
  if ((dry)); then
    scripts/setup.sh > "$out/build.log" 2>&1
  else
    TWINS_TORCH=python TWINS_PREFIX=${TWINS_PREFIX:-$PWD/.gpu-kit} TWINS_BUILD_DIR=$build \
      TWINS_CMAKE_ARGS=${TWINS_CMAKE_ARGS:--DCMAKE_CUDA_ARCHITECTURES=90} scripts/setup.sh > "$out/build.log" 2>&1
  fi
  rc=$?
  log "build: exit $rc ($(( $(date +%s) - start )) s), $out/build.log"
  ((rc == 0)) || { tail -30 "$out/build.log"; exit 1; }
fi
twins=$build/cli/twins
"$twins" --version | tee "$out/version.txt"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$out/version.txt"

if [[ $stages == *test* ]]; then
  t=$(date +%s)
  ctest --test-dir "$build" -j "$(nproc)" --timeout 900 --output-on-failure "${ctest_args[@]}" > "$out/ctest.log" 2>&1
  log "ctest: exit $? ($(( $(date +%s) - t )) s): $(grep -E 'tests passed|tests failed' "$out/ctest.log" | tail -1)"
fi
[[ $stages == *bench* ]] || { log "done in $(( $(date +%s) - start )) s"; exit 0; }

# The step: twins, PyTorch eager, PyTorch compiled; images/s and peak memory.
: > "$out/step.jsonl"
ips() { sed -n 's/.*"images_per_s": \([0-9.e+-]*\).*/\1/p' | tail -1; }
printf '| method | recipe | batch | twins img/s | PyTorch eager | torch.compile | twins / eager | twins / compile |\n|---|---|---:|---:|---:|---:|---:|---:|\n' > "$out/step.md"
for size in "${sizes[@]}"; do
  read -r recipe batch <<< "$size"
  for method in "${methods[@]}"; do
    cfg=configs/${recipe/vicreg/$method}.json
    a=$("$twins" bench step --config "$cfg" --set "train.batch_size=$batch" --set "train.precision=${precision[0]}" \
         --set train.channels_last=true --device "$device" --steps "$steps" --warmup "$warmup" --json 2>> "$out/step.err" |
        tr -d '\n' | tee -a "$out/step.jsonl" | ips)
    echo >> "$out/step.jsonl"
    ref=("$python" bench/reference/pretrain_torch.py --method "$method" --config "$cfg" --mode step --batch-size "$batch"
         --device "$device" "${precision[@]:1}" --channels-last --steps "$steps" --warmup "$warmup" --threads "$(nproc)")
    e=$("${ref[@]}" 2>> "$out/step.err" | tee -a "$out/step.jsonl" | ips)
    c=$("${ref[@]}" --compile 2>> "$out/step.err" | tee -a "$out/step.jsonl" | ips)
    ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a > 0 && b > 0) printf "%.2fx", a / b; else printf "-" }'; }
    num() { awk -v x="$1" 'BEGIN { if (x > 0) printf "%.1f", x; else printf "-" }'; }
    printf '| %s | %s | %s | %s | %s | %s | %s | %s |\n' "$method" "$(basename "$cfg" .json)" "$batch" "$(num "${a:-0}")" \
      "$(num "${e:-0}")" "$(num "${c:-0}")" \
      "$(ratio "${a:-0}" "${e:-0}")" "$(ratio "${a:-0}" "${c:-0}")" | tee -a "$out/step.md"
  done
done
log "done in $(( $(date +%s) - start )) s; $out/step.md"

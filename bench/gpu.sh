#!/usr/bin/env bash
# One go on a GPU machine (issue 12): build twins against the machine's CUDA LibTorch, print what
# it runs on, run the whole test suite, then the training step of each method beside the same
# recipe in the machine's PyTorch, eager and torch.compile (bench/reference/pretrain_torch.py), twins
# eager and replaying a CUDA graph (train.cuda_graph), in
# bf16 + channels_last (fp32 in the dry run): CIFAR-10 ResNet-18 at batch 256 and 512, ResNet-50 at 224 px at 128 and
# 256; then `twins pretrain` end to end and a short accuracy run. Everything it writes goes to $OUT
# (default runs/gpu): summary.txt, build.log, version.txt, ctest.log, step.jsonl (one line per
# measurement) and step.md (the table), e2e.md, accuracy-cifar10.{md,json,svg}.
#
#   bench/gpu.sh                 on the GPU machine: TWINS_PREFIX names the folder holding OpenCV,
#                                CLI11, json and doctest (default: .gpu-kit, see README "On a GPU machine")
#   bench/gpu.sh --dry-run       the same steps on this CPU with Debian's LibTorch and tiny sizes,
#                                so that GPU time is spent running the script, not debugging it
# Stages (STAGES, default all): build, test, bench (the step table), e2e (`twins pretrain` end to
# end on CIFAR-10 and 224-px JPEGs: data wait, the headline epoch time), accuracy (a VICReg
# CIFAR-10 run, linear probe and kNN). Device calls are limited (10 minutes each): STAGES="build
# test", then STAGES=bench, ... splits the work (a warm machine keeps build-gpu/ between calls);
# METHODS="vicreg byol" and SIZES="vicreg_cifar10 512" narrow the benchmark; STEPS/WARMUP set its
# length (30/10); COMPILE_MODE sets torch.compile's mode (default; reduce-overhead is the fair
# match for twins' CUDA graph column, as both replay graphs).
set -uo pipefail
cd "$(dirname "$0")/.."
dry=0
[ "${1:-}" = "--dry-run" ] && dry=1
out=${OUT:-runs/gpu}
mkdir -p "$out"
log() { echo "== $*" | tee -a "$out/summary.txt"; }
: > "$out/summary.txt"
start=$(date +%s)

stages=${STAGES:-build test bench e2e accuracy}
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
compile_mode=${COMPILE_MODE:-default}
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
if [[ $stages == *bench* ]]; then
# The step: twins, PyTorch eager, PyTorch compiled; images/s and peak memory.
: > "$out/step.jsonl"
ips() { sed -n 's/.*"images_per_s": \([0-9.e+-]*\).*/\1/p' | tail -1; }
printf '| method | recipe | batch | twins img/s | twins + CUDA graph | PyTorch eager | torch.compile (%s) | best twins / eager | best twins / compile |\n|---|---|---:|---:|---:|---:|---:|---:|---:|\n' "$compile_mode" > "$out/step.md"
for size in "${sizes[@]}"; do
  read -r recipe batch <<< "$size"
  for method in "${methods[@]}"; do
    cfg=configs/${recipe/vicreg/$method}.json
    twins_step=("$twins" bench step --config "$cfg" --set "train.batch_size=$batch" --set "train.precision=${precision[0]}"
                --set train.channels_last=true --device "$device" --steps "$steps" --warmup "$warmup" --json)
    a=$("${twins_step[@]}" 2>> "$out/step.err" | tr -d '\n' | tee -a "$out/step.jsonl" | ips)
    echo >> "$out/step.jsonl"
    # The same step replayed from a CUDA graph (train.cuda_graph); "-" where the capture failed.
    g=$("${twins_step[@]}" --set train.cuda_graph=true 2>> "$out/step.err" | tr -d '\n' | tee -a "$out/step.jsonl" |
        grep '"cuda_graph": true' | ips)
    echo >> "$out/step.jsonl"
    ref=("$python" bench/reference/pretrain_torch.py --method "$method" --config "$cfg" --mode step --batch-size "$batch"
         --device "$device" "${precision[@]:1}" --channels-last --steps "$steps" --warmup "$warmup" --threads "$(nproc)")
    e=$("${ref[@]}" 2>> "$out/step.err" | tee -a "$out/step.jsonl" | ips)
    c=$("${ref[@]}" --compile --compile-mode "$compile_mode" 2>> "$out/step.err" | tee -a "$out/step.jsonl" | ips)
    ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a > 0 && b > 0) printf "%.2fx", a / b; else printf "-" }'; }
    num() { awk -v x="$1" 'BEGIN { if (x > 0) printf "%.1f", x; else printf "-" }'; }
    best=$(awk -v a="${a:-0}" -v g="${g:-0}" 'BEGIN { print (g > a ? g : a) }')
    printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$method" "$(basename "$cfg" .json)" "$batch" \
      "$(num "${a:-0}")" "$(num "${g:-0}")" "$(num "${e:-0}")" "$(num "${c:-0}")" \
      "$(ratio "$best" "${e:-0}")" "$(ratio "$best" "${c:-0}")" | tee -a "$out/step.md"
  done
done
log "step table: $out/step.md"
fi

# End to end through `twins pretrain`: real data decoded and augmented by the machine's cores
# (train.workers = every core), bf16 + channels_last, as a user runs it. Per run: images/s, the
# data-wait fraction and the last epoch's seconds from metrics.jsonl, beside the model-only step
# of the same method and batch from step.jsonl when the bench stage ran. The CIFAR-10 VICReg row's
# epoch time is the headline (one epoch of 50,000 images at batch 512). E2E_EPOCHS (3) and
# WOOF_STEPS (60) set the lengths; E2E_GRAPH (1 on the GPU) trains with train.cuda_graph, compared
# with the bench stage's step of the same kind.
if [[ $stages == *e2e* ]]; then
  cifar=${CIFAR_ROOT:-../shared/data/cifar10/cifar-10-batches-bin}
  woof=${WOOF_ROOT:-../shared/data/imagewoof-320-bench/train}
  if ((dry)); then
    runs=("cifar10 8 --set train.max_steps=4" "imagewoof 2 --set train.max_steps=2")
  else
    runs=("cifar10 512 --set train.epochs=${E2E_EPOCHS:-3}" "imagewoof 128 --set train.max_steps=${WOOF_STEPS:-60}")
  fi
  graph=${E2E_GRAPH:-$((1 - dry))}
  graph_flag=false
  ((graph)) && graph_flag=true
  printf '| method | data | batch | CUDA graph | images/s end to end | model-only step | end to end / step | data wait | last epoch s |\n|---|---|---:|---|---:|---:|---:|---:|---:|\n' > "$out/e2e.md"
  for run in "${runs[@]}"; do
    read -r data batch limit <<< "$run"
    for method in "${methods[@]}"; do
      if [ "$data" = cifar10 ]; then
        cfg=configs/${method}_cifar10.json data_sets=(--set "data.root=$cifar")
      else
        cfg=configs/${method}_imagenet.json data_sets=(--set "data.root=$woof")
      fi
      dir=$out/e2e-$method-$data
      rm -rf "$dir"
      t=$(date +%s)
      "$twins" pretrain --config "$cfg" --out "$dir" --device "$device" "${data_sets[@]}" --set "train.batch_size=$batch" \
        --set "train.precision=${precision[0]}" --set train.channels_last=true --set "train.workers=$(nproc)" \
        --set online_probe.eval_data=null --set "train.cuda_graph=$graph_flag" $limit > "$dir.log" 2>&1
      rc=$?
      if ((rc != 0)) && [ "$graph_flag" = true ]; then  # a failed capture: the same run eagerly
        log "e2e $method $data: exit $rc with train.cuda_graph, $dir.log; again without"
        tail -3 "$dir.log"
        rm -rf "$dir"
        "$twins" pretrain --config "$cfg" --out "$dir" --device "$device" "${data_sets[@]}" \
          --set "train.batch_size=$batch" --set "train.precision=${precision[0]}" --set train.channels_last=true \
          --set "train.workers=$(nproc)" --set online_probe.eval_data=null $limit > "$dir.log" 2>&1
        rc=$?
      fi
      ((rc == 0)) || { log "e2e $method $data: exit $rc, $dir.log"; tail -5 "$dir.log"; continue; }
      graphed=false
      grep -q "CUDA graph)" "$dir.log" && graphed=true
      "$python" - "$dir/metrics.jsonl" "$out/step.jsonl" "$cfg" "$batch" "$method" "$data" "$graphed" >> "$out/e2e.md" <<'PY'
import json, os, sys
metrics, steps, cfg, batch, method, data, graphed = sys.argv[1:]
lines = [json.loads(l) for l in open(metrics) if l.strip()]
summary = [l for l in lines if l.get("summary")][-1]
epochs = [l["epoch_seconds"] for l in lines if "epoch_seconds" in l]
step = None
if os.path.exists(steps):  # twins' own line of the bench stage: it has "config", PyTorch's has "method"
    for l in open(steps):
        try:
            j = json.loads(l)
        except ValueError:
            continue
        if j.get("config") == cfg and str(j.get("batch_size")) == batch and \
                j.get("cuda_graph", False) == (graphed == "true"):
            step = j["images_per_s"]
e2e = summary["images_per_s"]
print("| %s | %s | %s | %s | %.1f | %s | %s | %.1f%% | %s |" % (
    method, data, batch, "yes" if graphed == "true" else "no", e2e, "%.1f" % step if step else "-", "%.0f%%" % (100 * e2e / step) if step else "-",
    100 * summary["data_wait"], "%.2f" % epochs[-1] if epochs else "-"))
PY
      log "e2e $method $data: $(tail -1 "$out/e2e.md") ($(( $(date +%s) - t )) s)"
    done
  done
  log "end-to-end table: $out/e2e.md"
fi

# A real run (issue 12, part 4): VICReg CIFAR-10 ResNet-18 for ACC_EPOCHS (20) on the GPU, then the
# linear probe and kNN on the GPU, through bench/accuracy.sh (its table lands in $out). The dry run
# trains the Fashion-MNIST quickstart for 3 steps instead.
if [[ $stages == *accuracy* ]]; then
  t=$(date +%s)
  if ((dry)); then
    acc=(--dataset fashion_mnist --set train.max_steps=3)
  else
    acc=(--dataset cifar10 --set "train.epochs=${ACC_EPOCHS:-20}" --set "train.precision=${precision[0]}"
         --set train.channels_last=true --set "train.workers=$(nproc)" --set "train.cuda_graph=${ACC_GRAPH:-true}")
  fi
  TWINS_BIN=$twins bench/accuracy.sh "${acc[@]}" --methods "${ACC_METHODS:-vicreg}" --runs "$out/accuracy" \
    --results "$out" > "$out/accuracy.log" 2>&1
  log "accuracy: exit $? ($(( $(date +%s) - t )) s): $(ls "$out"/accuracy-*.md 2>/dev/null | head -1)"
fi
log "done in $(( $(date +%s) - start )) s"

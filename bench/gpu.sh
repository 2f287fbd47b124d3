#!/usr/bin/env bash
# One go on a GPU machine (issue 12): build twins against the machine's CUDA LibTorch, print what
# it runs on, run the test suite, then the training step of each method beside the same recipe in
# the machine's PyTorch, eager and torch.compile (bench/reference/pretrain_torch.py), twins eager
# and replaying a CUDA graph (train.cuda_graph), in bf16 + channels_last (fp32 in the dry run):
# CIFAR-10 ResNet-18 at batch 256 and 512, ResNet-50 at 224 px at 128 and 256; then `twins
# pretrain` end to end and a short accuracy run. Results accumulate in runs/gpu (RESULTS): summary.txt,
# build.log, version.txt, ctest*.log, step.jsonl (one line per measurement) and step.md (the
# table), e2e.md, accuracy-cifar10.{md,json,svg}. With $OUT set (the device tool's folder, which
# returns at most 8 files), they are copied there after every stage and row, so that a call cut
# short still returns what it measured: summary.txt, step.md, e2e.md and accuracy-*.md as they
# are, everything else (logs, JSON, metrics, curves) in results.tgz.
#
#   bench/gpu.sh                 on the GPU machine: TWINS_PREFIX names the folder holding OpenCV,
#                                CLI11, json and doctest (default: .gpu-kit, see README "On a GPU machine")
#   bench/gpu.sh --dry-run       the same steps on this CPU with Debian's LibTorch and tiny sizes,
#                                so that GPU time is spent running the script, not debugging it
#
# Stages (STAGES, run in the order given; default "build cudatest headline bench e2e test accuracy"):
#   build      twins against the machine's CUDA LibTorch (TWINS_TORCH=python), deps from TWINS_PREFIX
#   cudatest   the tests/cuda cases only (CUDA against the CPU), first
#   headline   the VICReg CIFAR-10 step at batch 512 (four columns) and its end-to-end run
#   test       the rest of ctest, with the GPU hidden (CUDA_VISIBLE_DEVICES=): the CPU suite as CI runs it
#   bench      the step table (rows the headline measured are not measured again), then the
#              headline step's operator profile (profile-<recipe>-<batch>.txt and .json)
#   e2e        `twins pretrain` end to end on CIFAR-10 and 224-px JPEGs
#   accuracy   a VICReg CIFAR-10 run, then the linear probe and kNN (needs all of CIFAR-10)
# BUDGET_S (seconds, default unlimited) bounds the whole call: a stage or row that would not fit
# is skipped and said so, and every command runs under a timeout ending at the budget (a step
# command at most 240 s, a torch.compile one 300 s with its first compilation, the cudatest stage
# 180 s). For a 10-minute device call
# with a cold machine (bench/README.md, "On a GPU"):
#   BUDGET_S=550 bench/gpu.sh
# METHODS="vicreg byol" and SIZES="vicreg_cifar10 512,vicreg_imagenet 128" narrow the benchmark; STEPS/WARMUP set its
# length (30/10); COMPILE_MODE sets torch.compile's mode (default; reduce-overhead is the fair
# match for twins' CUDA graph column, as both replay graphs).
#
# Data: the machine cannot read ../shared/data; bench/gpu-data.sh packs it (and the dependency kit,
# kit.tar.xz) into .gpu-data/ in pieces a device call can carry, and this script unpacks whatever a
# call brought (into .gpu-data/unpacked/ and .gpu-kit/, kept on a warm machine between calls). With only some CIFAR-10 training
# files there, the end-to-end rows cycle them to 50,000 records an epoch (and say so); CIFAR_ROOT
# and WOOF_ROOT name other folders.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
dry=0
[ "${1:-}" = "--dry-run" ] && dry=1
# Results accumulate in runs/gpu (RESULTS), which a warm machine keeps between calls: CONTINUE=1
# keeps an earlier call's rows (and does not measure them again), else the folder starts empty.
# When $OUT names another folder (the device tool's), the results are copied there after every
# stage and row (tables, logs and metrics; not checkpoints).
out=${RESULTS:-runs/gpu}
publish_to=${OUT:-$out}
((${CONTINUE:-0})) || rm -rf "$out"
mkdir -p "$out" "$publish_to"
publish() {
  [ "$(cd "$out" && pwd -P)" = "$(cd "$publish_to" && pwd -P)" ] && return
  local f
  for f in summary.txt step.md e2e.md "$out"/accuracy-*.md; do
    f=$(basename "$f")
    [ -f "$out/$f" ] && cp "$out/$f" "$publish_to/$f.tmp" && mv "$publish_to/$f.tmp" "$publish_to/$f"
  done
  # The rest in one archive (the tool returns 8 files): tables, logs, JSON, metrics, curves; no
  # checkpoints or backbones.
  (cd "$out" && find . -type f \( -name '*.md' -o -name '*.txt' -o -name '*.log' -o -name '*.err' \
     -o -name '*.jsonl' -o -name '*.json' -o -name '*.svg' \) -print0 |
     tar --null -T - -czf "$publish_to/results.tgz.tmp") && mv "$publish_to/results.tgz.tmp" "$publish_to/results.tgz"
}
log() {
  echo "== $*" | tee -a "$out/summary.txt"
  publish
}
echo "== $(date -u +%FT%TZ) STAGES=\"${STAGES:-}\" BUDGET_S=${BUDGET_S:-}" >> "$out/summary.txt"
start=$(date +%s)
budget=${BUDGET_S:-0}
# Seconds left of BUDGET_S (a large number without one).
left() {
  if ((budget > 0)); then echo $((budget - ($(date +%s) - start))); else echo 999999; fi
}
# fits N WHAT: whether N more seconds fit in the budget; says what is skipped when not.
fits() {
  (($(left) >= $1)) && return 0
  log "skipped (budget: $(left) s left, about $1 s needed): $2"
  return 1
}
# A command under a timeout ending at the budget (the exit status 124 says it was cut); with the
# budget spent it does not start (timeout 0 would mean no limit at all).
limited() {
  local l
  l=$(left)
  ((l > 0)) || return 124
  timeout --kill-after=10 "$l" "$@"
}
# limited_to N COMMAND...: the same, and at most N seconds.
limited_to() {
  local n=$1 l
  shift
  l=$(left)
  ((l > 0)) || return 124
  timeout --kill-after=10 "$((l < n ? l : n))" "$@"
}

stages=${STAGES:-build cudatest headline bench e2e test accuracy}
if ((dry)); then
  build=build
  device=cpu
  steps=1
  warmup=1
  sizes=("vicreg_cifar10 8" "vicreg_imagenet 2")
  headline_size="vicreg_cifar10 8"
  methods=(vicreg barlow_twins byol)
  python=/usr/bin/python3
  precision=(fp32)  # bf16 autocast is a CUDA path
  ctest_args=(-R "shards|losses|cuda")
  e2e_runs=("cifar10 8 --set train.max_steps=4" "imagewoof 2 --set train.max_steps=2")
else
  build="build-gpu"
  device=cuda
  steps=${STEPS:-30}
  warmup=${WARMUP:-10}
  sizes=("vicreg_cifar10 256" "vicreg_cifar10 512" "vicreg_imagenet 128" "vicreg_imagenet 256")
  headline_size="vicreg_cifar10 512"
  methods=(vicreg barlow_twins byol)
  python=python3
  precision=(bf16 --bf16)
  ctest_args=()
  e2e_runs=("cifar10 512 --set train.epochs=${E2E_EPOCHS:-3}" "imagewoof 128 --set train.max_steps=${WOOF_STEPS:-60}")
fi
compile_mode=${COMPILE_MODE:-default}
[ -n "${METHODS:-}" ] && read -r -a methods <<< "$METHODS"
[ -n "${SIZES:-}" ] && IFS=',' read -r -a sizes <<< "$SIZES"
twins=$build/cli/twins

# --- data carried in pieces (bench/gpu-data.sh): unpack what is new, check it against the sums.
unpack() {
  local packed=.gpu-data dest=.gpu-data/unpacked f name
  # The dependency kit (bench/gpu-data.sh packs ../shared/gpu/twins-gpu-kit), unless already here.
  if [ -f "$packed/kit.tar.xz" ] && [ ! -d .gpu-kit/lib ] && [ -z "${TWINS_PREFIX:-}" ]; then
    rm -rf .gpu-kit.tmp && mkdir -p .gpu-kit.tmp &&
      "$python" -c 'import sys, tarfile
t = tarfile.open(sys.argv[1])
t.extractall(sys.argv[2], **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))' "$packed/kit.tar.xz" .gpu-kit.tmp &&
      rm -rf .gpu-kit && mv .gpu-kit.tmp .gpu-kit ||
      { log "kit: could not unpack $packed/kit.tar.xz"; return 1; }
    log "kit: unpacked $packed/kit.tar.xz into .gpu-kit"
  fi
  [ -f "$packed/SHA256SUMS" ] || return 0
  mkdir -p "$dest/cifar10" "$dest/imagewoof"
  for f in "$packed"/cifar10-*.bin.xz; do
    [ -f "$f" ] || continue
    name=$(basename "$f" .xz) name=${name#cifar10-}
    [ -f "$dest/cifar10/$name" ] && continue
    "$python" -c 'import lzma, shutil, sys
with lzma.open(sys.argv[1]) as src, open(sys.argv[2], "wb") as dst: shutil.copyfileobj(src, dst)' \
      "$f" "$dest/cifar10/$name.tmp" && mv "$dest/cifar10/$name.tmp" "$dest/cifar10/$name"
  done
  if [ -f "$packed/imagewoof.tar" ] && [ ! -d "$dest/imagewoof/train" ]; then
    rm -rf "$dest/imagewoof.tmp" && mkdir -p "$dest/imagewoof.tmp" &&
      tar -C "$dest/imagewoof.tmp" -xf "$packed/imagewoof.tar" && mv "$dest/imagewoof.tmp/train" "$dest/imagewoof/train"
  fi
  # Check what is there (and only that) against the sums.
  local bad
  bad=$(cd "$dest" && awk 'NR == FNR { have[$0] = 1; next } ($2 in have)' <(find cifar10 imagewoof -type f | sort) \
          ../SHA256SUMS | sha256sum -c --quiet - 2>&1)
  if [ -n "$bad" ]; then
    log "data: checksum mismatch in .gpu-data/unpacked: $bad"
    return 1
  fi
  log "data: .gpu-data/unpacked has $(ls "$dest/cifar10" | wc -l) CIFAR-10 files$([ -d "$dest/imagewoof/train" ] && echo ", imagewoof")"
}

# The CIFAR-10 folder for the end-to-end rows: CIFAR_ROOT, else the shared data, else the unpacked
# pieces; with only some training files there, a folder that cycles them as the five batch files
# (each epoch still 50,000 records). Prints the folder, then a note on a second line.
cifar_root() {
  if [ -n "${CIFAR_ROOT:-}" ]; then printf '%s\n\n' "$CIFAR_ROOT"; return; fi
  local d
  for d in ../shared/data/cifar10/cifar-10-batches-bin .gpu-data/unpacked/cifar10; do
    if [ -f "$d/data_batch_1.bin" ] && [ -f "$d/data_batch_5.bin" ]; then printf '%s\n\n' "$d"; return; fi
  done
  local have=(.gpu-data/unpacked/cifar10/data_batch_*.bin)
  [ -f "${have[0]}" ] || return 1
  local cycled=.gpu-data/unpacked/cifar10-cycled i
  rm -rf "$cycled" && mkdir -p "$cycled"
  for i in 1 2 3 4 5; do
    ln -s "$PWD/${have[$(((i - 1) % ${#have[@]}))]}" "$cycled/data_batch_$i.bin"
  done
  ln -s "$PWD/${have[0]}" "$cycled/test_batch.bin"
  printf '%s\n%s\n' "$cycled" "$((${#have[@]} * 10000)) distinct images cycled to 50,000 an epoch"
}

woof_root() {
  if [ -n "${WOOF_ROOT:-}" ]; then echo "$WOOF_ROOT"; return; fi
  local d
  for d in ../shared/data/imagewoof-320-bench/train .gpu-data/unpacked/imagewoof/train; do
    [ -d "$d" ] && { echo "$d"; return; }
  done
  return 1
}

stage_build() {
  fits 60 build || exit 1
  local t rc
  t=$(date +%s)
  if ((dry)); then
    limited scripts/setup.sh > "$out/build.log" 2>&1
  else
    TWINS_TORCH=python TWINS_PREFIX=${TWINS_PREFIX:-$PWD/.gpu-kit} TWINS_BUILD_DIR=$build \
      TWINS_CMAKE_ARGS=${TWINS_CMAKE_ARGS:--DCMAKE_CUDA_ARCHITECTURES=90} limited scripts/setup.sh > "$out/build.log" 2>&1
  fi
  rc=$?
  log "build: exit $rc ($(($(date +%s) - t)) s), $out/build.log"
  ((rc == 0)) || { tail -30 "$out/build.log"; exit 1; }
}

version() {
  [ -x "$twins" ] || { log "no $twins: run the build stage"; exit 1; }
  "$twins" --version | tee "$out/version.txt"
  grep -h "twins collectives" "$out/build.log" >> "$out/version.txt" 2> /dev/null
  if ((!dry)) && ! grep -q "^CUDA available (.*GPU" "$out/version.txt"; then
    # Without CUDA (or without a twins that starts) every later stage would measure the CPU or
    # nothing: stop here, with what the build said.
    log "twins was built or runs without CUDA ($out/version.txt, $out/build.log): stopping"
    exit 1
  fi
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$out/version.txt"
  # The PyTorch columns: without torchvision the reference builds its own copy of its ResNets.
  "$python" -c 'import torch
try:
    import torchvision; tv = torchvision.__version__
except ImportError:
    tv = "absent (the reference builds its own copy of its ResNets)"
print("reference: PyTorch", torch.__version__, "torchvision", tv)' >> "$out/version.txt" 2>&1
}

# ctest_run NAME JOBS SECONDS ARGS...: ctest into $out/NAME.log, JOBS at once, at most SECONDS
# (and the budget), each test at most 300 s.
ctest_run() {
  local name=$1 jobs=$2 cap=$3 t
  shift 3
  t=$(date +%s)
  limited_to "$cap" ctest --test-dir "$build" -j "$jobs" --timeout 300 --output-on-failure "$@" > "$out/$name.log" 2>&1
  log "$name: exit $? ($(($(date +%s) - t)) s): $(grep -E 'tests passed|tests failed|No tests were found' "$out/$name.log" | tail -1)"
}

# --- the step table: twins eager and graphed, PyTorch eager and compiled; images/s and peak memory.
declare -A step_done
ips() { sed -n 's/.*"images_per_s": \([0-9.e+-]*\).*/\1/p' | tail -1; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a > 0 && b > 0) printf "%.2fx", a / b; else printf "-" }'; }
num() { awk -v x="$1" 'BEGIN { if (x > 0) printf "%.1f", x; else printf "-" }'; }
step_table_header() {
  [ -f "$out/step.md" ] && return
  : > "$out/step.jsonl"
  printf '| method | recipe | batch | twins img/s | twins + CUDA graph | PyTorch eager | torch.compile (%s) | best twins / eager | best twins / compile |\n|---|---|---:|---:|---:|---:|---:|---:|---:|\n' "$compile_mode" > "$out/step.md"
}
step_row() {  # step_row METHOD RECIPE BATCH
  local method=$1 recipe=$2 batch=$3 cfg a g e c best
  cfg=configs/${recipe/vicreg/$method}.json
  [ -n "${step_done[$cfg $batch]:-}" ] && return
  grep -q "^| $method | $(basename "$cfg" .json) | $batch |" "$out/step.md" 2> /dev/null && return
  fits 150 "step $method $recipe $batch" || return
  step_done[$cfg $batch]=1
  step_table_header
  local twins_step=("$twins" bench step --config "$cfg" --set "train.batch_size=$batch" --set "train.precision=${precision[0]}"
                    --set train.channels_last=true --device "$device" --steps "$steps" --warmup "$warmup" --json)
  a=$(limited_to 240 "${twins_step[@]}" 2>> "$out/step.err" | tr -d '\n' | tee -a "$out/step.jsonl" | ips)
  echo >> "$out/step.jsonl"
  # The same step replayed from a CUDA graph (train.cuda_graph); "-" where the capture failed.
  g=$(limited_to 240 "${twins_step[@]}" --set train.cuda_graph=true 2>> "$out/step.err" | tr -d '\n' |
      tee -a "$out/step.jsonl" | grep '"cuda_graph": true' | ips)
  echo >> "$out/step.jsonl"
  local ref=("$python" bench/reference/pretrain_torch.py --method "$method" --config "$cfg" --mode step --batch-size "$batch"
             --device "$device" "${precision[@]:1}" --channels-last --steps "$steps" --warmup "$warmup" --threads "$(nproc)")
  e=$(limited_to 240 "${ref[@]}" 2>> "$out/step.err" | tee -a "$out/step.jsonl" | ips)
  c=$(limited_to 300 "${ref[@]}" --compile --compile-mode "$compile_mode" 2>> "$out/step.err" | tee -a "$out/step.jsonl" | ips)
  best=$(awk -v a="${a:-0}" -v g="${g:-0}" 'BEGIN { print (g > a ? g : a) }')
  printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$method" "$(basename "$cfg" .json)" "$batch" \
    "$(num "${a:-0}")" "$(num "${g:-0}")" "$(num "${e:-0}")" "$(num "${c:-0}")" \
    "$(ratio "$best" "${e:-0}")" "$(ratio "$best" "${c:-0}")" | tee -a "$out/step.md"
  publish
}

# --- where the headline step's time goes: `twins bench step --profile` (each operator's time with
# its kernels: the GPU is synchronized at every operator's end), eager. profile-<recipe>-<batch>.txt
# (the table) and .json (the Chrome trace for Perfetto), in results.tgz.
profile_step() {  # profile_step RECIPE BATCH
  local cfg=configs/$1.json name=profile-$1-$2
  [ -f "$out/$name.txt" ] && return
  fits 90 "profile $1 $2" || return
  limited_to 120 "$twins" bench step --config "$cfg" --set "train.batch_size=$2" --set "train.precision=${precision[0]}" \
    --set train.channels_last=true --device "$device" --steps 2 --warmup "$warmup" --profile "$out/$name.json" \
    --profile-steps 2 --profile-rows 30 > "$out/$name.txt.partial" 2>> "$out/step.err"
  local rc=$?
  ((rc == 0)) && mv "$out/$name.txt.partial" "$out/$name.txt"
  log "profile $1 $2: exit $rc ($out/$name.txt)"
  publish
}

# --- end to end through `twins pretrain`: real data decoded and augmented by the machine's cores
# (train.workers "auto", as in the recipes: every core but one), bf16 + channels_last, as a user
# runs it. Per run: images/s, the data-wait fraction and the last epoch's seconds from
# metrics.jsonl, beside the model-only step of the same method and batch from step.jsonl when the
# step table has it. The CIFAR-10 VICReg row's epoch time is the headline (one epoch of 50,000 images at batch 512). E2E_EPOCHS (3) and
# WOOF_STEPS (60) set the lengths; E2E_GRAPH (1 on the GPU) trains with train.cuda_graph, compared
# with the step of the same kind.
declare -A e2e_done
graph_flag=false
((${E2E_GRAPH:-$((1 - dry))})) && graph_flag=true
e2e_row() {  # e2e_row METHOD cifar10|imagewoof BATCH LIMIT...
  local method=$1 data=$2 batch=$3 cfg root note="" dir t rc graphed
  shift 3
  [ -n "${e2e_done[$method $data $batch]:-}" ] && return
  grep -q "^| $method | $data | $batch |" "$out/e2e.md" 2> /dev/null && return
  fits 120 "e2e $method $data $batch" || return
  e2e_done[$method $data $batch]=1
  if [ "$data" = cifar10 ]; then
    local r
    r=$(cifar_root) || { log "e2e $method $data: no CIFAR-10 here (bench/gpu-data.sh, or CIFAR_ROOT)"; return; }
    root=$(sed -n 1p <<< "$r") note=$(sed -n 2p <<< "$r")
    cfg=configs/${method}_cifar10.json
  else
    root=$(woof_root) || { log "e2e $method $data: no imagewoof folder here (bench/gpu-data.sh, or WOOF_ROOT)"; return; }
    cfg=configs/${method}_imagenet.json
  fi
  [ -f "$out/e2e.md" ] ||
    printf '| method | data | batch | CUDA graph | images/s end to end | model-only step | end to end / step | data wait | last epoch s |\n|---|---|---:|---|---:|---:|---:|---:|---:|\n' > "$out/e2e.md"
  dir=$out/e2e-$method-$data
  local run=("$twins" pretrain --config "$cfg" --out "$dir" --device "$device" --set "data.root=$root"
             --set "train.batch_size=$batch" --set "train.precision=${precision[0]}" --set train.channels_last=true
             --set train.workers=auto --set online_probe.eval_data=null "$@")
  rm -rf "$dir"
  t=$(date +%s)
  limited "${run[@]}" --set "train.cuda_graph=$graph_flag" > "$dir.log" 2>&1
  rc=$?
  if ((rc != 0 && rc != 124)) && [ "$graph_flag" = true ] && fits 60 "e2e $method $data eagerly"; then
    log "e2e $method $data: exit $rc with train.cuda_graph, $dir.log; again without"
    tail -3 "$dir.log"
    mv "$dir.log" "$dir-graph.log"
    rm -rf "$dir"
    limited "${run[@]}" > "$dir.log" 2>&1
    rc=$?
  fi
  ((rc == 0)) || { log "e2e $method $data: exit $rc, $dir.log"; tail -5 "$dir.log"; return; }
  graphed=false
  grep -q "CUDA graph)" "$dir.log" && graphed=true
  "$python" - "$dir/metrics.jsonl" "$out/step.jsonl" "$cfg" "$batch" "$method" "$data" "$graphed" >> "$out/e2e.md" <<'PY'
import json, os, sys
metrics, steps, cfg, batch, method, data, graphed = sys.argv[1:]
lines = [json.loads(l) for l in open(metrics) if l.strip()]
summary = [l for l in lines if l.get("summary")][-1]
epochs = [l["epoch_seconds"] for l in lines if "epoch_seconds" in l]
step = None
if os.path.exists(steps):  # twins' own line of the step table: it has "config", PyTorch's has "method"
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
  log "e2e $method $data: $(tail -1 "$out/e2e.md") ($(($(date +%s) - t)) s)${note:+; data: $note}"
}

# --- a real run (issue 12, part 4): VICReg CIFAR-10 ResNet-18 for ACC_EPOCHS (20) on the GPU, then
# the linear probe and kNN on the GPU, through bench/accuracy.sh (its table lands in $out). The
# dry run trains the Fashion-MNIST quickstart for 3 steps instead.
stage_accuracy() {
  fits 300 accuracy || return
  local t acc root
  t=$(date +%s)
  if ((dry)); then
    acc=(--dataset fashion_mnist --set train.max_steps=3)
  else
    root=$(cifar_root | sed -n 1p)
    if [ -z "$root" ] || [ ! -f "$root/test_batch.bin" ] || [[ $root == *cycled* ]]; then
      log "accuracy: needs all of CIFAR-10 (bench/gpu-data.sh: calls 1-4, or CIFAR_ROOT)"
      return
    fi
    acc=(--dataset cifar10 --set "data.root=$root" --set "train.epochs=${ACC_EPOCHS:-20}" --set "train.precision=${precision[0]}"
         --set train.channels_last=true --set train.workers=auto --set "train.cuda_graph=${ACC_GRAPH:-true}")
  fi
  TWINS_BIN=$twins limited bench/accuracy.sh "${acc[@]}" --methods "${ACC_METHODS:-vicreg}" --runs "$out/accuracy" \
    --results "$out" > "$out/accuracy.log" 2>&1
  log "accuracy: exit $? ($(($(date +%s) - t)) s): $(ls "$out"/accuracy-*.md 2>/dev/null | head -1)"
}

((dry)) && scripts/setup-reference.sh  # the machine's PyTorch for the reference columns
unpack || exit 1
for stage in $stages; do
  [ "$stage" = build ] || [ -x "$twins" ] || stage_build
  case $stage in
    build) stage_build && version ;;
    cudatest)
      [ -f "$out/version.txt" ] || version
      # A few processes at once, each CPU reference on a few threads (not 16 x 16 on 16 cores).
      # (180 s at most: a hung case must not take the headline's time.)
      fits 60 cudatest && OMP_NUM_THREADS=4 ctest_run ctest-cuda 4 180 -R "^cuda:" ;;
    headline)
      [ -f "$out/version.txt" ] || version
      read -r recipe batch <<< "$headline_size"
      step_row vicreg "$recipe" "$batch"
      read -r data batch limit <<< "${e2e_runs[0]}"  # CIFAR-10
      # shellcheck disable=SC2086
      e2e_row vicreg "$data" "$batch" $limit ;;
    test)
      [ -f "$out/version.txt" ] || version
      # The CPU suite as CI runs it (the cuda: cases are the cudatest stage's): with a GPU
      # visible, "auto" devices would be CUDA and the multi-rank tests would put two NCCL ranks on
      # one GPU. Two threads a test, as on CI's machine.
      fits 90 test && CUDA_VISIBLE_DEVICES='' OMP_NUM_THREADS=2 ctest_run ctest "$(nproc)" 999999 -E "^cuda:" "${ctest_args[@]}" ;;
    bench)
      for size in "${sizes[@]}"; do
        read -r recipe batch <<< "$size"
        for method in "${methods[@]}"; do step_row "$method" "$recipe" "$batch"; done
      done
      [ -f "$out/step.md" ] && log "step table: $out/step.md"
      # shellcheck disable=SC2086
      profile_step $headline_size ;;
    e2e)
      for r in "${e2e_runs[@]}"; do
        read -r data batch limit <<< "$r"
        for method in "${methods[@]}"; do
          # shellcheck disable=SC2086
          e2e_row "$method" "$data" "$batch" $limit
        done
      done
      [ -f "$out/e2e.md" ] && log "end-to-end table: $out/e2e.md" ;;
    accuracy) stage_accuracy ;;
    *) log "unknown stage $stage (build cudatest headline test bench e2e accuracy)"; exit 2 ;;
  esac
done
log "done in $(($(date +%s) - start)) s"

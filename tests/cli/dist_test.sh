#!/usr/bin/env bash
# `twins pretrain --nproc-per-node 2` end to end on CPU ranks (Gloo over loopback), on a tiny
# IDX dataset made here with the quickstart recipe's views and network:
#  1. a few steps, interrupted by --stop-after, then resumed by both ranks: the run finishes;
#     SIGTERM to the whole job (as a scheduler sends it) checkpoints;
#  2. a rank killed mid-run: the job exits non-zero within the timeout, naming the rank, and
#     leaves no process behind;
#  3. a hung rank (SIGSTOP): the others give up after train.dist_timeout_s, or sooner when the
#     heartbeat watch (train.dist_heartbeat_timeout_s) finds it silent.
set -euo pipefail
twins=$1
quickstart=$2
# Every case here runs several CPU ranks, through Gloo: a twins built without it (against a
# LibTorch without Gloo's headers, as a PyTorch wheel may be) skips them (ctest: SKIP_RETURN_CODE).
if ! "$twins" --version | grep -q '^collectives .*gloo'; then
  echo "skipped: this twins was built without Gloo (CPU collectives)"
  exit 77
fi
dir=$(mktemp -d)
pids_to_reap=()
cleanup() {
  # TERM first: `timeout` passes it on to the torchrun agent it runs, which stops its ranks.
  local alive=0 p
  for p in "${pids_to_reap[@]}"; do kill "$p" 2>/dev/null && alive=1; done
  if ((alive)); then sleep 2; fi
  for p in "${pids_to_reap[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$dir"
}
trap cleanup EXIT

# 512 random 28x28 grey images with labels 0-9, as Fashion-MNIST's uncompressed IDX files.
n=512
{ printf '\x00\x00\x08\x03\x00\x00\x02\x00\x00\x00\x00\x1c\x00\x00\x00\x1c'; head -c $((n * 784)) /dev/urandom; } \
  > "$dir/train-images-idx3-ubyte"
{ printf '\x00\x00\x08\x01\x00\x00\x02\x00'; for ((i = 0; i < n; i++)); do printf "\\x0$((i % 10))"; done; } \
  > "$dir/train-labels-idx1-ubyte"

common=(--config "$quickstart" --set "data.root=$dir" --set data.split=train --set train.batch_size=32
        --set train.threads=1 --set train.workers=1 --set train.log_every=1 --set train.sync_batchnorm=true
        --set online_probe.eval_data=null --set train.dist_timeout_s=6)

# 1. Interrupted after 2 steps, resumed to step 5 (across an epoch: 512 samples / 2 ranks / 32
#    per batch / 2 accumulated = 4 steps per epoch).
"$twins" pretrain "${common[@]}" --set train.max_steps=5 --set train.grad_accumulation=2 --out "$dir/run" \
  --nproc-per-node 2 --stop-after 2 \
  > "$dir/out1" 2> "$dir/err1"
grep -q "interrupted at step 2" "$dir/err1" || { cat "$dir/err1"; exit 1; }
# The printed resume command keeps the number of ranks (resuming on one rank would differ).
grep -q "resume with: twins pretrain --out $dir/run --resume --nproc-per-node 2" "$dir/err1" || { cat "$dir/err1"; exit 1; }
grep -q "x 2 ranks (gloo) x 2 accumulated" "$dir/err1" || { cat "$dir/err1"; exit 1; }
grep -q "4 steps/epoch" "$dir/err1" || { cat "$dir/err1"; exit 1; }
# VICReg's batch statistics per accumulated batch, not per step: said, with the way out.
grep -q "each of the 2 accumulated batches, not over the step's 128 samples together; train.grad_cache: true" "$dir/err1" ||
  { cat "$dir/err1"; exit 1; }
[ "$(ls "$dir/run/checkpoints")" = "step-00000002.safetensors" ] || { ls "$dir/run/checkpoints"; exit 1; }
cp -r "$dir/run" "$dir/run1"
"$twins" pretrain --resume --out "$dir/run" --nproc-per-node 2 > "$dir/out2" 2> "$dir/err2"
grep -q "resuming from" "$dir/err2" || { cat "$dir/err2"; exit 1; }
[ -f "$dir/run/backbone.safetensors" ] || { cat "$dir/err2"; exit 1; }
[ "$(grep -c '"step":' "$dir/run/metrics.jsonl")" -ge 5 ] || { cat "$dir/run/metrics.jsonl"; exit 1; }
grep -q '"steps":5' "$dir/run/metrics.jsonl" || { cat "$dir/run/metrics.jsonl"; exit 1; }
grep -q '"epochs_completed":1' "$dir/run/metrics.jsonl" || { cat "$dir/run/metrics.jsonl"; exit 1; }
[ "$(grep -c "run folder" "$dir/out2")" -eq 1 ] || { cat "$dir/out2"; exit 1; }  # rank 0 speaks
# The same checkpoint resumed by one process: it warns and finishes.
"$twins" pretrain --resume --out "$dir/run1" > /dev/null 2> "$dir/err3"
grep -q "written by 2 rank(s), resuming with 1" "$dir/err3" || { cat "$dir/err3"; exit 1; }
[ -f "$dir/run1/backbone.safetensors" ] || { cat "$dir/err3"; exit 1; }
echo "launch and resume ok"

# SIGTERM to the whole job (the launcher and both ranks, as a scheduler's preemption or a
# terminal's Ctrl-C; each rank sends it after its step 2), which the launcher forwards to the
# ranks again: every rank finishes its step and checkpoints, and the job exits 0.
TWINS_FAULT="step@#2:TERM" "$twins" pretrain "${common[@]}" --set train.max_steps=12 --out "$dir/run_term" \
  --nproc-per-node 2 > "$dir/out_term" 2> "$dir/err_term" || { cat "$dir/err_term"; exit 1; }
if ! grep -q "interrupted at step [0-9]" "$dir/err_term" || [ -z "$(ls "$dir/run_term/checkpoints")" ] \
  || [ -f "$dir/run_term/backbone.safetensors" ]; then cat "$dir/err_term"; ls -R "$dir/run_term"; exit 1; fi
echo "SIGTERM to the job: checkpointed"

# The same with train.grad_cache (the loss over each step's 128 samples), stopped and resumed.
"$twins" pretrain "${common[@]}" --set train.max_steps=3 --set train.grad_accumulation=2 --set train.grad_cache=true \
  --out "$dir/cache" --nproc-per-node 2 --stop-after 1 > /dev/null 2> "$dir/err4"
grep -q "x 2 accumulated (grad cache)" "$dir/err4" || { cat "$dir/err4"; exit 1; }
if grep -q "train.grad_cache: true takes" "$dir/err4"; then cat "$dir/err4"; exit 1; fi
"$twins" pretrain --resume --out "$dir/cache" --nproc-per-node 2 > /dev/null 2> "$dir/err5"
grep -q '"steps":3' "$dir/cache/metrics.jsonl" || { cat "$dir/err5"; exit 1; }
echo "grad cache ok"

# The kNN monitor over 2 ranks: rank 0 scores it at the epoch's end while rank 1 waits (in a
# collective, so under the sanitizers, where scoring takes longer, with a longer timeout).
"$twins" pretrain "${common[@]}" --set train.epochs=1 --set online_probe.knn.k=5 --set train.dist_timeout_s=120 \
  --set "online_probe.eval_data={\"type\": \"fashion_mnist\", \"root\": \"$dir\", \"split\": \"train\"}" \
  --out "$dir/knn" --nproc-per-node 2 > "$dir/out6" 2> "$dir/err6" || { cat "$dir/err6"; exit 1; }
grep -q "epoch 1: online probe .* (eval data), kNN (k=5) .* (eval data)" "$dir/err6" || { cat "$dir/err6"; exit 1; }
grep -q '"online_knn_k5_top1"' "$dir/knn/metrics.jsonl" || { cat "$dir/knn/metrics.jsonl"; exit 1; }
grep -q "online kNN top-1" "$dir/out6" || { cat "$dir/out6"; exit 1; }
echo "kNN monitor ok"

# Two "nodes" on this machine, one rank each, meeting at node 0's address and port (what
# torchrun --nnodes does, without Python); stopped, and resumed with the printed flags.
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null ||
       echo $((20000 + RANDOM % 20000)))
nodes=(--nnodes 2 --master-addr 127.0.0.1 --master-port "$port" --nproc-per-node 1)
"$twins" pretrain "${common[@]}" --set train.max_steps=6 "${nodes[@]}" --node-rank 1 --out "$dir/nodes" --stop-after 2 \
  > /dev/null 2> "$dir/err7" &
node1=$!
pids_to_reap+=("$node1")
"$twins" pretrain "${common[@]}" --set train.max_steps=6 "${nodes[@]}" --node-rank 0 --out "$dir/nodes" --stop-after 2 \
  > /dev/null 2> "$dir/err8"
wait "$node1" || { cat "$dir/err7"; exit 1; }
grep -q "launching ranks 1-1 of 2 on this machine, node 1 of 2" "$dir/err7" || { cat "$dir/err7"; exit 1; }
grep -q "x 2 ranks (gloo)" "$dir/err8" || { cat "$dir/err8"; exit 1; }
grep -q "resume with, on each node (its own --node-rank): twins pretrain --out $dir/nodes --resume --nproc-per-node 1 --nnodes 2 --node-rank 0 --master-addr 127.0.0.1 --master-port $port" "$dir/err8" ||
  { cat "$dir/err8"; exit 1; }
"$twins" pretrain --out "$dir/nodes" --resume "${nodes[@]}" --node-rank 1 > /dev/null 2> "$dir/err9" &
node1=$!
pids_to_reap+=("$node1")
"$twins" pretrain --out "$dir/nodes" --resume "${nodes[@]}" --node-rank 0 > /dev/null 2> "$dir/err10"
wait "$node1" || { cat "$dir/err9"; exit 1; }
grep -q '"steps":6' "$dir/nodes/metrics.jsonl" || { cat "$dir/err10"; exit 1; }
# Flags that cannot make a job are refused before anything starts.
if "$twins" pretrain "${common[@]}" --nnodes 2 --nproc-per-node 1 --node-rank 1 --out "$dir/bad" 2> "$dir/err11"; then
  exit 1
fi
grep -q "every node needs the same --master-addr" "$dir/err11" || { cat "$dir/err11"; exit 1; }
if "$twins" pretrain "${common[@]}" "${nodes[@]}" --node-rank 2 --out "$dir/bad" 2> "$dir/err12"; then exit 1; fi
grep -q -- "--node-rank: 2 is not below --nnodes 2" "$dir/err12" || { cat "$dir/err12"; exit 1; }
if "$twins" pretrain "${common[@]}" --master-port 29555 --out "$dir/bad" 2> "$dir/err13"; then exit 1; fi
grep -q "go with --nproc-per-node" "$dir/err13" || { cat "$dir/err13"; exit 1; }
# Nodes that do not see one run folder (node 1's --out is another, empty one): with --auto-resume
# rank 0 would continue the run and rank 1 start it over; both refuse, naming the steps.
"$twins" pretrain "${common[@]}" --set train.max_steps=6 "${nodes[@]}" --node-rank 1 --out "$dir/nodes-elsewhere" \
  --auto-resume > /dev/null 2> "$dir/err14" &
node1=$!
pids_to_reap+=("$node1")
if "$twins" pretrain "${common[@]}" --set train.max_steps=6 "${nodes[@]}" --node-rank 0 --out "$dir/nodes" --auto-resume \
  > /dev/null 2> "$dir/err15"; then cat "$dir/err15"; exit 1; fi
if wait "$node1"; then cat "$dir/err14"; exit 1; fi
for f in "$dir/err14" "$dir/err15"; do
  grep -q "the ranks start from different steps (rank 0 at step 6, rank 1 at step 0): every rank must see the same run folder" "$f" ||
    { cat "$f"; exit 1; }
done
echo "two nodes ok"

# Ranks started without twins' launcher (as SLURM or OpenMPI start them, which may leave the
# others running when one fails): rank 0 fails with an error (its data is missing) once the job
# has formed; rank 1, waiting for it in a collective, learns why from the heartbeats and stops
# within seconds, not after train.dist_timeout_s (an hour here).
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null ||
       echo $((20000 + RANDOM % 20000)))
bare=(WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT="$port")
start=$SECONDS
env "${bare[@]}" RANK=0 LOCAL_RANK=0 "$twins" pretrain "${common[@]}" --set train.dist_timeout_s=3600 \
  --set "data.root=$dir/missing" --out "$dir/bare" > /dev/null 2> "$dir/err14" &
bare0=$!
env "${bare[@]}" RANK=1 LOCAL_RANK=1 "$twins" pretrain "${common[@]}" --set train.dist_timeout_s=3600 \
  --out "$dir/bare" > /dev/null 2> "$dir/err15" &
bare1=$!
pids_to_reap+=("$bare0" "$bare1")
if wait "$bare0"; then echo "rank 0 should have failed"; exit 1; fi
if wait "$bare1"; then echo "rank 1 should have stopped"; exit 1; fi
took=$((SECONDS - start))
grep -q "error: rank 0: data.root: $dir/missing" "$dir/err14" || { cat "$dir/err14"; exit 1; }
grep -q "error: rank 1 of 2: stopping: rank 0 failed with an error" "$dir/err15" || { cat "$dir/err15"; exit 1; }
[ "$took" -le 40 ] || { echo "took ${took}s"; cat "$dir/err14" "$dir/err15"; exit 1; }
echo "a failed rank stops a job without launcher: ${took}s"

# A rank that fails before it joins the job (its node lacks the config file) while the other
# waits in the rendezvous (train.dist_timeout_s 120 s, so that a miss fails rather than hangs):
# the waiting rank stops within seconds.
# Rank 1 failing reaches rank 0's store; rank 0 failing hosts its store until rank 1 read why
# (rank 1 is started first, so that it is trying to reach rank 0 by then).
for failing in 1 0; do
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null ||
         echo $((20000 + RANDOM % 20000)))
  bare=(WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT="$port")
  start=$SECONDS
  pids=()
  for rank in 1 0; do
    config=$quickstart
    [ "$rank" = "$failing" ] && config=$dir/not-on-this-node.json
    env "${bare[@]}" RANK=$rank LOCAL_RANK=$rank "$twins" pretrain --config "$config" "${common[@]:2}" \
      --set train.dist_timeout_s=120 --out "$dir/early$failing" > /dev/null 2> "$dir/early$failing-$rank.err" &
    pids[rank]=$!
    pids_to_reap+=("$!")
    [ "$rank" = 1 ] && sleep 1
  done
  for rank in 0 1; do
    if wait "${pids[rank]}"; then echo "rank $rank should have stopped"; cat "$dir/early$failing-$rank.err"; exit 1; fi
  done
  took=$((SECONDS - start))
  other=$((1 - failing))
  grep -q "not-on-this-node.json" "$dir/early$failing-$failing.err" || { cat "$dir/early$failing-$failing.err"; exit 1; }
  grep -q "error: rank $other of 2: stopping before the job formed: rank $failing failed before it joined the job" \
    "$dir/early$failing-$other.err" || { cat "$dir/early$failing-$other.err"; exit 1; }
  [ "$took" -le 40 ] || { echo "took ${took}s"; cat "$dir/early$failing"-*.err; exit 1; }
  echo "rank $failing failing before the job formed stops rank $other: ${took}s"
done

# The pid of rank $2 among the children of launcher $1, once it is up.
rank_pid() {
  for _ in $(seq 1 200); do
    for c in $(pgrep -P "$1" || true); do
      if tr '\0' '\n' < "/proc/$c/environ" 2>/dev/null | grep -qx "RANK=$2"; then echo "$c"; return 0; fi
    done
    sleep 0.05
  done
  return 1
}

# Runs a long job (more arguments: its own), applies signal $1 to rank 1 after the first logged
# step, and checks that the job ends non-zero within $2 seconds, with the message $3, and no rank
# left; $4 names the case.
fail_rank_1() {
  local sig=$1 limit=$2 message=$3 out=$dir/fail-$4
  shift 4
  "$twins" pretrain "${common[@]}" --set train.max_steps=100000 "$@" --out "$out" --nproc-per-node 2 2> "$out.err" &
  local launcher=$!
  pids_to_reap+=("$launcher")
  local r0 r1
  r0=$(rank_pid "$launcher" 0) && r1=$(rank_pid "$launcher" 1) || { echo "ranks did not start"; cat "$out.err"; exit 1; }
  pids_to_reap+=("$r0" "$r1")
  for _ in $(seq 1 600); do [ -s "$out/metrics.jsonl" ] && break; sleep 0.05; done
  [ -s "$out/metrics.jsonl" ] || { echo "no step logged"; cat "$out.err"; exit 1; }
  local start=$SECONDS
  kill "-$sig" "$r1"
  local code=0
  wait "$launcher" || code=$?
  local took=$((SECONDS - start))
  [ "$code" -ne 0 ] || { echo "expected a failure after SIG$sig of rank 1"; cat "$out.err"; exit 1; }
  [ "$took" -le "$limit" ] || { echo "took ${took}s (limit ${limit}s)"; cat "$out.err"; exit 1; }
  grep -q "$message" "$out.err" || { echo "missing: $message"; cat "$out.err"; exit 1; }
  for p in "$r0" "$r1"; do
    if kill -0 "$p" 2>/dev/null && [ "$(ps -o stat= -p "$p" | cut -c1)" != Z ]; then
      echo "rank pid $p is still running"; exit 1
    fi
  done
  echo "SIG$sig of rank 1: exit $code after ${took}s"
}

fail_rank_1 KILL 20 "rank 1 failed (killed by signal 9" killed
# A frozen rank: the collective's timeout (6 s here) comes before the heartbeat watch (60 s) ...
fail_rank_1 STOP 45 "rank 0 of 2: .* failed: .* heartbeats: no heartbeat from rank 1 (last at step [0-9]*): stopped" \
  frozen-timeout
# ... and with a long collective timeout (an hour), the watch ends the job after 5 s of silence.
fail_rank_1 STOP 45 "rank 0 of 2: stopping: rank 1 sent no heartbeat for [0-9]* s (last at step [0-9]*): stopped" \
  frozen-watch --set train.dist_timeout_s=3600 --set train.dist_heartbeat_timeout_s=5

# A requeued SLURM job (scontrol requeue, or --requeue after a node failed) runs its batch script
# again: srun starts the same tasks with the same SLURM_JOB_ID and step, so rank 0 serves its
# store on the port it used in the failed attempt (whose connections may linger in TIME_WAIT).
# The script's one command, with --auto-resume, starts the run in the first attempt and continues
# it in the next. Attempt 1's rank 1 is killed at step 3 (kill -9, a node lost); both tasks fail;
# attempt 2 continues from the step-2 checkpoint. The job's id is chosen so that twins' port for
# it (10000 + id mod 20000) is free now.
port=$((10000 + RANDOM % 20000))
for _ in $(seq 1 50); do
  python3 -c "import socket; socket.socket().bind(('127.0.0.1', $port))" 2> /dev/null && break
  port=$((10000 + RANDOM % 20000))
done
slurm_attempt() {  # $1: the attempt (1: rank 1 is killed at step 3); its exit status: the ranks' failures
  local rank pids=() failed=0
  for rank in 0 1; do
    local fault=()
    [ "$1" = 1 ] && [ "$rank" = 1 ] && fault=(TWINS_FAULT='step@3#1')
    env SLURM_JOB_ID=$((port + 10000)) SLURM_STEP_ID=0 SLURM_PROCID=$rank SLURM_LOCALID=$rank SLURM_STEP_NUM_TASKS=2 \
      SLURM_STEP_NODELIST=127.0.0.1 "${fault[@]}" timeout 120 "$twins" pretrain "${common[@]}" \
      --set train.max_steps=6 --set train.checkpoint_every_steps=1 --set train.dist_timeout_s=60 --auto-resume \
      --out "$dir/slurm" > /dev/null 2> "$dir/slurm$1-$rank.err" &
    pids[rank]=$!
    pids_to_reap+=("$!")
  done
  for rank in 0 1; do wait "${pids[rank]}" || failed=$((failed + 1)); done
  return "$failed"
}
start=$SECONDS
if slurm_attempt 1; then echo "the first attempt should have failed"; cat "$dir"/slurm1-*.err; exit 1; fi
grep -q "x 2 ranks (gloo)" "$dir/slurm1-0.err" || { cat "$dir"/slurm1-*.err; exit 1; }
slurm_attempt 2 || { echo "the requeued attempt failed"; cat "$dir"/slurm2-*.err; exit 1; }
[ "$(cat "$dir"/slurm2-*.err | grep -c "resuming from $dir/slurm/checkpoints/step-00000002")" = 2 ] ||
  { echo "not every rank resumed"; cat "$dir"/slurm2-*.err; exit 1; }
grep -q '"steps":6' "$dir/slurm/metrics.jsonl" || { cat "$dir"/slurm2-*.err "$dir/slurm/metrics.jsonl"; exit 1; }
echo "a requeued SLURM job continues its run (port $port both times): $((SECONDS - start))s"

# PyTorch's own torchrun (Debian's python3-torch) starts a failed job again as a new attempt
# (--max_restarts) with the same command: --auto-resume starts the run in the first attempt and
# continues it in the next. Attempt 0's rank 1 is killed at step 3 (kill -9); attempt 1 resumes
# from the step-2 checkpoint and finishes. Debian's torchrun 1.13 under Python 3.11 reads its
# default "0" redirects as None (an IntFlag change): the wrapper below maps that back.
py=/usr/bin/python3
[ -x "$py" ] || py=python3
if "$py" -c 'import torch.distributed.run' 2> /dev/null; then
  cat > "$dir/rank.sh" << 'EOF'
#!/bin/sh
# One rank as torchrun starts it; rank 1 is killed at step 3 the first time it starts.
if [ "$RANK" = 1 ] && mkdir "$KILLED_ONCE" 2> /dev/null; then export TWINS_FAULT='step@3#1'; fi
exec "$@"
EOF
  chmod +x "$dir/rank.sh"
  torchrun=(-c 'import torch.distributed.elastic.multiprocessing as m, torch.distributed.elastic.multiprocessing.api as a
f = a.to_map
a.to_map = m.to_map = lambda v, n: f(a.Std.NONE if v is None else v, n)
from torch.distributed.run import main
main()')
  elastic=(--max_restarts 1 --monitor_interval 1 --no_python "$dir/rank.sh" "$twins" pretrain "${common[@]}"
           --set train.max_steps=6 --set train.checkpoint_every_steps=1 --set train.dist_timeout_s=60 --auto-resume)
  free_port() { "$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
  check_elastic() {  # $1: the run folder, then the agents' stderr files
    local run=$1
    shift
    grep -q "x 2 ranks (gloo)" "$@" || { cat "$@"; exit 1; }
    [ "$(cat "$@" | grep -c "resuming from $run/checkpoints/step-00000002")" = 2 ] ||
      { echo "not every rank resumed"; cat "$@"; exit 1; }
    grep -q '"steps":6' "$run/metrics.jsonl" || { cat "$@" "$run/metrics.jsonl"; exit 1; }
  }
  # One node: its agent serves the store on MASTER_PORT itself (TORCHELASTIC_USE_AGENT_STORE=True).
  start=$SECONDS
  KILLED_ONCE=$dir/elastic.killed timeout 300 "$py" "${torchrun[@]}" --nproc_per_node 2 --master_port "$(free_port)" \
    "${elastic[@]}" --out "$dir/elastic" > "$dir/out16" 2> "$dir/err16" || { echo "torchrun failed"; cat "$dir/err16"; exit 1; }
  check_elastic "$dir/elastic" "$dir/err16"
  echo "torchrun (agent store, a restarted attempt): $((SECONDS - start))s"
  # Two nodes, one agent each, meeting at a c10d rendezvous: the nodes' restart counts may differ
  # (TORCHELASTIC_RESTART_COUNT: an agent that starts again for the other node's failure does not
  # count it), each attempt has a MASTER_PORT of its own, and both ranks resume from the run
  # folder they share.
  start=$SECONDS
  endpoint=127.0.0.1:$(free_port)
  agents=()
  for node in 0 1; do
    KILLED_ONCE=$dir/nodes-elastic.killed timeout 300 "$py" "${torchrun[@]}" --nnodes 2 --nproc_per_node 1 \
      --rdzv_backend c10d --rdzv_endpoint "$endpoint" --rdzv_id twins-test "${elastic[@]}" --out "$dir/nodes-elastic" \
      > "$dir/out17-$node" 2> "$dir/err17-$node" &
    agents+=("$!")
    pids_to_reap+=("$!")
  done
  { wait "${agents[0]}" && wait "${agents[1]}"; } ||
    { echo "torchrun on two nodes failed"; cat "$dir/err17-0" "$dir/err17-1"; exit 1; }
  check_elastic "$dir/nodes-elastic" "$dir/err17-0" "$dir/err17-1"
  echo "torchrun (two nodes, c10d rendezvous, a restarted attempt): $((SECONDS - start))s"
else
  echo "torchrun: skipped (no python3-torch here)"
fi
echo "dist cli ok"

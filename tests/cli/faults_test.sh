#!/usr/bin/env bash
# Hard faults against the twins command, on a tiny IDX dataset made here:
#  1. SIGKILL at injected points (mid-step, half-way through a checkpoint write, just before and
#     just after its rename, while writing the backbone), then --resume: the backbone equals an
#     uninterrupted run's, byte for byte (also through --auto-resume), and no temporary file is
#     left; the same command without either is refused;
#  2. a full disk (a file-size limit): exit 1 with a message naming the file, no signal, no
#     temporary; the run starts again once there is room;
#  3. a second run on a folder in use fails at once;
#  4. usage errors exit 2;
#  5. a failed `twins embed` leaves the previous .npy and .ids.txt as they were;
#  6. `twins embed` stopped (SIGTERM) or killed continues to the uninterrupted result.
#  7. `twins knn` killed while extracting features continues to the uninterrupted run's cache;
#  8. the same with 2 ranks, one of them killed;
#  9. `twins embed` on 2 ranks killed, stopped, or killed while putting the ranks' rows together.
set -euo pipefail
twins=$1
quickstart=$2
dir=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$dir"
}
trap cleanup EXIT
fail() { echo "FAIL: $*"; for f in "$dir"/err*; do echo "== $f"; tail -5 "$f"; done; exit 1; }

n=256
{ printf '\x00\x00\x08\x03\x00\x00\x01\x00\x00\x00\x00\x1c\x00\x00\x00\x1c'; head -c $((n * 784)) /dev/urandom; } \
  > "$dir/train-images-idx3-ubyte"
{ printf '\x00\x00\x08\x01\x00\x00\x01\x00'; for ((i = 0; i < n; i++)); do printf "\\x0$((i % 10))"; done; } \
  > "$dir/train-labels-idx1-ubyte"
common=(--config "$quickstart" --set "data.root=$dir" --set data.split=train --set train.batch_size=32
        --set train.threads=1 --set train.workers=1 --set train.deterministic=true --set train.log_every=1
        --set online_probe.eval_data=null --set train.epochs=2 --set train.checkpoint_every_steps=1
        --set train.keep_checkpoints=2)

"$twins" pretrain "${common[@]}" --out "$dir/ref" > /dev/null 2> "$dir/err.ref" || fail "reference run"
[ -f "$dir/ref/backbone.safetensors" ] || fail "no reference backbone"

# 1. Killed at injected points, then resumed: the same backbone as the uninterrupted run.
i=0
for fault in "step@#3" "partial@step-#5" "before_rename@step-#9" "after_rename@step-#12" "partial@backbone#1"; do
  i=$((i + 1))
  set +e
  TWINS_FAULT="$fault" "$twins" pretrain "${common[@]}" --out "$dir/run$i" > /dev/null 2> "$dir/err.kill$i"
  code=$?
  set -e
  [ $code -eq 137 ] || fail "$fault: expected death by SIGKILL (137), got $code"
  # --resume, or the first command again with --auto-resume (as a launcher that restarts it runs it)
  resume=(--resume)
  ((i % 2 == 0)) && resume=("${common[@]}" --auto-resume)
  "$twins" pretrain "${resume[@]}" --out "$dir/run$i" > /dev/null 2> "$dir/err.resume$i" || fail "$fault: resume failed"
  cmp "$dir/ref/backbone.safetensors" "$dir/run$i/backbone.safetensors" || fail "$fault: resumed run differs"
  if find "$dir/run$i" -name '*.tmp-*' | grep -q .; then fail "$fault: temporary files left"; fi
done
# The first command again without either: refused, as its run would mix with the one there.
set +e
"$twins" pretrain "${common[@]}" --out "$dir/run1" > /dev/null 2> "$dir/err.again"
code=$?
set -e
[ $code -eq 2 ] || fail "a second run on a run folder: expected exit code 2, got $code"
grep -q "$dir/run1 already holds a run (.*): continue it with --resume" "$dir/err.again" || fail "no message for a used folder"
echo "kill and resume ok ($i fault points)"

# 2. A full disk: a 40 kB file-size limit lets config.json and metrics through, not a checkpoint.
set +e
(ulimit -f 40; "$twins" pretrain "${common[@]}" --out "$dir/full" > /dev/null 2> "$dir/err.full")
code=$?
set -e
[ $code -eq 1 ] || fail "full disk: expected exit code 1, got $code"
grep -q "step-00000001.safetensors: write failed (File too large: the file exceeds the size limit" "$dir/err.full" \
  || fail "full disk: no clear message"
if find "$dir/full" -name '*.tmp-*' | grep -q .; then fail "full disk: temporary files left"; fi
"$twins" pretrain "${common[@]}" --out "$dir/full" > /dev/null 2> "$dir/err.full2" || fail "after the full disk"
echo "full disk ok"

# 3. A folder in use.
"$twins" pretrain "${common[@]}" --set train.epochs=1000 --out "$dir/busy" > /dev/null 2> "$dir/err.busy1" &
pids+=($!)
for _ in $(seq 1 200); do [ -s "$dir/busy/metrics.jsonl" ] && break; sleep 0.05; done
set +e
timeout 20 "$twins" pretrain "${common[@]}" --out "$dir/busy" > /dev/null 2> "$dir/err.busy2"
code=$?
set -e
[ $code -eq 1 ] || fail "second run on a busy folder: expected exit code 1, got $code"
grep -q "in use by another twins process (pid ${pids[0]})" "$dir/err.busy2" || fail "no lock message"
kill -9 "${pids[0]}"
echo "lock ok"

# 4. Usage errors exit 2.
for args in "pretrain --bogus" "pretrain --config $quickstart --nproc-per-node 0" \
            "pretrain --config $quickstart --nproc-per-node -1" "pretrain --config $quickstart --stop-after -5" \
            "pretrain --config $quickstart --resume --auto-resume" "list optimisers" "embed --backbone x"; do
  set +e
  # shellcheck disable=SC2086
  "$twins" $args > /dev/null 2>&1
  code=$?
  set -e
  [ $code -eq 2 ] || fail "twins $args: expected exit code 2, got $code"
done
echo "usage errors ok"

# 5. A failed embed keeps the previous pair of files.
mkdir -p "$dir/images"
for k in 1 2 3; do { printf 'P5\n28 28\n255\n'; head -c 784 /dev/urandom; } > "$dir/images/$k.pgm"; done
"$twins" embed --backbone "$dir/ref" --input "$dir/images" --output "$dir/emb.npy" > /dev/null 2>&1 || fail "embed"
cp "$dir/emb.npy" "$dir/emb.before.npy"
cp "$dir/emb.ids.txt" "$dir/emb.before.ids.txt"
printf 'P5\n28 28\n255\nshort' > "$dir/images/4.pgm"
set +e
"$twins" embed --backbone "$dir/ref" --input "$dir/images" --output "$dir/emb.npy" > /dev/null 2> "$dir/err.embed"
code=$?
set -e
[ $code -eq 1 ] || fail "embed of a corrupt image: expected exit code 1, got $code"
grep -q "4.pgm" "$dir/err.embed" || fail "embed: the corrupt file is not named"
cmp "$dir/emb.npy" "$dir/emb.before.npy" || fail "embed: .npy changed"
cmp "$dir/emb.ids.txt" "$dir/emb.before.ids.txt" || fail "embed: ids changed"
echo "embed ok"

# 6. An embed stopped by SIGTERM after batch 2, or killed after batch 3 (its rows saved after
#    every batch), continues where it was to the files of one uninterrupted run; one whose
#    images changed meanwhile starts over. (43 images in batches of 8: 6 batches.)
rm "$dir/images/4.pgm"
for k in $(seq 10 49); do { printf 'P5\n28 28\n255\n'; head -c 784 /dev/urandom; } > "$dir/images/$k.pgm"; done
emb=(embed --backbone "$dir/ref" --input "$dir/images" --batch-size 8 --workers 1 --device cpu)
"$twins" "${emb[@]}" --output "$dir/full.npy" > /dev/null 2> "$dir/err.full" || fail "embed (uninterrupted)"
TWINS_FAULT="embed_batch@#2:TERM" "$twins" "${emb[@]}" --output "$dir/term.npy" > "$dir/out.term" 2> "$dir/err.term" \
  || fail "embed stopped by SIGTERM: exit code $?"
grep -q "embed: stopped at image 16 of 43 (state in $dir/term.npy.partial)" "$dir/out.term" || fail "embed: no stop line"
if [ -e "$dir/term.npy" ] || [ ! -s "$dir/term.npy.partial" ]; then fail "embed: stopped run's files"; fi
"$twins" "${emb[@]}" --output "$dir/term.npy" > /dev/null 2> "$dir/err.term2" || fail "embed continued"
grep -q "continuing $dir/term.npy.partial at image 16 of 43" "$dir/err.term2" || fail "embed: did not continue"
# Killed by SIGKILL at a fault point (its rows saved after every batch), then continued by the
# same command at an image: after batch 3 (24); half-way through its 4th state save, after
# batch 3 (the state says 16 rows, the file holds 24, which are cut back); right after its 7th
# (43 of 43 rows, not yet renamed).
killed_then_continued() {  # fault output-name image
  local rc=0
  TWINS_FAULT="$1" "$twins" "${emb[@]}" --save-every-s 0 --output "$dir/$2.npy" > /dev/null 2>&1 || rc=$?
  [ "$rc" -eq 137 ] || fail "embed ($1): expected death by SIGKILL (137), got $rc"
  "$twins" "${emb[@]}" --output "$dir/$2.npy" > /dev/null 2> "$dir/err.$2" || fail "embed continued ($2)"
  grep -q "continuing $dir/$2.npy.partial at image $3 of 43" "$dir/err.$2" || fail "embed: $2 did not continue at $3"
}
killed_then_continued "embed_batch@#3" kill 24
killed_then_continued "partial@kill2.npy.partial.json#4" kill2 16
killed_then_continued "after_rename@kill3.npy.partial.json#7" kill3 43
# A state file that is not one starts over.
TWINS_FAULT="embed_batch@#2:TERM" "$twins" "${emb[@]}" --output "$dir/garbage.npy" > /dev/null 2>&1 || fail "embed (garbage)"
echo '{"key": 7, "rows_done": "many"' > "$dir/garbage.npy.partial.json"
"$twins" "${emb[@]}" --output "$dir/garbage.npy" > /dev/null 2> "$dir/err.garbage" || fail "embed over a bad state"
grep -q "starting over: $dir/garbage.npy.partial" "$dir/err.garbage" || fail "embed: continued from a bad state"
for run in term kill kill2 kill3 garbage; do
  cmp "$dir/full.npy" "$dir/$run.npy" || fail "embed: $run.npy differs from the uninterrupted run's"
  cmp "$dir/full.ids.txt" "$dir/$run.ids.txt" || fail "embed: $run.ids.txt differs"
  if [ -e "$dir/$run.npy.partial" ] || [ -e "$dir/$run.npy.partial.json" ]; then fail "embed: $run left its partial files"; fi
done
# --workers auto (the default) embeds the same bytes; a count that is not one is a usage error.
emb_auto=(embed --backbone "$dir/ref" --input "$dir/images" --batch-size 8 --device cpu)
"$twins" "${emb_auto[@]}" --output "$dir/auto.npy" > /dev/null 2> "$dir/err.auto" || fail "embed --workers auto"
cmp "$dir/full.npy" "$dir/auto.npy" || fail "embed: --workers auto gives other rows"
rc=0
"$twins" "${emb_auto[@]}" --workers lots --output "$dir/lots.npy" > /dev/null 2> "$dir/err.lots" || rc=$?
[ "$rc" -eq 2 ] && grep -q -- '--workers.*"lots" is not a number of threads in \[0, 256\] or auto' "$dir/err.lots" \
  || { cat "$dir/err.lots"; fail "embed --workers lots: exit code $rc"; }
TWINS_FAULT="embed_batch@#2:TERM" "$twins" "${emb[@]}" --output "$dir/changed.npy" > /dev/null 2>&1 || fail "embed (to change)"
# One image rewritten in place (same name, same size, same count: its time tells).
{ printf 'P5\n28 28\n255\n'; head -c 784 /dev/urandom; } > "$dir/images/30.pgm"
"$twins" "${emb[@]}" --output "$dir/changed.npy" > "$dir/out.changed" 2> "$dir/err.changed" || fail "embed after a change"
grep -q "starting over: $dir/changed.npy.partial was written for other images" "$dir/err.changed" \
  || fail "embed: continued over changed images"
grep -q "wrote $dir/changed.npy \[43, " "$dir/out.changed" || fail "embed: not 43 rows after the change"
# While one embed writes an output, another on it fails at once.
refused_while_held() {  # output-name twins-arguments...
  local rc=0 name=$1
  shift
  exec 9> "$dir/$name.npy.lock"
  flock 9
  "$twins" "$@" --output "$dir/$name.npy" > /dev/null 2> "$dir/err.$name" || rc=$?
  exec 9>&-
  [ "$rc" -eq 1 ] && grep -q "another twins embed is writing it" "$dir/err.$name" \
    || fail "embed ($name): a busy output not refused"
}
refused_while_held busy "${emb[@]}"
echo "embed stop, kill and continue ok"

# 7. Features for knn (and linear-probe) killed after batch 5 of 8 (rows saved after every batch)
#    continue at image 160 of 256, to the cache files and scores of one uninterrupted run; a
#    state that is not one starts over; a partial file another process holds is left to it.
cat > "$dir/eval.json" <<JSON
{"train_data": {"type": "fashion_mnist", "root": "$dir", "split": "train"},
 "test_data": {"type": "fashion_mnist", "root": "$dir", "split": "train"},
 "image_size": 28, "normalize": {"mean": [0.5], "std": [0.3]}, "knn": {"k": [5]},
 "batch_size": 32, "workers": 1, "device": "cpu", "features_save_every_s": 0}
JSON
knn=(knn --backbone "$dir/ref" --config "$dir/eval.json")
"$twins" "${knn[@]}" --out "$dir/knn_full" > "$dir/out.knn_full" 2> "$dir/err.knn_full" || fail "knn (uninterrupted)"
train_cache=$(basename "$(ls "$dir"/knn_full/features-train-*.safetensors)")
rc=0
TWINS_FAULT="features_batch@#5" "$twins" "${knn[@]}" --out "$dir/knn_kill" > /dev/null 2>&1 || rc=$?
[ "$rc" -eq 137 ] || fail "knn: expected death by SIGKILL (137), got $rc"
[ -s "$dir/knn_kill/$train_cache.partial" ] || fail "knn: no partial features after the kill"
"$twins" "${knn[@]}" --out "$dir/knn_kill" > "$dir/out.knn_kill" 2> "$dir/err.knn_kill" || fail "knn continued"
grep -q "train features: continuing $dir/knn_kill/$train_cache.partial at image 160 of 256" "$dir/err.knn_kill" \
  || fail "knn: the features did not continue"
mkdir -p "$dir/knn_garbage"
echo '{"images": 256, "rows_done": 9' > "$dir/knn_garbage/$train_cache.partial.json"
"$twins" "${knn[@]}" --out "$dir/knn_garbage" > "$dir/out.knn_garbage" 2> "$dir/err.knn_garbage" || fail "knn (garbage)"
grep -q "train features: starting over" "$dir/err.knn_garbage" || fail "knn: continued from a bad state"
mkdir -p "$dir/knn_busy"
busy="$dir/knn_busy/$train_cache.partial"
head -c 1000 /dev/urandom > "$busy"
echo '{"key": "another process", "rows_done": 0}' > "$busy.json"
sums=$(cksum "$busy" "$busy.json")
exec 9> "$busy.lock"
flock 9
"$twins" "${knn[@]}" --out "$dir/knn_busy" > "$dir/out.knn_busy" 2> "$dir/err.knn_busy" || fail "knn (busy)"
exec 9>&-
grep -q "another process is extracting into" "$dir/err.knn_busy" || fail "knn: a busy partial file not left alone"
[ "$(cksum "$busy" "$busy.json")" = "$sums" ] || fail "knn: changed the partial files another process holds"
for run in kill garbage busy; do
  for f in "$dir"/knn_full/features-*.safetensors; do
    cmp "$f" "$dir/knn_$run/$(basename "$f")" || fail "knn: $run's $(basename "$f") differs from the uninterrupted run's"
  done
  diff <(grep "^kNN" "$dir/out.knn_full") <(grep "^kNN" "$dir/out.knn_$run") || fail "knn: $run scores differ"
  for f in "$dir/knn_$run"/*.partial "$dir/knn_$run"/*.partial.json; do
    if [ -e "$f" ] && [ "$f" != "$busy" ] && [ "$f" != "$busy.json" ]; then fail "knn: $run left $f"; fi
  done
done
echo "knn features kill and continue ok"

# 8 and 9 run 2 or 3 CPU ranks, through Gloo, which a twins built against a LibTorch without
# Gloo's headers (as a PyTorch wheel may be) lacks.
if ! "$twins" --version | grep -q '^collectives .*gloo'; then
  echo "knn and embed over ranks: skipped (this twins was built without Gloo)"
  exit 0
fi

# 8. The same over 2 ranks, each keeping its share in its own partial file: rank 1 killed after
#    its batch 3 of 4 (the launcher then stops rank 0) continues at image 96 of its 128, to the
#    cache files of an uninterrupted 2-rank run.
knn2=("${knn[@]}" --nproc-per-node 2 --set dist_timeout_s=120)
"$twins" "${knn2[@]}" --out "$dir/knn2_full" > "$dir/out.knn2_full" 2> "$dir/err.knn2_full" \
  || { cat "$dir/err.knn2_full"; fail "knn on 2 ranks (uninterrupted)"; }
rc=0
TWINS_FAULT="features_batch@(rank 1 of 2), batch#3" "$twins" "${knn2[@]}" --out "$dir/knn2_kill" > /dev/null \
  2> "$dir/err.knn2_killed" || rc=$?
[ "$rc" -eq 137 ] || fail "knn on 2 ranks: expected the job to end by rank 1's SIGKILL (137), got $rc"
[ -s "$dir/knn2_kill/$train_cache.rank1-of-2.partial" ] || fail "knn on 2 ranks: no partial features of rank 1"
"$twins" "${knn2[@]}" --out "$dir/knn2_kill" > "$dir/out.knn2_kill" 2> "$dir/err.knn2_kill" \
  || { cat "$dir/err.knn2_kill"; fail "knn on 2 ranks continued"; }
grep -q "train features (rank 1 of 2): continuing $dir/knn2_kill/$train_cache.rank1-of-2.partial at image 96 of 128" \
  "$dir/err.knn2_kill" || { cat "$dir/err.knn2_kill"; fail "knn on 2 ranks: rank 1's features did not continue"; }
for f in "$dir"/knn2_full/features-*.safetensors; do
  cmp "$f" "$dir/knn2_kill/$(basename "$f")" || fail "knn on 2 ranks: the continued $(basename "$f") differs"
done
diff <(grep "^kNN" "$dir/out.knn2_full") <(grep "^kNN" "$dir/out.knn2_kill") || fail "knn on 2 ranks: scores differ"
for f in "$dir"/knn2_kill/*.partial*; do
  if [ -e "$f" ]; then fail "knn on 2 ranks: left $f"; fi
done
echo "knn features over 2 ranks kill and continue ok"

# 9. `twins embed` on 2 ranks (43 images: rank 0 embeds 0-20, rank 1 21-42, in batches of 7, so
#    that the batches are one process's), each into its own rows file, which rank 0 then puts
#    together: the files of one process of as many threads; after rank 1 was killed after its
#    batch 2 (continued at 14 of its 22), a stop signal (both ranks stop, the command continues)
#    or rank 0 killed while putting them together (after rank 0's rows), the same files. A run
#    stopped on 3 ranks finishes on 2, its files gone; one killed between renaming the .npy and
#    the ids is finished by the next; 3 ranks embed 2 images (one has none); an output another
#    embed holds is refused.
export OMP_NUM_THREADS=1  # (every process, each rank too: the same threads give the same bits)
emb7=(embed --backbone "$dir/ref" --batch-size 7 --workers 1 --device cpu)
emb2=("${emb7[@]}" --input "$dir/images" --nproc-per-node 2 --save-every-s 0)
"$twins" "${emb7[@]}" --input "$dir/images" --output "$dir/r_one.npy" > /dev/null 2> "$dir/err.r_one" \
  || fail "embed in batches of 7"
"$twins" "${emb2[@]}" --output "$dir/r_full.npy" > "$dir/out.r_full" 2> "$dir/err.r_full" \
  || { cat "$dir/err.r_full"; fail "embed on 2 ranks (uninterrupted)"; }
grep -q "wrote $dir/r_full.npy \[43, " "$dir/out.r_full" || fail "embed on 2 ranks: not 43 rows"
cmp "$dir/r_one.npy" "$dir/r_full.npy" || fail "embed on 2 ranks: the features differ from one process's"
cmp "$dir/r_one.ids.txt" "$dir/r_full.ids.txt" || fail "embed on 2 ranks: the ids differ from one process's"
embed_ranks_continued() {  # fault output-name expected-exit-code line-of-the-second-run [ranks of the first run]
  local rc=0 first=("${emb2[@]}")
  [ -n "${5:-}" ] && first=("${emb7[@]}" --input "$dir/images" --nproc-per-node "$5" --save-every-s 0)
  TWINS_FAULT="$1" "$twins" "${first[@]}" --output "$dir/$2.npy" > "$dir/out.$2" 2> "$dir/err.$2" || rc=$?
  [ "$rc" -eq "$3" ] || { cat "$dir/err.$2"; fail "embed on ranks ($1): exit code $rc, not $3"; }
  if [ -e "$dir/$2.npy" ]; then fail "embed on ranks ($1): wrote the output"; fi
  "$twins" "${emb2[@]}" --output "$dir/$2.npy" > /dev/null 2> "$dir/err.$2.2" || fail "embed on 2 ranks continued ($2)"
  grep -q "$4" "$dir/err.$2.2" || { cat "$dir/err.$2.2"; fail "embed on 2 ranks: $2 did not say '$4'"; }
  cmp "$dir/r_full.npy" "$dir/$2.npy" || fail "embed on 2 ranks: $2.npy differs from the uninterrupted run's"
  cmp "$dir/r_full.ids.txt" "$dir/$2.ids.txt" || fail "embed on 2 ranks: $2.ids.txt differs"
  for f in "$dir/$2".npy.*partial* "$dir/$2".npy.lock; do
    if [ -e "$f" ]; then fail "embed on 2 ranks: $2 left $f"; fi
  done
}
embed_ranks_continued "embed_batch@r_kill.npy.rank1-of-2.partial, batch#2" r_kill 137 \
  "rank 1 of 2: continuing $dir/r_kill.npy.rank1-of-2.partial at image 14 of 22"
embed_ranks_continued "embed_batch@r_term.npy.rank0-of-2.partial, batch#1:TERM" r_term 0 \
  "rank 0 of 2: continuing $dir/r_term.npy.rank0-of-2.partial at image 7 of 21"
grep -q "embed: stopped before every rank's share was embedded" "$dir/out.r_term" || fail "embed on 2 ranks: no stop line"
embed_ranks_continued "embed_assemble@rank 0#1" r_assemble 137 "continuing $dir/r_assemble.npy.partial at image 21 of 43"
embed_ranks_continued "embed_batch@r_three.npy.rank0-of-3.partial, batch#1:TERM" r_three 0 "putting 2 ranks' rows" 3
# Killed between renaming the .npy and the ids (one process, then 2 ranks): the same command
# renames the ids, as the killed run would have, embedding nothing.
renamed_then_finished() {  # output-name reference-name twins-arguments...
  local rc=0 name=$1 reference=$2
  shift 2
  TWINS_FAULT="embed_renamed@#1" "$twins" "$@" --output "$dir/$name.npy" > /dev/null 2>&1 || rc=$?
  [ "$rc" -eq 137 ] || fail "embed ($name) killed between its renames: exit code $rc, not 137"
  if [ ! -e "$dir/$name.npy" ] || [ -e "$dir/$name.ids.txt" ]; then fail "embed ($name): not killed between the renames"; fi
  "$twins" "$@" --output "$dir/$name.npy" > "$dir/out.$name" 2> "$dir/err.$name" || fail "embed ($name) finished"
  grep -q "finishing the run that stopped between renaming the two" "$dir/out.$name" || fail "embed ($name): not finished"
  if grep -q "embedding" "$dir/err.$name"; then fail "embed ($name): embedded again"; fi
  cmp "$dir/$reference.npy" "$dir/$name.npy" && cmp "$dir/$reference.ids.txt" "$dir/$name.ids.txt" \
    || fail "embed ($name): the files differ from one uninterrupted run's"
  for f in "$dir/$name".npy.* "$dir/$name".ids.txt.*; do
    if [ -e "$f" ]; then fail "embed ($name) left $f"; fi
  done
}
renamed_then_finished r_renamed r_one "${emb7[@]}" --input "$dir/images"
renamed_then_finished r_renamed2 r_full "${emb2[@]}"
mkdir -p "$dir/two"
cp "$dir/images/10.pgm" "$dir/images/11.pgm" "$dir/two/"
"$twins" "${emb7[@]}" --input "$dir/two" --nproc-per-node 3 --output "$dir/r_two.npy" > "$dir/out.r_two" \
  2> "$dir/err.r_two" || { cat "$dir/err.r_two"; fail "embed of 2 images on 3 ranks"; }
grep -q "wrote $dir/r_two.npy \[2, " "$dir/out.r_two" || fail "embed of 2 images on 3 ranks: not 2 rows"
refused_while_held r_busy "${emb2[@]}"
[ -z "$(ls "$dir"/r_busy.npy.rank* 2> /dev/null)" ] || fail "embed on 2 ranks: a busy output's rank files were written"
echo "embed over 2 ranks kill, stop and continue ok"

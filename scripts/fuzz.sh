#!/usr/bin/env bash
# Runs every libFuzzer harness of tests/fuzz for N seconds (default 30) on a copy of its seed
# corpus (tests/fuzz/corpus/<harness>), with ASan + UBSan. Prints the executions per harness and
# exits non-zero on any finding (a crash, a sanitizer report, a leak, an out-of-memory, a
# timeout); the input that caused it is kept in build-asan/fuzz-findings/.
#   scripts/fuzz.sh [seconds] [harness ...]     (harnesses: config safetensors checkpoint idx cifar csv image shards)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-30}
shift || true
harnesses=("$@")
((${#harnesses[@]})) || harnesses=(config safetensors checkpoint idx cifar csv image)
scripts/sanitize.sh --build-only > /dev/null
# The shard reader's harness exists when the build found libarchive.
if ((! $#)) && [ -x build-asan/tests/fuzz/fuzz_shards ]; then harnesses+=(shards); fi
source scripts/sanitizer-env.sh
findings=build-asan/fuzz-findings
mkdir -p "$findings"
status=0
printf '%-12s %12s %10s  %s\n' harness executions "exec/s" result
for h in "${harnesses[@]}"; do
  corpus=$(mktemp -d)
  cp -r "tests/fuzz/corpus/$h/." "$corpus/"
  max_len=65536
  [ "$h" = cifar ] && max_len=200000
  log=$(mktemp)
  set +e
  "build-asan/tests/fuzz/fuzz_$h" "$corpus" -max_total_time="$seconds" -max_len="$max_len" -rss_limit_mb=2560 \
    -timeout=25 -print_final_stats=1 -artifact_prefix="$findings/$h-" > "$log" 2>&1
  code=$?
  set -e
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  if [ $code -eq 0 ]; then
    printf '%-12s %12s %10s  %s\n' "$h" "${runs:-?}" "${rate:-?}" "no findings"
  else
    printf '%-12s %12s %10s  %s\n' "$h" "${runs:-?}" "${rate:-?}" "FINDING (exit $code), see $findings/"
    grep -E "ERROR|SUMMARY|runtime error|==[0-9]+==" "$log" | head -20
    status=1
  fi
  rm -rf "$corpus" "$log"
done
exit $status

#!/usr/bin/env bash
# twins bench step end to end on a small batch: the rates as JSON, the operator profile
# (--profile: the table, its JSON and a Chrome trace), and a profile that could not be written
# refused before any step runs (exit code 2).
set -euo pipefail
twins=$1
recipe=$2
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
common=(bench step --config "$recipe" --set train.batch_size=4 --steps 1 --warmup 1)
"$twins" "${common[@]}" --json > "$dir/plain.json"
grep -q '"images_per_s": [0-9]' "$dir/plain.json" || { cat "$dir/plain.json"; exit 1; }
if grep -q '"profile"' "$dir/plain.json"; then echo "a profile without --profile"; exit 1; fi

"$twins" "${common[@]}" --profile "$dir/trace.json" --profile-steps 2 --profile-rows 3 --json > "$dir/out.json"
grep -q '"steps": 2' "$dir/out.json" || { cat "$dir/out.json"; exit 1; }
[ "$(grep -c '"self_ms"' "$dir/out.json")" -eq 3 ] || { cat "$dir/out.json"; exit 1; }
grep -q '"name": "aten::convolution_backward"' "$dir/out.json" || { cat "$dir/out.json"; exit 1; }
head -c 40 "$dir/trace.json" | grep -q '^{"displayTimeUnit":"ms","traceEvents":\[{' || { head -c 200 "$dir/trace.json"; exit 1; }
[ "$(tail -c 2 "$dir/trace.json")" = "]}" ] || { echo "trace not whole"; exit 1; }

"$twins" "${common[@]}" --profile "$dir/trace2.json" > "$dir/table.txt"
grep -q "^operators of 1 more step(s) under the profiler:" "$dir/table.txt" || { cat "$dir/table.txt"; exit 1; }
grep -q "^aten::convolution_backward " "$dir/table.txt" || { cat "$dir/table.txt"; exit 1; }
grep -q "span [0-9.]* ms$" "$dir/table.txt" || { cat "$dir/table.txt"; exit 1; }

set +e
"$twins" "${common[@]}" --profile "$dir/missing/trace.json" 2> "$dir/err"
code=$?
set -e
[ $code -eq 2 ] || { echo "expected exit code 2, got $code"; cat "$dir/err"; exit 1; }
grep -q "no folder $dir/missing" "$dir/err" || { cat "$dir/err"; exit 1; }
echo "bench ok"

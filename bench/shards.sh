#!/usr/bin/env bash
# Tar shards against the same images as a folder, through the real loader (`twins bench views`:
# decode + the recipe's views + batch assembly), then a pipe: source throttled per shard (`pv -L`)
# to show that reading several shards at once (data.shards_in_flight) hides a slow store.
#   bench/shards.sh [image folder] [seconds] [threads]
# Default folder: ../shared/data/imagewoof-320-bench/train (1,000 JPEGs, 320 px); the recipe is
# configs/vicreg_imagenet.json (224 px views); shuffle buffer 100 (this folder is only 1,000 images:
# a larger buffer would make each epoch wait for most of its shards before the first batch).
# Run it alone on the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
folder=${1:-../shared/data/imagewoof-320-bench/train}
seconds=${2:-20}
threads=${3:-$(nproc)}
twins=build/cli/twins
scripts/install-packages.sh bench/shards.sh pv
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

$twins shards create --input "$folder" --output "$work/train-%03d.tar" --max-count 100 > "$work/create.out" 2>/dev/null
urls=$(sed -n 's/.*"urls":"\([^"]*\)".*/\1/p' "$work/create.out")
echo "shards: $(grep -o 'wrote.*shard(s)' "$work/create.out")"
rate() {  # data block -> loader views/s per core
  $twins bench views --config configs/vicreg_imagenet.json --set "data=$1" --threads "$threads" --seconds "$seconds" --json |
    sed -n 's/.*"loader_views_per_s_per_core": \([0-9.e+-]*\).*/\1/p'
}
printf '%-44s %22s\n' source "loader views/s/core"
printf '%-44s %22.1f\n' "image folder" "$(rate "{\"type\": \"image_folder\", \"root\": \"$folder\"}")"
printf '%-44s %22.1f\n' "shards, local files" "$(rate "{\"type\": \"shards\", \"urls\": \"$urls\", \"index\": \"$work/train-index.json\", \"shuffle_buffer\": 100}")"
# Each shard through its own throttled pipe (2 MB/s, about 80 images/s of these JPEGs).
index="$work/pipe-index.json"
sed "s|\"url\": \"$work/|\"url\": \"pipe:pv -q -L 2m $work/|" "$work/train-index.json" | grep -v '"bytes"' > "$index"
for k in 1 4 10; do
  printf '%-44s %22.1f\n' "pipe:pv -L 2m, shards_in_flight $k" \
    "$(rate "{\"type\": \"shards\", \"urls\": \"pipe:pv -q -L 2m $urls\", \"index\": \"$index\", \"shards_in_flight\": $k, \"shuffle_buffer\": 100}")"
done

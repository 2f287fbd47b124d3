#!/usr/bin/env bash
# Installs twins into a temporary prefix and builds tests/consumer/ against it with
# find_package(twins), then runs the consumer (losses, and Embedder on a backbone file made by the
# installed twins command): proof that the exported package works.
set -euo pipefail
cd "$(dirname "$0")/.."
prefix=$(mktemp -d); work=$(mktemp -d)
trap 'rm -rf "$prefix" "$work"' EXIT
cmake --install build --prefix "$prefix" >/dev/null
cmake -S tests/consumer -B "$work" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$prefix" >/dev/null
cmake --build "$work"
"$prefix/bin/twins" export --backbone 'random:{"type": "resnet18", "width": 8}' --out "$work/backbone.safetensors"
"$work/twins_consumer" "$work/backbone.safetensors"
echo "install check ok"

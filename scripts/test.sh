#!/usr/bin/env bash
# Sets up (scripts/setup.sh), then runs the whole test suite with ctest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# The tests also read .npy files back with NumPy, as users will, TensorBoard event files with
# the protobuf library and the crc32c package, and start ranks with PyTorch's own torchrun.
scripts/install-packages.sh test python3-numpy python3-protobuf python3-crc32c python3-torch
ctest --test-dir build --output-on-failure -j "$(nproc)" "$@"
scripts/check-install.sh
# The same suite under AddressSanitizer + UndefinedBehaviorSanitizer, then every fuzzer briefly.
scripts/sanitize.sh
seconds=${TWINS_FUZZ_SECONDS:-30}
if [ "$seconds" -gt 0 ]; then scripts/fuzz.sh "$seconds"; fi

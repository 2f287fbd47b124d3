#!/usr/bin/env bash
# Sets up (scripts/setup.sh), then runs the whole test suite with ctest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# The tests also read .npy files back with NumPy, as users will.
if ! dpkg-query -W -f='${Status}' python3-numpy 2>/dev/null | grep -q "install ok installed"; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends python3-numpy
fi
ctest --test-dir build --output-on-failure -j "$(nproc)" "$@"
scripts/check-install.sh
# The same suite under AddressSanitizer + UndefinedBehaviorSanitizer, then every fuzzer briefly.
scripts/sanitize.sh
seconds=${TWINS_FUZZ_SECONDS:-30}
if [ "$seconds" -gt 0 ]; then scripts/fuzz.sh "$seconds"; fi

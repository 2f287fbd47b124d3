#!/usr/bin/env bash
# The whole test suite again under AddressSanitizer + UndefinedBehaviorSanitizer (clang), in
# build-asan/, with the libFuzzer harnesses built against the same instrumented library.
# Installs clang and its runtimes from Debian when missing (needs scripts/setup.sh's packages).
set -euo pipefail
cd "$(dirname "$0")/.."
packages=(clang libclang-rt-14-dev)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "sanitize: installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
extra=()
command -v ccache >/dev/null && extra+=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
if [ ! -f build-asan/build.ninja ]; then
  # -O1 with line tables: readable reports, a quick build; assertions stay on.
  cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER=clang++ \
    -DCMAKE_CXX_FLAGS_RELEASE="-O1 -gline-tables-only" -DTWINS_SANITIZE=ON -DTWINS_BUILD_FUZZERS=ON "${extra[@]}"
fi
cmake --build build-asan -j "$(nproc)"
if [ "${1:-}" = "--build-only" ]; then exit 0; fi
source scripts/sanitizer-env.sh
ctest --test-dir build-asan --output-on-failure -j "$(nproc)"
echo "sanitizers: the suite is clean under ASan + UBSan"

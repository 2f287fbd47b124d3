#!/usr/bin/env bash
# The whole test suite again under AddressSanitizer + UndefinedBehaviorSanitizer (clang), in
# build-asan/, with the libFuzzer harnesses built against the same instrumented library.
# Installs clang and its runtimes from Debian when missing (needs scripts/setup.sh's packages).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-packages.sh sanitize clang libclang-rt-14-dev
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

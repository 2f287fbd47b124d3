#!/usr/bin/env bash
# Installs what twins needs on Debian 12 (as root, or with sudo) and builds it into build/.
# Idempotent: packages already present are not fetched again, and the build is incremental.
set -euo pipefail
cd "$(dirname "$0")/.."

# libopenblas0-pthread: LibTorch's matrix products go through libblas.so.3, which is the slow
# reference BLAS unless OpenBLAS provides it (kNN 15x, small-model training 2.5x faster here).
packages=(libtorch-dev libgloo-dev libopencv-dev libarchive-dev libcli11-dev nlohmann-json3-dev doctest-dev libopenblas0-pthread
          cmake ninja-build g++ dataset-fashion-mnist)
scripts/install-packages.sh setup "${packages[@]}"

build_type=${TWINS_BUILD_TYPE:-Release}
extra=()
command -v ccache >/dev/null && extra+=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
if [ ! -f build/build.ninja ]; then
  cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE="$build_type" "${extra[@]}"
fi
# LibTorch translation units take ~1 GB each to compile; one job per core keeps memory in check.
cmake --build build -j "$(nproc)"

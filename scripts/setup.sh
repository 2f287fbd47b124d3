#!/usr/bin/env bash
# Installs what twins needs on Debian 12 (as root, or with sudo) and builds it into build/.
# Idempotent: packages already present are not fetched again, and the build is incremental.
#
# On a GPU machine, build against a CUDA LibTorch instead of Debian's CPU one:
#   TWINS_TORCH=python scripts/setup.sh          # the LibTorch inside the installed PyTorch
#   TWINS_TORCH=/opt/libtorch scripts/setup.sh   # a LibTorch folder (download from pytorch.org)
# The other libraries come from Debian when apt-get is there, else from a prefix you name:
#   TWINS_PREFIX=/opt/twins-deps (OpenCV core/imgproc/imgcodecs, CLI11, nlohmann/json, doctest;
#   libarchive optional). The build goes to build/ (TWINS_BUILD_DIR to change), with
#   TWINS_CMAKE_ARGS passed to CMake (e.g. -DCMAKE_CUDA_ARCHITECTURES=90).
set -euo pipefail
cd "$(dirname "$0")/.."
torch=${TWINS_TORCH:-}
prefix=${TWINS_PREFIX:-}
build=${TWINS_BUILD_DIR:-build}

# libopenblas0-pthread: LibTorch's matrix products go through libblas.so.3, which is the slow
# reference BLAS unless OpenBLAS provides it (kNN 15x, small-model training 2.5x faster here).
packages=(libtorch-dev libgloo-dev libopencv-dev libarchive-dev libcli11-dev nlohmann-json3-dev doctest-dev libopenblas0-pthread
          cmake ninja-build g++ dataset-fashion-mnist)
prefix_path=()
if [ -n "$torch" ]; then
  kept=()
  for p in "${packages[@]}"; do [[ $p == libtorch-dev || $p == libgloo-dev ]] || kept+=("$p"); done
  packages=("${kept[@]}")
  if [ "$torch" = python ]; then
    torch=$(python3 -c "import torch; print(torch.utils.cmake_prefix_path)") ||
      { echo "setup: TWINS_TORCH=python but python3 cannot import torch" >&2; exit 1; }
  else  # a LibTorch folder (share/cmake/Torch), or any folder holding Torch/TorchConfig.cmake
    for sub in share/cmake lib/cmake cmake; do
      if [ -f "$torch/$sub/Torch/TorchConfig.cmake" ]; then torch=$torch/$sub; break; fi
    done
  fi
  [ -f "$torch/Torch/TorchConfig.cmake" ] ||
    { echo "setup: no Torch/TorchConfig.cmake under $torch (TWINS_TORCH: python or a LibTorch folder)" >&2; exit 1; }
  prefix_path+=("$torch")
fi
if [ -n "$prefix" ]; then
  prefix_path+=("$prefix")
elif command -v apt-get >/dev/null; then
  scripts/install-packages.sh setup "${packages[@]}"
else
  echo "setup: no apt-get here: name a prefix holding OpenCV, CLI11, nlohmann/json and doctest with TWINS_PREFIX" >&2
  exit 1
fi

build_type=${TWINS_BUILD_TYPE:-Release}
extra=()
command -v ccache >/dev/null && extra+=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
if ((${#prefix_path[@]})); then
  extra+=("-DCMAKE_PREFIX_PATH=$(IFS=';'; echo "${prefix_path[*]}")")
  if [ -n "$prefix" ] && [ -d "$prefix/lib/cmake/opencv4" ]; then extra+=("-DOpenCV_DIR=$prefix/lib/cmake/opencv4"); fi
fi
# shellcheck disable=SC2206
extra+=(${TWINS_CMAKE_ARGS:-})
if [ ! -f "$build/build.ninja" ] || ((${#prefix_path[@]})) || [ -n "${TWINS_CMAKE_ARGS:-}" ]; then
  cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE="$build_type" "${extra[@]}"
fi
# LibTorch translation units take ~1 GB each to compile; one job per core keeps memory in check.
cmake --build "$build" -j "$(nproc)"

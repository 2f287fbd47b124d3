#!/usr/bin/env bash
# Checks the sources against LibTorch 2.x without a GPU machine, from Debian's own packages (as
# root; needs deb.debian.org). CI builds with Debian 12's LibTorch 1.13 only; the GPU machines run
# 2.x, so this is how a 2.x break shows up before GPU time is spent on it.
#
#   scripts/check-libtorch2.sh cpu    a Debian 13 chroot (debootstrap) with its LibTorch 2.6 (CPU):
#                                     builds twins there, runs the whole ctest and the install
#                                     check (find_package(twins) from tests/consumer) (about 25 minutes
#                                     on 2 cores the first time); TWINS_CHECK_SUITE=sid takes
#                                     Debian unstable instead (LibTorch 2.14 in November 2026)
#   scripts/check-libtorch2.sh cuda   builds twins against Debian 13's CUDA LibTorch 2.6 headers and
#                                     libraries (contrib, extracted, not installed) and this
#                                     machine's CUDA toolkit (CUDA_HOME, default /usr/local/cuda):
#                                     every source compiles and links; nothing runs (no GPU)
#   scripts/check-libtorch2.sh headers  every source, the CUDA ones included, compiled (syntax
#                                     only; `cuda`'s build configured, not built, when `cuda` has
#                                     not run: about 10 minutes) against the headers of the newest LibTorch
#                                     Debian has (TWINS_CHECK_SUITE, default sid: 2.14 in November
#                                     2026; its CPU libtorch-dev ships the ATen/c10 CUDA and NCCL
#                                     headers too), in the C++ standard it asks for: a newer
#                                     LibTorch's API changes show up here before a GPU run
#   scripts/check-libtorch2.sh kit    the GPU machine's situation without its GPU: a Debian chroot
#                                     (TWINS_CHECK_SUITE, default sid) holding LibTorch and the
#                                     build tools only (no OpenCV, CLI11, json, doctest, libarchive
#                                     or Gloo headers), twins built by `TWINS_PREFIX=<kit>
#                                     scripts/setup.sh` with the other libraries from the kit
#                                     (TWINS_KIT, default ../shared/gpu/twins-gpu-kit), then the
#                                     whole ctest and the install check (find_package(twins)
#                                     with the kit on CMAKE_PREFIX_PATH): what the GPU run's build
#                                     and test stages, and a program using the library there, meet
# Work folder: TWINS_CHECK_DIR (default /tmp/twins-libtorch2). Notes from the first runs
# (2026-11-29): the CPU LibTorch 2.6 there is built on the system's oneDNN 3.7, whose fp32
# convolution input gradients and bf16 outputs are wrong on our AMD EPYC (AVX512-BF16) machines;
# twins detects that and trains with oneDNN off (slower: the cli_faults test then exceeds its 300 s
# limit).
set -euo pipefail
cd "$(dirname "$0")/.."
src=$PWD
mode=${1:-}
work=${TWINS_CHECK_DIR:-/tmp/twins-libtorch2}
mirror=http://deb.debian.org/debian
mkdir -p "$work"
# Configures (not builds) $work/build-cuda against Debian 13's CUDA LibTorch 2.6 (contrib,
# extracted, not installed) and this machine's CUDA toolkit.
configure_cuda() {
  cuda=${CUDA_HOME:-/usr/local/cuda}
  [ -x "$cuda/bin/nvcc" ] || { echo "check-libtorch2: no CUDA toolkit at $cuda (CUDA_HOME)" >&2; exit 1; }
  lt=$work/libtorch-cuda
  if [ ! -f "$lt/usr/lib/x86_64-linux-gnu/libtorch_cuda.so.2.6.0" ]; then
    curl -fsS -o "$work/contrib.xz" "$mirror/dists/trixie/contrib/binary-amd64/Packages.xz"
    for p in libtorch-cuda-dev libtorch-cuda-2.6; do
      f=$(xzcat "$work/contrib.xz" | awk -v p="$p" '$1 == "Package:" { hit = ($2 == p) } hit && $1 == "Filename:" && f == "" { f = $2 } END { print f }')
      curl -fsS -o "$work/$p.deb" "$mirror/$f"
      dpkg -x "$work/$p.deb" "$lt"
    done
    # Debian's TorchConfig looks for the libraries in <prefix>/lib, they are in lib/<triplet>.
    for l in libtorch libc10 libtorch_cpu libtorch_cuda libc10_cuda libcaffe2_nvrtc; do
      ln -sf "x86_64-linux-gnu/$l.so" "$lt/usr/lib/$l.so"
    done
  fi
  # CUDA 13 has no libnvToolsExt (NVTX 3 is headers only), which Caffe2's 2.6 CMake still names.
  echo 'if(NOT TARGET CUDA::nvToolsExt)
  add_library(CUDA::nvToolsExt INTERFACE IMPORTED)
endif()' > "$work/nvtx.cmake"
  launcher=()
  command -v ccache > /dev/null && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
  PATH=$cuda/bin:$PATH cmake -S "$src" -B "$work/build-cuda" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_PREFIX_PATH="$lt/usr/lib/x86_64-linux-gnu/cmake" -DCMAKE_CUDA_ARCHITECTURES=90 \
    -DTORCH_LIBRARY="$lt/usr/lib/x86_64-linux-gnu/libtorch.so" -DCMAKE_PROJECT_INCLUDE="$work/nvtx.cmake" \
    -DCMAKE_EXE_LINKER_FLAGS=-Wl,--allow-shlib-undefined "${launcher[@]}" > "$work/configure.log"
  grep -E "twins collectives" "$work/configure.log"
}

case $mode in
  cpu)
    suite=${TWINS_CHECK_SUITE:-trixie}
    root=$work/$suite
    scripts/install-packages.sh check-libtorch2 debootstrap
    if [ ! -x "$root/usr/bin/cmake" ]; then
      debootstrap --variant=minbase --include=libtorch-dev,libgloo-dev,libopencv-dev,libarchive-dev,libcli11-dev,nlohmann-json3-dev,doctest-dev,libopenblas0-pthread,cmake,ninja-build,g++,python3-numpy \
        "$suite" "$root" "$mirror"
    fi
    # (python3-numpy: one test loads twins' .npy files with NumPy; a chroot made before it was listed)
    chroot "$root" bash -c 'dpkg -s python3-numpy > /dev/null 2>&1 ||
      { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-numpy > /dev/null; }'
    mkdir -p "$root/src" "$root/proc" "$root/dev"
    mountpoint -q "$root/src" || mount --bind "$src" "$root/src"
    mountpoint -q "$root/proc" || mount -t proc proc "$root/proc"
    mountpoint -q "$root/dev" || mount --bind /dev "$root/dev"
    trap 'umount "$root/dev" "$root/proc" "$root/src" 2> /dev/null || true' EXIT
    chroot "$root" bash -c 'cmake -S /src -B /build -G Ninja -DCMAKE_BUILD_TYPE=Release > /dev/null &&
      cmake --build /build -j "$(nproc)" && /build/cli/twins --version &&
      ctest --test-dir /build -j "$(nproc)" --timeout 900 --output-on-failure &&
      rm -rf /tmp/prefix /tmp/consumer && cmake --install /build --prefix /tmp/prefix > /dev/null &&
      cmake -S /src/tests/consumer -B /tmp/consumer -G Ninja -DCMAKE_PREFIX_PATH=/tmp/prefix > /dev/null &&
      cmake --build /tmp/consumer && /tmp/prefix/bin/twins export --out /tmp/consumer/backbone.safetensors \
        --backbone "random:{\"type\": \"resnet18\", \"width\": 8}" && /tmp/consumer/twins_consumer /tmp/consumer/backbone.safetensors'
    ;;
  kit)
    suite=${TWINS_CHECK_SUITE:-sid}
    kit=$(cd "${TWINS_KIT:-$src/../shared/gpu/twins-gpu-kit}" && pwd)
    [ -f "$kit/lib/cmake/opencv4/OpenCVConfig.cmake" ] ||
      { echo "check-libtorch2 kit: no OpenCV package under $kit (TWINS_KIT)" >&2; exit 1; }
    root=$work/kit-$suite
    scripts/install-packages.sh check-libtorch2 debootstrap
    if [ ! -x "$root/usr/bin/cmake" ]; then
      debootstrap --variant=minbase --include=libtorch-dev,cmake,ninja-build,g++,python3-numpy "$suite" "$root" "$mirror"
    fi
    # What the kit stands in for must not come from the distribution, or the check proves nothing.
    for p in libopencv-dev libopencv-core-dev libcli11-dev nlohmann-json3-dev doctest-dev libarchive-dev libgloo-dev; do
      if chroot "$root" dpkg -s "$p" > /dev/null 2>&1; then
        echo "check-libtorch2 kit: $p is installed in $root; the kit would not be what the build uses" >&2
        exit 1
      fi
    done
    mkdir -p "$root/src" "$root/kit" "$root/proc" "$root/dev"
    mountpoint -q "$root/src" || mount --bind "$src" "$root/src"
    mountpoint -q "$root/kit" || mount --bind -o ro "$kit" "$root/kit"
    mountpoint -q "$root/proc" || mount -t proc proc "$root/proc"
    mountpoint -q "$root/dev" || mount --bind /dev "$root/dev"
    trap 'umount "$root/dev" "$root/proc" "$root/kit" "$root/src" 2> /dev/null || true' EXIT
    chroot "$root" bash -c 'cd /src && TWINS_PREFIX=/kit TWINS_BUILD_DIR=/build scripts/setup.sh > /build.log 2>&1 ||
        { tail -40 /build.log; exit 1; }
      grep -E "twins collectives" /build.log; /build/cli/twins --version &&
      ctest --test-dir /build -j "$(nproc)" --timeout 900 --output-on-failure &&
      rm -rf /tmp/prefix /tmp/consumer && cmake --install /build --prefix /tmp/prefix > /dev/null &&
      cmake -S /src/tests/consumer -B /tmp/consumer -G Ninja -DCMAKE_PREFIX_PATH="/tmp/prefix;/kit" \
        -DOpenCV_DIR=/kit/lib/cmake/opencv4 > /dev/null &&
      cmake --build /tmp/consumer > /dev/null && /tmp/prefix/bin/twins export --out /tmp/consumer/backbone.safetensors \
        --backbone "random:{\"type\": \"resnet18\", \"width\": 8}" &&
      /tmp/consumer/twins_consumer /tmp/consumer/backbone.safetensors'
    ;;
  cuda)
    configure_cuda
    # Linking the tests also lists their cases by running the binary, which fails here (the
    # libraries' own dependencies are absent): judge by the compiler's errors and the binaries.
    cmake --build "$work/build-cuda" -j "$(nproc)" -- -k 0 > "$work/build.log" 2>&1 || true
    if grep -E "error:|undefined reference to .twins" "$work/build.log" | grep -v "^/usr/bin/ld: $lt"; then
      echo "check-libtorch2 cuda: errors above ($work/build.log)" >&2
      exit 1
    fi
    for b in cli/twins tests/twins_tests; do
      [ -x "$work/build-cuda/$b" ] || { echo "check-libtorch2 cuda: no $b ($work/build.log)" >&2; exit 1; }
    done
    echo "check-libtorch2 cuda: every source compiled and linked against LibTorch 2.6 + CUDA ($("$cuda/bin/nvcc" --version | tail -1))"
    ;;
  headers)
    cuda=${CUDA_HOME:-/usr/local/cuda}
    cdir=$work/build-cuda
    # The compile commands of the CUDA build (configured here when `cuda` has not run; only
    # configured: a syntax check needs no build).
    [ -f "$cdir/build.ninja" ] || configure_cuda
    suite=${TWINS_CHECK_SUITE:-sid}
    new=$work/libtorch-dev-$suite
    if [ ! -d "$new/usr/include/ATen" ]; then
      curl -fsS -o "$work/main-$suite.xz" "$mirror/dists/$suite/main/binary-amd64/Packages.xz"
      f=$(xzcat "$work/main-$suite.xz" | awk '$1 == "Package:" { hit = ($2 == "libtorch-dev") } hit && $1 == "Filename:" && f == "" { f = $2 } END { print f }')
      curl -fsS -o "$work/libtorch-dev-$suite.deb" "$mirror/$f"
      dpkg -x "$work/libtorch-dev-$suite.deb" "$new"
    fi
    # Generated only by CUDA builds of LibTorch; what it says for a shared-library build.
    mkdir -p "$work/stub/c10/cuda/impl"
    printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$work/stub/c10/cuda/impl/cuda_cmake_macros.h"
    std=$(sed -n 's/.*CXX_STANDARD \([0-9][0-9]*\).*/\1/p' "$new"/usr/lib/*/cmake/Torch/TorchConfig.cmake | head -1)
    version=$(dpkg-deb -f "$work/libtorch-dev-$suite.deb" Version)
    ninja -C "$cdir" -t compdb > "$work/compdb.json"
    python3 - "$work/compdb.json" "$work/libtorch-cuda/usr" "$new/usr" "$work/stub" "${std:-17}" "$(nproc)" "$cdir" <<'PY'
import json, shlex, subprocess, sys
from concurrent.futures import ThreadPoolExecutor
compdb, old, new, stub, std, jobs, cdir = sys.argv[1:]
commands = []
for entry in json.load(open(compdb)):
    if not entry["file"].endswith(".cpp"):
        continue
    words, args = shlex.split(entry["command"].replace(old + "/lib/../include", new + "/include").replace(old, new)), []
    words = words[1:] if words[0].endswith("ccache") else words
    skip = 0
    for w in words:
        if skip:
            skip -= 1
        elif w in ("-o", "-MT", "-MF"):
            skip = 1
        elif w not in ("-MD", "-c"):
            args.append("-std=c++" + std if w.startswith("-std=") else w)
    commands.append((entry["file"], args[:1] + ["-isystem", stub] + args[1:] + ["-fsyntax-only"]))
def check(item):
    return item[0], subprocess.run(item[1], capture_output=True, text=True, cwd=cdir)
failed = 0
with ThreadPoolExecutor(int(jobs)) as pool:
    for name, result in pool.map(check, commands):
        if result.returncode:
            failed += 1
            print(f"FAILED {name}\n" + "\n".join(result.stderr.splitlines()[:40]))
print(f"{len(commands) - failed} of {len(commands)} sources compile against these headers")
sys.exit(1 if failed else 0)
PY
    echo "check-libtorch2 headers: LibTorch ${version:-?} headers ($suite), C++${std:-17}, CUDA $("$cuda/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')"
    ;;
  *)
    echo "usage: scripts/check-libtorch2.sh cpu|cuda|headers|kit" >&2
    exit 2
    ;;
esac

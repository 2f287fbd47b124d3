#!/usr/bin/env bash
# Installs the real PyTorch and torchvision for Python from Debian. They are used only to
# regenerate reference outputs under tests/reference/ and for side-by-side benchmarks in bench/;
# twins itself never needs them.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-packages.sh setup-reference python3-torch python3-torchvision python3-numpy

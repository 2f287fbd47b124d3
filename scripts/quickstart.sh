#!/usr/bin/env bash
# The README's first command: sets up twins (scripts/setup.sh) and runs its main job.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
build/cli/twins --version
build/cli/twins --help

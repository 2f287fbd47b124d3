#!/usr/bin/env bash
# Views per second: twins beside torchvision (PIL + DataLoader), same machine, same run.
#   bench/views.sh [threads] [seconds]       (needs scripts/setup-reference.sh for torchvision)
# Data: ../shared/data/cifar10 (CIFAR pipeline, 32 px) and ../shared/data/imagewoof-320-bench
# (BYOL pipeline, 224 px, real JPEGs). Override with CIFAR_ROOT / IMAGES_ROOT.
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-2}
seconds=${2:-12}
cifar=${CIFAR_ROOT:-../shared/data/cifar10/cifar-10-batches-bin}
images=${IMAGES_ROOT:-../shared/data/imagewoof-320-bench/train}
twins=build/cli/twins
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

$twins bench views --config configs/vicreg_cifar10.json --set "data.root=$cifar" \
  --threads "$threads" --seconds "$seconds" --json > "$out/twins_cifar.json"
$twins bench views --config configs/byol_imagenet.json --set "data.root=$images" \
  --threads "$threads" --seconds "$seconds" --json > "$out/twins_byol.json"
/usr/bin/python3 bench/reference/views_torchvision.py --pipeline cifar --root "$cifar" \
  --workers "$threads" --seconds "$((seconds / 3))" > "$out/tv_cifar.json"
/usr/bin/python3 bench/reference/views_torchvision.py --pipeline byol --root "$images" \
  --workers "$threads" --seconds "$((seconds / 3))" > "$out/tv_byol.json"
# The same pipeline with PIL's blur, as the official VICReg/Barlow Twins code, solo-learn and lightly run it.
/usr/bin/python3 bench/reference/views_torchvision.py --pipeline byol --root "$images" --blur pil \
  --workers "$threads" --seconds "$((seconds / 3))" > "$out/pil_byol.json"

/usr/bin/python3 - "$out" "$threads" <<'PY'
import json, sys
out, threads = sys.argv[1], sys.argv[2]
print(f"views per second per core, {threads} thread(s)/worker(s); torchvision: T.GaussianBlur(23) (torchvision's "
      f"recipes), PIL blur: ImageFilter.GaussianBlur (official VICReg/Barlow Twins code, solo-learn, lightly)")
print(f"{'pipeline':10} {'':24} {'twins':>8} {'torchvision':>12} {'ratio':>7} {'PIL blur':>9} {'ratio':>7}")
for p in ["cifar", "byol"]:
    t = json.load(open(f"{out}/twins_{p}.json")); r = json.load(open(f"{out}/tv_{p}.json"))
    q = json.load(open(f"{out}/pil_{p}.json")) if p == "byol" else None  # CIFAR's recipe has no blur
    rows = [("augmentation (no decode)", "augment_views_per_s_per_core", "augment_views_per_s_per_core"),
            ("decode, images/s/core", "decode_images_per_s_per_core", "decode_images_per_s"),
            ("loader, end to end", "loader_views_per_s_per_core", "loader_views_per_s_per_core")]
    for name, tk, rk in rows:
        a, b = t[tk], r[rk]
        pil = f"{q[rk]:9.0f} {a / q[rk]:6.1f}x" if q else f"{'-':>9} {'-':>7}"
        print(f"{p:10} {name:24} {a:8.0f} {b:12.0f} {a / b:6.1f}x {pil}")
PY

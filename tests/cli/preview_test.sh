#!/usr/bin/env bash
# twins preview end to end on a tiny image folder: a PNG comes out, the same bytes with 1 or 3
# workers, and a bad key in the recipe is a clear error with exit code 2.
set -euo pipefail
twins=$1
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
mkdir -p "$dir/images/a" "$dir/images/b"
for i in 1 2 3; do
  for c in a b; do
    { printf 'P6\n40 30\n255\n'; head -c 3600 /dev/urandom; } > "$dir/images/$c/$i.ppm"
  done
done
cat > "$dir/recipe.json" <<JSON
{"data": {"type": "image_folder", "root": "$dir/images"},
 "train": {"seed": 5},
 "views": [[{"type": "random_resized_crop", "size": 24}, {"type": "color_jitter", "brightness": 0.4, "hue": 0.1}],
           [{"type": "random_resized_crop", "size": 16}, {"type": "solarization", "p": 0.5}]]}
JSON
"$twins" preview --config "$dir/recipe.json" --count 5 --workers 1 --out "$dir/one.png"
"$twins" preview --config "$dir/recipe.json" --count 5 --workers 3 --out "$dir/three.png"
cmp "$dir/one.png" "$dir/three.png"
[ "$(head -c 8 "$dir/one.png" | od -An -tx1 | tr -d ' \n')" = "89504e470d0a1a0a" ]
set +e
"$twins" preview --config "$dir/recipe.json" --set views.0.0.sise=3 --out "$dir/x.png" 2> "$dir/err"
code=$?
set -e
[ $code -eq 2 ] || { echo "expected exit code 2, got $code"; exit 1; }
grep -q "unknown key" "$dir/err" || { cat "$dir/err"; exit 1; }
echo "preview ok"

#!/usr/bin/env bash
# Regenerates the seed corpora of tests/fuzz/corpus/ (small valid inputs of every format) with
# a built twins command: tests/fuzz/make_corpus.sh build/cli/twins
set -euo pipefail
twins=$(realpath "$1")
cd "$(dirname "$0")"
rm -rf corpus && mkdir -p corpus/{config,safetensors,checkpoint,idx,cifar,csv,image,shards}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# config: recipes and an eval config; one with an override before a NUL byte.
cp ../../configs/quickstart.json corpus/config/quickstart.json
cp ../../configs/eval/cifar10.json corpus/config/eval.json
{ printf 'optimizer.base_lr=0.5\0'; cat ../../configs/simsiam_cifar10.json; } > corpus/config/simsiam_override
printf '{"train": {"epochs": 3}, /* comment */ "views": [[{"type": "center_crop", "size": 4}]]}' > corpus/config/small

# safetensors and a checkpoint: a tiny backbone and a tiny run.
"$twins" export --backbone 'random:{"type": "resnet", "layers": [1, 1, 1, 1], "width": 1, "in_channels": 1, "cifar_stem": true}' \
  --out corpus/safetensors/backbone.safetensors > /dev/null
n=16
{ printf '\x00\x00\x08\x03\x00\x00\x00\x10\x00\x00\x00\x08\x00\x00\x00\x08'; head -c $((n * 64)) /dev/urandom; } > "$tmp/train-images-idx3-ubyte"
{ printf '\x00\x00\x08\x01\x00\x00\x00\x10'; for ((i = 0; i < n; i++)); do printf "\\x0$((i % 10))"; done; } > "$tmp/train-labels-idx1-ubyte"
cat > "$tmp/recipe.json" <<JSON
{"data": {"type": "mnist", "root": "$tmp"},
 "views": [[{"type": "random_resized_crop", "size": 8}], [{"type": "random_resized_crop", "size": 8}]],
 "model": {"backbone": {"type": "resnet", "layers": [1, 1, 1, 1], "width": 1, "in_channels": 1, "cifar_stem": true},
           "projector": {"type": "mlp", "spec": "4-4"}},
 "loss": {"type": "vicreg"}, "online_probe": {"enabled": false},
 "train": {"epochs": 1, "batch_size": 8, "workers": 0, "device": "cpu", "threads": 1}}
JSON
"$twins" pretrain --config "$tmp/recipe.json" --out "$tmp/run" > /dev/null 2>&1
cp "$tmp"/run/checkpoints/step-*.safetensors corpus/checkpoint/checkpoint.safetensors
cp corpus/checkpoint/checkpoint.safetensors corpus/safetensors/checkpoint.safetensors

# idx: flag byte (0 plain, 1 gzip), the image file's length (little-endian u32), images, labels.
size=$(stat -c %s "$tmp/train-images-idx3-ubyte")
for flag in 0 1; do
  { printf "\\x0$flag"; printf "\\x$(printf %02x $((size & 255)))\\x$(printf %02x $((size >> 8)))\\x00\\x00";
    cat "$tmp/train-images-idx3-ubyte" "$tmp/train-labels-idx1-ubyte"; } > "corpus/idx/idx$flag"
done

# cifar: flag 1 (padded to the full size), the first records.
{ printf '\x01'; for ((i = 0; i < 3; i++)); do printf "\\x0$i"; head -c 3072 /dev/urandom; done; } > corpus/cifar/records
printf '\x00\x03' > corpus/cifar/short

# csv
printf 'path,label\r\n"a, b/x.png",2\r\ny.png,0\r\n# comment\r\nz.png\r\n' > corpus/csv/list.csv
printf '\xEF\xBB\xBF"multi\nline.png",1\n"q""uote.png",\n' > corpus/csv/quoted.csv

# image: one small image per format twins decodes.
printf 'P6\n8 6\n255\n' > "$tmp/a.ppm"; head -c $((8 * 6 * 3)) /dev/urandom >> "$tmp/a.ppm"
cp "$tmp/a.ppm" corpus/image/a.ppm
printf 'P5\n# a comment\n5 4\n255\n' > corpus/image/b.pgm; head -c 20 /dev/urandom >> corpus/image/b.pgm
for ext in png jpg tiff webp; do  # the preview grid, written in each format (OpenCV's encoders)
  "$twins" preview --config "$tmp/recipe.json" --count 1 --out "corpus/image/preview.$ext" > /dev/null 2>&1 || true
done
cp ../reference/augment/jpeg_grey.jpg corpus/image/grey.jpg
# a 2 x 2, 24-bit BMP: file header, BITMAPINFOHEADER, two rows of 6 bytes padded to 8
printf 'BM\x46\x00\x00\x00\x00\x00\x00\x00\x36\x00\x00\x00\x28\x00\x00\x00\x02\x00\x00\x00\x02\x00\x00\x00\x01\x00\x18\x00' > corpus/image/tiny.bmp
printf '\x00\x00\x00\x00\x10\x00\x00\x00\x13\x0b\x00\x00\x13\x0b\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00' >> corpus/image/tiny.bmp
printf '\xff\x00\x00\x00\xff\x00\x00\x00\x00\x00\xff\xff\xff\xff\x00\x00' >> corpus/image/tiny.bmp
# shards: a tar of 3 samples (png + cls) from `twins shards create`, the same gzipped, its index,
# a brace pattern.
echo "{\"type\": \"mnist\", \"root\": \"$tmp\"}" > "$tmp/mnist.json"
"$twins" shards create --input "$tmp/mnist.json" --output "$tmp/shards/s-%02d.tar" --max-count 3 > /dev/null 2>&1
cp "$tmp/shards/s-00.tar" corpus/shards/three.tar
gzip -c "$tmp/shards/s-00.tar" > corpus/shards/three.tar.gz
cp "$tmp/shards/s-index.json" corpus/shards/index.json
printf 'train-{000..012}-{a,b}.tar\n' > corpus/shards/pattern
ls -la corpus/*/ | awk '{print $5, $9}' | grep -v '^ *$'

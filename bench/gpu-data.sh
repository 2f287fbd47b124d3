#!/usr/bin/env bash
# Packs the benchmark data for the GPU machine, which cannot read ../shared/data and whose device
# calls carry at most 64 MiB each (the working tree included): CIFAR-10 as one xz file per batch
# file (~23 MB each), the imagewoof JPEG folder as one tar (27 MB) and the dependency kit
# (TWINS_KIT, default ../shared/gpu/twins-gpu-kit: 23 MB, 4 MB as kit.tar.xz), in .gpu-data/
# (ignored by git), with SHA256SUMS of the unpacked data. bench/gpu.sh unpacks whatever of it a
# call carried (into .gpu-data/unpacked/ and .gpu-kit/, which stay on a warm machine between
# calls) and checks the sums.
#
#   bench/gpu-data.sh [DATA]     DATA: the folder holding cifar10/ and imagewoof-320-bench/
#                                (default ../shared/data); prints which files to carry per call
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-../shared/data}
cifar=$data/cifar10/cifar-10-batches-bin
woof=$data/imagewoof-320-bench
out=.gpu-data
mkdir -p "$out"
[ -f "$cifar/data_batch_1.bin" ] || { echo "gpu-data: no CIFAR-10 batch files in $cifar" >&2; exit 1; }
[ -d "$woof/train" ] || { echo "gpu-data: no imagewoof folder $woof/train" >&2; exit 1; }
sums=$out/SHA256SUMS.new
: > "$sums"
for f in data_batch_1 data_batch_2 data_batch_3 data_batch_4 data_batch_5 test_batch; do
  packed=$out/cifar10-$f.bin.xz
  (cd "$cifar" && sha256sum "$f.bin") | sed "s|  |  cifar10/|" >> "$sums"
  if [ ! -f "$packed" ] || [ "$cifar/$f.bin" -nt "$packed" ]; then
    xz -9 -T1 -c "$cifar/$f.bin" > "$packed.tmp" && mv "$packed.tmp" "$packed"
  fi
done
# JPEGs do not compress: a plain tar, members sorted so that the same folder gives the same bytes.
(cd "$woof" && find train -type f | LC_ALL=C sort > "$OLDPWD/$out/imagewoof.list")
tar -C "$woof" --owner=0 --group=0 --mtime=@0 -cf "$out/imagewoof.tar.tmp" -T "$out/imagewoof.list"
mv "$out/imagewoof.tar.tmp" "$out/imagewoof.tar"
(cd "$woof" && xargs -d '\n' sha256sum < "$OLDPWD/$out/imagewoof.list") | sed "s|  |  imagewoof/|" >> "$sums"
rm "$out/imagewoof.list"
mv "$sums" "$out/SHA256SUMS"
kit=${TWINS_KIT:-../shared/gpu/twins-gpu-kit}
if [ -d "$kit" ]; then
  tar -C "$kit" --owner=0 --group=0 --mtime=@0 --sort=name -cf - . |
    xz -6 -T1 > "$out/kit.tar.xz.tmp" && mv "$out/kit.tar.xz.tmp" "$out/kit.tar.xz"
else
  echo "gpu-data: no kit at $kit (TWINS_KIT): carry your own prefix (TWINS_PREFIX)" >&2
fi
ls -l "$out"
cat <<EOF
Carry per device call (64 MiB each, the working tree included, about 4 MB); a warm machine keeps
what earlier calls unpacked, and a later call that carries nothing keeps it too:
  call 1: .gpu-data/SHA256SUMS .gpu-data/kit.tar.xz .gpu-data/cifar10-data_batch_1.bin.xz .gpu-data/imagewoof.tar
          (about 58 MB: the build, the CUDA tests, the step table, the CIFAR-10 end-to-end rows with
          10,000 distinct images cycled to 50,000 an epoch, and the JPEG rows)
  The accuracy stage needs all of CIFAR-10: the five other files (23 MB each, two a call) on a
  warm machine, in a session planned for it (15 minutes of device time do not hold that and
  the table).
EOF

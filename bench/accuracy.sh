#!/usr/bin/env bash
# The accuracy table: pretrains every method with its recipe on one dataset, evaluates each backbone
# with the linear probe and kNN on the test set, and writes bench/results/accuracy-<dataset>.{md,json,svg}
# (method, backbone, epochs, batch, projector, linear top-1, kNN top-1, wall time, images/s, device,
# the exact commands; the picture: online-probe accuracy against epochs, final linear and kNN marked).
#
#   bench/accuracy.sh [--dataset fashion_mnist|cifar10] [--methods "vicreg byol"] [--runs DIR]
#                     [--results DIR] [--set key=value ...]
#
# Recipes: fashion_mnist (CPU): configs/fashion_mnist/<method>.json (the same backbone, views, epochs
# and batch for every method; VICReg's is the quickstart's earlier, smaller recipe). cifar10 (GPU):
# configs/<method>_cifar10.json, data from $CIFAR_ROOT (default ../shared/data/cifar10/cifar-10-batches-bin);
# pass e.g. --set train.epochs=100 to match a published table. Every recipe present is run, so a method
# added later joins the table with its recipe file. --set is handed to every pretraining command.
# A run folder that already holds knn.json is kept (delete it to rerun): an interrupted table resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
dataset=fashion_mnist
methods=""
runs=""
results=bench/results
sets=()
while (($#)); do
  case "$1" in
    --dataset) dataset=$2; shift 2 ;;
    --methods) methods=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --results) results=$2; shift 2 ;;
    --set) sets+=(--set "$2"); shift 2 ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench/accuracy.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
runs=${runs:-runs/accuracy-$dataset}
twins=${TWINS_BIN:-build/cli/twins}  # TWINS_BIN: another build of twins
[ -x "$twins" ] || scripts/setup.sh

recipe_for() {  # method -> recipe file, or nothing
  case "$dataset" in
    fashion_mnist) echo "configs/fashion_mnist/$1.json" ;;
    cifar10) echo "configs/$1_cifar10.json" ;;
  esac
}
case "$dataset" in
  fashion_mnist)
    eval_cfg=configs/eval/fashion_mnist.json
    data_sets=()
    [ -n "$methods" ] || methods="vicreg $(ls configs/fashion_mnist/*.json | xargs -n1 basename | sed 's/\.json$//' | grep -vx vicreg | tr '\n' ' ')" ;;
  cifar10)
    eval_cfg=configs/eval/cifar10.json
    root=${CIFAR_ROOT:-../shared/data/cifar10/cifar-10-batches-bin}
    data_sets=(--set "data.root=$root")
    [ -n "$methods" ] || methods=$(ls configs/*_cifar10.json | xargs -n1 basename | sed 's/_cifar10\.json$//' | tr '\n' ' ') ;;
  *) echo "bench/accuracy.sh: unknown dataset '$dataset' (fashion_mnist or cifar10)" >&2; exit 2 ;;
esac
eval_sets=()
[ "$dataset" = cifar10 ] && eval_sets=(--set "train_data.root=$root" --set "test_data.root=$root")

mkdir -p "$runs" "$results"
quote() { local out="" a; for a in "$@"; do out+=" $(printf '%q' "$a")"; done; echo "${out# }"; }
for method in $methods; do
  recipe=$(recipe_for "$method")
  [ -f "$recipe" ] || { echo "bench/accuracy.sh: no $dataset recipe for '$method' ($recipe)" >&2; exit 2; }
  run=$runs/$method
  if [ -f "$run/knn.json" ]; then echo "== $method: kept ($run/knn.json exists)"; continue; fi
  rm -rf "$run"
  pre=("$twins" pretrain --config "$recipe" --out "$run" "${data_sets[@]}" "${sets[@]}")
  lin=("$twins" linear-probe --backbone "$run" --config "$eval_cfg" "${eval_sets[@]}")
  knn=("$twins" knn --backbone "$run" --config "$eval_cfg" "${eval_sets[@]}" --set 'knn.k=[20,200]')
  echo "== $method: $(quote "${pre[@]}")"
  "${pre[@]}"
  "${lin[@]}"
  "${knn[@]}"
  { quote "${pre[@]}"; quote "${lin[@]}"; quote "${knn[@]}"; } > "$run/command.txt"
done
python3 bench/accuracy_table.py "$runs" "$results/accuracy-$dataset"
echo "written: $results/accuracy-$dataset.md, .json, .svg"

#!/usr/bin/env bash
# Build the real CIFAR-10 that the tests read, from ../shared/cifar10, in two layouts users have:
#   DIR/cifar-10-batches-py/   the official python batches
#   DIR/npy/                   {train,test}_{images,labels}.npy
#   DIR/cifar10-jpeg/          the zip unzipped: train/<class>/NNNN.jpg, test/<class>/NNNN.jpg (an image tree)
# The tests check all three load to the same images and labels. Usage: tools/build_test_data.sh [DIR]   (default data/test)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$repo/data/test}"
build="$repo/../shared/cifar10/build.py"
[ -f "$build" ] || { echo "build_test_data: $build not found: put shared/ beside the repository" >&2; exit 2; }
jpeg_tree() {
    # Unzipped under a temporary name, then renamed, so that a stopped build leaves no tree that looks complete.
    if [ ! -d "$out/cifar10-jpeg" ]; then
        rm -rf "$out/cifar10-jpeg.part"
        python -m zipfile -e "$(dirname "$build")/cifar10-jpeg.zip" "$out/cifar10-jpeg.part"
        mv "$out/cifar10-jpeg.part" "$out/cifar10-jpeg"
    fi
}
# The three layouts at once, each from the shared files alone; a wait on each passes its failure on.
mkdir -p "$out"
python "$build" --batches "$out" & batches=$!
python "$build" --npy "$out/npy" & npy=$!
jpeg_tree & tree=$!
wait "$batches"; wait "$npy"; wait "$tree"

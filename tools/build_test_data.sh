#!/usr/bin/env bash
# Build the real CIFAR-10 that the tests read, from ../shared/cifar10, in two layouts users have:
#   DIR/cifar-10-batches-py/   the official python batches
#   DIR/npy/                   {train,test}_{images,labels}.npy
# The tests check both load to the same arrays. Usage: tools/build_test_data.sh [DIR]   (default data/test)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$repo/data/test}"
build="$repo/../shared/cifar10/build.py"
[ -f "$build" ] || { echo "build_test_data: $build not found: put shared/ beside the repository" >&2; exit 2; }
python "$build" --batches "$out"
python "$build" --npy "$out/npy"

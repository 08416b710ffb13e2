#!/usr/bin/env bash
# Run here, on the machine without a GPU, before a lent GPU's one call: fills .gpudata/ (ignored by git,
# carried to the device) with what that machine lacks: the `higher` wheel (it reaches no network), the
# CIFAR-10 JPEG archive and its builder. Then: run(command="bash bench/gpu/session.sh", carry=[".gpudata"],
# timeout_s=420). About 20 MB; the device takes at most 64 MB with the tree.
set -euo pipefail
cd "$(dirname "$0")/../.."
shared="${SHARED_DATASETS:-../shared/datasets}"
[ -f "$shared/cifar10-jpeg.tar.gz" ] || { echo "prepare: no $shared/cifar10-jpeg.tar.gz: set SHARED_DATASETS" >&2; exit 1; }
mkdir -p .git/info .gpudata
grep -qx '/.gpudata/' .git/info/exclude 2>/dev/null || echo '/.gpudata/' >> .git/info/exclude
cp "$shared/cifar10-jpeg.tar.gz" "$shared/make_cifar10.py" .gpudata/
higher=$(grep -E '^higher==' requirements.txt)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .gpudata "$higher"
du -sh .gpudata && ls .gpudata

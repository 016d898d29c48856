#!/usr/bin/env bash
# The end-to-end demo on a fresh machine: fetch the Lite0 weights and scikit-image's texture photos
# (scripts/setup.sh), build csflow, and for each of brick, grass and gravel: cut the photo into 96 px tiles,
# make an MVTec AD-style data set (train: good tiles; test: held-out good tiles and tiles with synthetic
# scratches, spots, stains, cut-and-paste patches and foreign texture, with masks), train a CPU-sized flow,
# test it (metrics.json + report.html) and print the metrics. About 5 minutes after the build on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-demo-out}
scripts/setup.sh > /dev/null
cargo build --release -q -p csflow-cli
BIN=target/release/csflow
export CSFLOW_BACKBONE_WEIGHTS=assets/efficientnet-lite0-57934424.pth
rm -rf "$OUT"
mkdir -p "$OUT"
start=$(date +%s)
textures=(brick grass gravel)
for t in "${textures[@]}"; do
  foreign=()
  for o in "${textures[@]}"; do [ "$o" != "$t" ] && foreign+=(--foreign "assets/$o.png"); done
  echo "== $t"
  "$BIN" synth --good "assets/$t.png" --crop 96 --count 4 "${foreign[@]}" --seed 0 -o "$OUT/data/$t" 2> "$OUT/$t.synth.log" \
    || { cat "$OUT/$t.synth.log"; exit 1; }
  "$BIN" fit --data "$OUT/data/$t" --hidden 64 --epochs 50 --batch-size 4 --lr 1e-3 --checkpoint-every 0 \
    --cache "$OUT/$t.features.safetensors" -o "$OUT/$t.safetensors" 2>&1 | grep -E "^(epoch +(10|30|50) |threshold|validation)"
  "$BIN" test --model "$OUT/$t.safetensors" --data "$OUT/data/$t" --out "$OUT/report-$t" | tee "$OUT/$t.metrics.txt"
done
echo
echo "== summary (all defect types; $(( $(date +%s) - start )) s after the build)"
head -1 "$OUT/brick.metrics.txt" | sed 's/^defect type         /texture             /'
for t in "${textures[@]}"; do grep '^all ' "$OUT/$t.metrics.txt" | sed "s/^all   /$(printf '%-6s' "$t")/"; done
echo
for t in "${textures[@]}"; do echo "report: $OUT/report-$t/report.html"; done

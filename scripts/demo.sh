#!/usr/bin/env bash
# The end-to-end run on a fresh machine: build csflow, make a small synthetic features data set, train a
# CPU-sized flow on its good samples, score the test samples and print the image AUROC.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-demo-out}
cargo build --release -q -p csflow-cli
BIN=target/release/csflow
start=$(date +%s)
"$BIN" demo-features --out "$OUT" --train 64 --test 40 --channels 32 --map 16
"$BIN" fit --features "$OUT/train.safetensors" --hidden 64 --epochs 12 --batch-size 16 --lr 1e-3 -o "$OUT/model.safetensors"
"$BIN" predict --model "$OUT/model.safetensors" --features "$OUT/test.safetensors" > "$OUT/predictions.jsonl"
echo "predictions: $OUT/predictions.jsonl ($(wc -l < "$OUT/predictions.jsonl") samples), $(( $(date +%s) - start )) s"

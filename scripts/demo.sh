#!/usr/bin/env bash
# The main job on embedded defaults: render synthetic smears from every acquisition source,
# export labelled crops, build a signed model bundle from random tiny weights, pack it, verify
# it and run its self-test. Output goes to target/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p reddino-models
BIN=target/release/reddino-models
OUT=target/demo
rm -rf "$OUT" && mkdir -p "$OUT"

$BIN synth sources
for src in wright_100x giemsa_60x mgg_100x field_40x; do
    $BIN synth field --source "$src" --seed 1 --out "$OUT/$src.png" --truth "$OUT/$src.json"
done
$BIN synth crops --out "$OUT/crops" --per-class 5 --size 64
$BIN keygen --secret "$OUT/demo.sec" --public "$OUT/demo.pub"
$BIN bundle build --random tiny --input-size 112 --name demo-random --version 0.0.1 \
    --description "random tiny ViT; not a trained model" --key "$OUT/demo.sec" --out "$OUT/bundle" --tar
$BIN bundle verify "$OUT/bundle.tar" --trusted-key "$OUT/demo.pub" --self-test
echo "demo output in $OUT"

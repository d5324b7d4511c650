#!/usr/bin/env bash
# The GPU backend on a device (docs/jetson.md): builds reddino-edge, then runs the ONNX Runtime
# backend with the TensorRT provider against tract on a bundle, three times:
#   cold          no engine, no timing cache (a device's first install)
#   timing-cache  engines removed, TensorRT's timing cache kept (a new model on a used device)
#   cached        engines in the cache (every later start)
# and once in fp32. Each run reports the open time (engine build or load), the cosine
# similarity of the embeddings to tract's, and cells/s at batch 1, 8 and 64. Results go to
# OUT (default jetson-check-DATE/): one JSON per run, machine.txt and summary.md, which is
# what docs/jetson.md asks to be pasted back.
#
#   scripts/jetson-check.sh [BUNDLE KEY.pub]       # default: the shipped demo model
#   ORT_DYLIB_PATH=/path/libonnxruntime.so OUT=dir scripts/jetson-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."

BUNDLE=${1:-}
KEY=${2:-}
OUT=${OUT:-jetson-check-$(date +%Y%m%d-%H%M)}
PROVIDERS=${PROVIDERS:-tensorrt,cuda,cpu}
SECONDS_PER_BATCH=${SECONDS_PER_BATCH:-5}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

if [ -z "${ORT_DYLIB_PATH:-}" ]; then
    ORT_DYLIB_PATH=$(find /usr /opt "$HOME" -name 'libonnxruntime.so*' -type f 2>/dev/null | sort | head -1 || true)
fi
if [ -z "$ORT_DYLIB_PATH" ] || [ ! -e "$ORT_DYLIB_PATH" ]; then
    echo "no libonnxruntime.so found: install an ONNX Runtime build with TensorRT for your JetPack" >&2
    echo "(docs/jetson.md) and set ORT_DYLIB_PATH to its libonnxruntime.so" >&2
    exit 2
fi
export ORT_DYLIB_PATH

{
    echo "date: $(date -u +%FT%TZ)"
    echo "kernel: $(uname -srm)"
    [ -r /etc/nv_tegra_release ] && echo "L4T: $(head -1 /etc/nv_tegra_release)"
    dpkg-query -W -f='${Package} ${Version}\n' nvidia-jetpack tensorrt libnvinfer10 cuda-runtime-12-6 2>/dev/null || true
    [ -r /proc/device-tree/model ] && echo "model: $(tr -d '\0' < /proc/device-tree/model)"
    echo "onnxruntime: $ORT_DYLIB_PATH"
    command -v nvpmodel >/dev/null && nvpmodel -q 2>/dev/null | head -2
    echo "cores: $(nproc)"
} | tee "$OUT/machine.txt"

echo "==> building (release)"
T0=$(date +%s)
cargo build --release --locked -p reddino-edge --example backend_check
echo "build: $(( $(date +%s) - T0 )) s" | tee -a "$OUT/machine.txt"
CHECK=target/release/examples/backend_check
MODEL_ARGS=()
if [ -n "$BUNDLE" ]; then
    MODEL_ARGS=(--model "$BUNDLE" --trusted-key "$KEY")
fi

ENGINES="$OUT/engines"
rm -rf "$ENGINES"
run() { # NAME PRECISION
    echo "==> $1 ($2)"
    "$CHECK" "${MODEL_ARGS[@]}" --providers "$PROVIDERS" --engines "$ENGINES" \
        --precision "$2" --batches 1,8,64 --seconds "$SECONDS_PER_BATCH" \
        > "$OUT/$1.json" 2> "$OUT/$1.log"
    cat "$OUT/$1.json"
}
run cold fp16
[ ! -d "$ENGINES" ] || find "$ENGINES" -mindepth 1 -maxdepth 1 -type d ! -name 'timing-*' -exec rm -rf {} +
run timing-cache fp16
run cached fp16
run fp32 fp32

python3 - "$OUT" <<'EOF' | tee "$OUT/summary.md"
import json, sys, os
out = sys.argv[1]
print("| run | backend | open s | cosine min | max abs diff | cells/s b1 | b8 | b64 |")
print("|---|---|---:|---:|---:|---:|---:|---:|")
for name in ("cold", "timing-cache", "cached", "fp32"):
    r = json.load(open(os.path.join(out, name + ".json")))
    s = r["cells_per_s"]
    print(f"| {name} | {r['backend']} | {r['open_s']:.1f} | {r['cosine_min']:.5f} | "
          f"{r['embedding_max_abs_diff']:.2e} | {s.get('1', 0):.0f} | {s.get('8', 0):.0f} | {s.get('64', 0):.0f} |")
EOF
echo "results in $OUT (paste summary.md and machine.txt into docs/jetson.md)"

#!/usr/bin/env bash
# The test command. On a fresh machine it installs what the tests need (a Python venv with the
# pinned torch/timm used as numerical references), writes the reference outputs, and runs every
# test of the workspace. Re-running reuses the venv.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/system-deps.sh --tests
export REDDINO_REQUIRE_MOSQUITTO=1 REDDINO_REQUIRE_SYSTEMD=1 REDDINO_REQUIRE_DISTRIBUTED=1

. scripts/torch-env.sh

echo "==> writing timm, DINOv2 and scikit-learn reference outputs"
REF="$PWD/target/reference"
"$REDDINO_PYTHON" tests/reference/timm_vit.py "$REF"
"$REDDINO_PYTHON" tests/reference/dinov2_losses.py "$REF"
"$REDDINO_PYTHON" tests/reference/sklearn_probes.py "$REF"
export REDDINO_REFERENCE_DIR="$REF"
export REDDINO_REQUIRE_REFERENCE=1
# The ONNX Runtime backend's tests load the PyPI wheel's libonnxruntime (CPU provider).
REDDINO_ONNXRUNTIME_LIB="$("$REDDINO_PYTHON" -c 'import glob, os, onnxruntime
print(sorted(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), "capi", "libonnxruntime.so*")))[0])')"
export REDDINO_ONNXRUNTIME_LIB REDDINO_REQUIRE_ONNXRUNTIME=1

echo "==> cargo test (all targets; benchmarks run once on tiny inputs)"
export REDDINO_BENCH_SMOKE=1
cargo test --workspace --locked --all-targets "$@"

echo "==> benchmark suite once on tiny inputs (the figures: ./scripts/bench.sh)"
./scripts/bench.sh --smoke
echo "all tests passed"

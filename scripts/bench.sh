#!/usr/bin/env bash
# The benchmark suite (docs/benchmarks.md): RedDino Edge side by side with onnxruntime, PyTorch
# + timm and OpenCV, release builds, equal thread pinning; writes docs/benchmarks/results.{json,md},
# the plots, and the generated part of docs/benchmarks.md.
#   ./scripts/bench.sh                 # everything (about 15 min on 2 cores after the release builds)
#   ./scripts/bench.sh --only cells    # some of infer,cells,pipeline,trainer
#   ./scripts/bench.sh --smoke         # once on tiny inputs, into target/bench-smoke (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/system-deps.sh
. scripts/torch-env.sh
if ! "$REDDINO_PYTHON" -c 'import onnxruntime, cv2, matplotlib' 2>/dev/null \
    || [ bench/requirements.txt -nt "$VENV/.reddino-bench-requirements" ]; then
    echo "==> installing the benchmark contenders (bench/requirements.txt)"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-cache-dir \
        -r bench/requirements.txt
    touch "$VENV/.reddino-bench-requirements"
fi
exec "$REDDINO_PYTHON" bench/run.py "$@"

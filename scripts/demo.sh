#!/usr/bin/env bash
# The main job: `reddino-edge demo` on its embedded defaults (in-process MQTT broker, synthetic
# microscope, a signed demo bundle, live view, summary). Extra arguments go to the demo
# (see `reddino-edge demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/system-deps.sh
exec cargo run --release --locked -p reddino-edge -- demo "$@"

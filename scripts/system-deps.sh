#!/usr/bin/env bash
# Installs the Debian packages the build and tests need, when missing:
#   libclang-dev  the v4l crate generates its V4L2 bindings with bindgen at build time
#   mosquitto     a real MQTT broker for the service tests (`--tests` only)
#   systemd       systemd-analyze, which checks the units in systemd/ (`--tests` only)
#   libgloo-dev   Gloo's headers, for the trainer's torch.distributed shim (trainer/build.rs;
#                 without them the trainer builds without multi-process training; `--tests`)
set -euo pipefail
need=()
have() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "ok installed"; }
have libclang-dev || need+=(libclang-dev)
if [ "${1:-}" = "--tests" ]; then
    have mosquitto || need+=(mosquitto)
    command -v systemd-analyze >/dev/null || need+=(systemd)
    have libgloo-dev || need+=(libgloo-dev)
fi
if [ ${#need[@]} -gt 0 ]; then
    echo "==> installing ${need[*]} (apt)"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

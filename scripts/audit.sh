#!/usr/bin/env bash
# Dependency advisories (RustSec) for Cargo.lock. The advisory database is fetched from
# github.com, which CI cannot reach: run this where it can (docs/reliability.md).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! cargo audit --version >/dev/null 2>&1; then
    echo "==> installing cargo-audit (crates.io)"
    cargo install --locked cargo-audit
fi
# Known and not reachable: rustls-webpki 0.102.8 comes in through rumqttc 0.25.1, which uses it
# only for a variant of its TLS error type; certificate verification runs in rustls's
# rustls-webpki 0.103 (docs/reliability.md, "Dependency advisories").
exec cargo audit \
    --ignore RUSTSEC-2026-0049 --ignore RUSTSEC-2026-0098 \
    --ignore RUSTSEC-2026-0099 --ignore RUSTSEC-2026-0104

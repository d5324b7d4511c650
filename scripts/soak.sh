#!/usr/bin/env bash
# The soak run (docs/reliability.md): the service for MINUTES (default 60) on a live synthetic
# camera at 8 fps against a mosquitto that goes down for 3-5 s every 20-40 s; samples memory,
# open files, outbox and WAL sizes every 10 s and checks at the end that every result produced
# was delivered. Writes OUT (default target/soak): samples.csv, summary.json, service.log,
# soak.png; with --docs also docs/reliability/soak.png and soak.json.
#
#   scripts/soak.sh [MINUTES] [--docs]
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES=${1:-60}
DOCS=${2:-}
OUT=${OUT:-target/soak}
./scripts/system-deps.sh --tests
. scripts/torch-env.sh >/dev/null
cargo build --release --locked -p reddino-edge --bin reddino-edge --example soak
mkdir -p "$OUT"
rc=0
target/release/examples/soak --minutes "$MINUTES" --out "$OUT" || rc=$?
"$REDDINO_PYTHON" - "$OUT" <<'PY'
import csv, json, os, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
out = sys.argv[1]
rows = list(csv.DictReader(open(os.path.join(out, "samples.csv"))))
t = [float(r["t_s"]) / 60 for r in rows]
s = json.load(open(os.path.join(out, "summary.json")))
fig, ax = plt.subplots(2, 2, figsize=(10, 6), sharex=True)
ax[0][0].plot(t, [int(r["rss_kib"]) / 1024 for r in rows]); ax[0][0].set_ylabel("RSS (MiB)")
ax[0][1].plot(t, [int(r["fds"]) for r in rows]); ax[0][1].set_ylabel("open file descriptors")
ax[1][0].plot(t, [int(r["outbox_bytes"]) / 1024 for r in rows], label="outbox.db")
ax[1][0].plot(t, [int(r["wal_bytes"]) / 1024 for r in rows], label="WAL")
ax[1][0].set_ylabel("KiB"); ax[1][0].legend()
# Pending comes from the retained status, which while the broker is down is the last will
# (no counters): only the samples with the broker up are drawn.
up = [(ti, int(r["pending"])) for ti, r in zip(t, rows) if r["broker_up"] == "1" and r["pending"] != ""]
top = max([p for _, p in up] + [1])
ax[1][1].plot([u[0] for u in up], [u[1] for u in up], ".", ms=3, label="pending in the outbox (broker up)")
ax[1][1].fill_between(t, 0, [0 if r["broker_up"] == "1" else top for r in rows],
                      color="red", alpha=0.15, step="post", label="broker down")
ax[1][1].set_ylabel("results"); ax[1][1].legend()
for a in ax[1]:
    a.set_xlabel("minutes")
fig.suptitle(f"soak: {s['minutes']:.0f} min, {s['broker_outages']} broker outages, "
             f"{s['produced']} results produced, {s['delivered']} delivered, {s['missing']} missing")
fig.tight_layout()
fig.savefig(os.path.join(out, "soak.png"), dpi=80)
PY
if [ "$DOCS" = "--docs" ]; then
    mkdir -p docs/reliability
    cp "$OUT/soak.png" docs/reliability/soak.png
    cp "$OUT/summary.json" docs/reliability/soak.json
fi
cat "$OUT/summary.json"
exit $rc

#!/usr/bin/env bash
# Fuzzes every parser of outside data with libFuzzer (fuzz/src/lib.rs lists the targets):
# each target runs for SECONDS (default 60) from its checked-in corpus (fuzz/corpus/TARGET);
# new inputs that reach new code go to target/fuzz-corpus/TARGET, crashes to
# fuzz/artifacts/TARGET (copy each into fuzz/regressions/TARGET: the test command replays
# them). Needs the nightly toolchain and cargo-fuzz (installed from crates.io if missing).
#
#   scripts/fuzz.sh                 # every target, 60 s each
#   scripts/fuzz.sh 10 config mjpg  # some targets, 10 s each
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH=${1:-60}
shift || true
TARGETS=("$@")
if [ ${#TARGETS[@]} -eq 0 ]; then
    mapfile -t TARGETS < <(ls fuzz/fuzz_targets | sed 's/\.rs$//')
fi
if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "the nightly toolchain is needed (rustup toolchain install nightly)" >&2
    exit 2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "==> installing cargo-fuzz (crates.io)"
    cargo install --locked cargo-fuzz
fi
./scripts/system-deps.sh
mkdir -p target/fuzz-logs
summary=()
for t in "${TARGETS[@]}"; do
    mkdir -p "target/fuzz-corpus/$t"
    echo "==> $t (${SECONDS_EACH} s)"
    # -rss_limit_mb: a target may not need more than 2 GiB for any input; -timeout: nor hang.
    if cargo +nightly fuzz run --features libfuzzer "$t" "target/fuzz-corpus/$t" "fuzz/corpus/$t" \
        -- -max_total_time="$SECONDS_EACH" -rss_limit_mb=2048 -timeout=10 -max_len=65536 -print_final_stats=1 \
        > "target/fuzz-logs/$t.log" 2>&1; then
        runs=$(grep -o 'stat::number_of_executed_units: [0-9]*' "target/fuzz-logs/$t.log" | awk '{print $2}' | tail -1)
        summary+=("$t: ok, ${runs:-?} runs in ${SECONDS_EACH} s")
    else
        summary+=("$t: FAILED (target/fuzz-logs/$t.log; the input is in fuzz/artifacts/$t)")
    fi
    tail -3 "target/fuzz-logs/$t.log"
done
printf '%s\n' "${summary[@]}"
! printf '%s\n' "${summary[@]}" | grep -q FAILED

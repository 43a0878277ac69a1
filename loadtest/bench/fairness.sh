#!/usr/bin/env bash
# Fairness and latency under a backlog: the service with `--backend null` (no code runs, so the
# control plane is what is measured) and TENANTS tenants of weights 1 to 4, offered TASKS tasks
# at once by agenttask-loadtest, first spread evenly, then Zipf-skewed. Prints each run's report
# and writes its charts and JSON next to each other. Meanwhile one more tenant, never near its
# quota, submits one task at a time: its admission wait is what a tenant under quota sees while
# the others keep the service saturated.
#
#   loadtest/bench/fairness.sh [tasks] [tenants] [out-dir]
#   AGENTTASK_BIN=/path/to/agenttask loadtest/bench/fairness.sh ...   # a given build (A/B runs)
#
# By default the global slots bind (`--max-running 64`) and the flood tenants' own quotas never
# do. To make each flood tenant's quota bind instead, so that only the probe is under quota:
#   FLOOD_MAX_CONCURRENCY=8 MAX_RUNNING=1000 SPREADS=even loadtest/bench/fairness.sh ...
#
# Uses a scratch database (agenttask_bench_fair, dropped at the end) and tenants of its own.
set -euo pipefail
cd "$(dirname "$0")/../.."
source loadtest/bench/common.sh
TASKS="${1:-20000}"
TENANTS="${2:-100}"
OUT="${3:-target/bench-fairness}"
MAX_RUNNING="${MAX_RUNNING:-64}"
FLOOD_MAX_CONCURRENCY="${FLOOD_MAX_CONCURRENCY:-}"
SPREADS="${SPREADS:-even zipf}"
bench_scratch agenttask_bench_fair

BIN="${AGENTTASK_BIN:-}"
if [ -z "$BIN" ]; then
    cargo build --release --locked -p agenttask --bin agenttask >&2
    BIN=target/release/agenttask
fi
cargo build --release --locked -p agenttask-loadtest >&2
mkdir -p "$OUT"
work="$(mktemp -d)"
bench_tenants fair "$TENANTS" > "$work/flood.toml"
if [ -n "$FLOOD_MAX_CONCURRENCY" ]; then
    sed -i "s/^max_concurrency = .*/max_concurrency = $FLOOD_MAX_CONCURRENCY/" "$work/flood.toml"
fi
{ cat "$work/flood.toml"; printf '[tenants.fair-probe]\nmax_concurrency = 1000\n'; } > "$work/tenants.toml"
svc=
trap 'bench_stop_service; bench_cleanup' EXIT
for spread in $SPREADS; do
    bench_drop_db
    AGENTTASK_DATABASE_URL="$URL" AGENTTASK_TENANTS="$work/tenants.toml" AGENTTASK_HTTP_ADDR="127.0.0.1:$PORT" \
        AGENTTASK_MAX_RUNNING="$MAX_RUNNING" AGENTTASK_LOG="${AGENTTASK_LOG:-warn}" \
        "$BIN" serve --backend null 2>"$OUT/service-$spread.log" &
    svc=$!
    bench_await_ready
    sleep 1 # the tenants' consumers start right after readiness
    echo "== $TASKS tasks over $TENANTS tenants, spread $spread, all published at once"
    target/release/agenttask-loadtest --tenant fair-probe --count 1000000 --concurrency 1 --deadline 3600 \
        -o json > "$OUT/probe-$spread.json" 2>/dev/null &
    probe=$!
    target/release/agenttask-loadtest --tenants-file "$work/flood.toml" --count "$TASKS" --concurrency "$TASKS" \
        --spread "$spread" --mix print=1 --svg "$OUT/shares-$spread.svg" -o json > "$OUT/report-$spread.json"
    # The probe's report is written when it is interrupted: what it measured during the flood.
    kill -INT "$probe"; wait "$probe" || true
    python3 - "$OUT/report-$spread.json" "$OUT/probe-$spread.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
f, l, a = r["fairness"], r["latency_ms"], r["admission_wait_ms"]
print(f'{r["tasks"]} tasks in {r["seconds"]:.2f} s: {r["tasks_per_second"]:.0f} tasks/s')
print(f'publish->result p50 {l["p50"]:.0f} ms, p99 {l["p99"]:.0f} ms; admission wait p50 {a["p50"]:.0f} ms, p99 {a["p99"]:.0f} ms')
if f["windows_measured"]:
    print(f'Jain per 1 s window: {f["windows_measured"]} windows, min {f["min"]:.3f}, mean {f["mean"]:.3f}, '
          f'{100 * f["at_least_0_98"]:.0f}% >= 0.98; whole run {f["whole_run"]:.3f}')
try:
    p = json.load(open(sys.argv[2]))
    w = p["admission_wait_ms"]
    print(f'tenant under quota, one task at a time: {p["tasks"]} tasks, admission wait p50 {w["p50"]:.0f} ms, '
          f'p99 {w["p99"]:.0f} ms, max {w["max"]:.0f} ms')
except (OSError, ValueError, KeyError, TypeError) as e:
    print(f'tenant under quota: no report ({e})')
PY
    bench_stop_service
done
echo "charts and reports in $OUT"

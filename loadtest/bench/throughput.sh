#!/usr/bin/env bash
# The issue's throughput measurement: TASKS tasks over TENANTS tenants (weights 1 to 4) through the
# service with `--backend null`, all published at once, beside the machine's own limits measured
# in the same run, in turns so the machine's noise falls on all of them alike:
#   - RabbitMQ alone doing the service's message work (`agenttask-loadtest --relay`): each task
#     through one of TENANTS quorum queues and a result-sized reply, with confirms, no processing;
#   - RabbitMQ alone, publish with confirms then consume, one classic queue (`--raw`);
#   - Postgres alone inserting the same task rows into the real schema, one per commit and 100
#     per statement (pgbench).
#
#   loadtest/bench/throughput.sh [tasks] [tenants] [rounds]
#
# AGENTTASK_BIN picks another build of the service. Uses scratch databases (agenttask_bench_tp
# and agenttask_bench_tp_pg, dropped at the end).
set -euo pipefail
cd "$(dirname "$0")/../.."
source loadtest/bench/common.sh
TASKS="${1:-100000}"
TENANTS="${2:-100}"
ROUNDS="${3:-1}"
BIN="${AGENTTASK_BIN:-target/release/agenttask}"
bench_scratch agenttask_bench_tp
if [ -z "${AGENTTASK_BIN:-}" ]; then
    cargo build --release --locked -p agenttask --bin agenttask >&2
fi
cargo build --release --locked -p agenttask-loadtest >&2
work="$(mktemp -d)"
bench_tenants tp "$TENANTS" > "$work/tenants.toml"
svc=
PGRAW=agenttask_bench_tp_pg
trap 'bench_stop_service; bench_cleanup; "${PSQL[@]}" -c "drop database if exists $PGRAW with (force)" postgres' EXIT

service() {
    bench_drop_db 2>/dev/null
    AGENTTASK_DATABASE_URL="$URL" AGENTTASK_TENANTS="$work/tenants.toml" AGENTTASK_HTTP_ADDR="127.0.0.1:$PORT" \
        AGENTTASK_MAX_RUNNING=256 AGENTTASK_LOG=warn "$BIN" serve --backend null 2>"$work/service.log" &
    svc=$!
    bench_await_ready
    sleep 2 # the tenants' consumers start right after readiness
    target/release/agenttask-loadtest --tenants-file "$work/tenants.toml" --count "$TASKS" --concurrency "$TASKS" \
        -o json > "$work/report.json"
    bench_stop_service
    python3 - "$work/report.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
l, a, f = r["latency_ms"], r["admission_wait_ms"], r["fairness"]
print(f'the service, --backend null: {r["tasks_per_second"]:.0f} tasks/s; publish->result p50 {l["p50"]:.0f} ms, '
      f'p99 {l["p99"]:.0f} ms; admission wait p50 {a["p50"]:.0f} ms; Jain whole run {f["whole_run"] or float("nan"):.3f}')
PY
}

postgres() {
    local one1 one8 batch
    read -r one1 one8 batch < <(bench_postgres_alone "$PGRAW" "$BIN" tp-000 "$((TASKS / 10))")
    echo "Postgres alone, the same task rows: one per commit $one1 rows/s (1 connection), $one8 rows/s (8 connections); 100 per statement $batch rows/s"
}

echo "$TASKS tasks over $TENANTS tenants; the service is $BIN"
for _ in $(seq 1 "$ROUNDS"); do
    target/release/agenttask-loadtest --relay --count "$TASKS" --queues "$TENANTS" --concurrency "$TASKS"
    service
    target/release/agenttask-loadtest --raw --count "$TASKS"
    postgres
done

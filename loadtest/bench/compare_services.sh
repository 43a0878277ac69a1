#!/usr/bin/env bash
# Two builds of the service side by side: each serves the same load with `--backend null`, in
# turns (A, B, A, B), so the machine's noise falls on both alike. For a before/after of a change:
#
#   git worktree add /tmp/agenttask-before <rev> && (cd /tmp/agenttask-before && cargo build --release --locked --bin agenttask)
#   cargo build --release --locked --bin agenttask
#   loadtest/bench/compare_services.sh /tmp/agenttask-before/target/release/agenttask target/release/agenttask [tasks] [tenants] [rounds]
#
# Each turn gets a fresh scratch database (agenttask_bench_cmp, dropped at the end) and the same
# TENANTS tenants of weights 1 to 4; the load is agenttask-loadtest with every task published at once.
set -euo pipefail
cd "$(dirname "$0")/../.."
source loadtest/bench/common.sh
A="$1"
B="$2"
TASKS="${3:-5000}"
TENANTS="${4:-100}"
ROUNDS="${5:-2}"
bench_scratch agenttask_bench_cmp
[ -x "$A" ] && [ -x "$B" ] || { echo "usage: $0 SERVICE_BINARY_A SERVICE_BINARY_B [tasks] [tenants] [rounds]" >&2; exit 2; }

cargo build --release --locked -p agenttask-loadtest >&2
work="$(mktemp -d)"
bench_tenants cmp "$TENANTS" > "$work/tenants.toml"
svc=
trap 'bench_stop_service; bench_cleanup' EXIT
turn() {
    local label="$1" bin="$2"
    bench_drop_db 2>/dev/null
    AGENTTASK_DATABASE_URL="$URL" AGENTTASK_TENANTS="$work/tenants.toml" AGENTTASK_HTTP_ADDR="127.0.0.1:$PORT" \
        AGENTTASK_MAX_RUNNING=256 AGENTTASK_CAPACITY_CPU="${AGENTTASK_CAPACITY_CPU:-256}" AGENTTASK_LOG=warn \
        "$bin" serve --backend null 2>"$work/service.log" &
    svc=$!
    bench_await_ready
    sleep 2 # the tenants' consumers start right after readiness
    target/release/agenttask-loadtest --tenants-file "$work/tenants.toml" --count "$TASKS" --concurrency "$TASKS" \
        -o json > "$work/report.json"
    bench_stop_service
    # Every transaction the service ran in its database (start-up included: a few dozen), read
    # once its connections are closed, as a backend reports its counts when it exits.
    sleep 1
    local xacts
    xacts="$("${PSQL[@]}" -tA -c "select xact_commit + xact_rollback from pg_stat_database where datname = '$DB'" postgres)"
    python3 - "$label" "$work/report.json" "$xacts" "$TASKS" <<'PY'
import json, sys
r = json.load(open(sys.argv[2]))
l, a, f = r["latency_ms"], r["admission_wait_ms"], r["fairness"]
per_task = int(sys.argv[3]) / int(sys.argv[4])
print(f'{sys.argv[1]}: {r["tasks_per_second"]:7.0f} tasks/s; publish->result p50 {l["p50"]:7.0f} ms, p99 {l["p99"]:7.0f} ms; '
      f'admission wait p50 {a["p50"]:7.0f} ms; Jain whole run {f["whole_run"] or float("nan"):.3f}; '
      f'{per_task:.2f} Postgres transactions per task')
PY
}
echo "$TASKS tasks over $TENANTS tenants, all published at once, --backend null; A=$A B=$B"
for _ in $(seq 1 "$ROUNDS"); do
    turn A "$A"
    turn B "$B"
done

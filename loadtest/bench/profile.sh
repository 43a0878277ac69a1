#!/usr/bin/env bash
# Where one service build spends its Postgres work under the null-backend load that
# compare_services.sh offers (every task published at once over TENANTS tenants):
#
#   loadtest/bench/profile.sh SERVICE_BINARY [tasks] [tenants] statements
#       every statement the service runs (sqlx logs each one at debug), counted per task and
#       grouped by the component that runs it;
#   loadtest/bench/profile.sh SERVICE_BINARY [tasks] [tenants] perf
#       `perf record -a -g -F 499` over the whole machine during the load, then the CPU share of
#       each process and Postgres' hottest symbols (perf.data stays in target/bench-profile).
#
# Statement logging slows the service: take throughput from compare_services.sh, not from the
# statements mode. Uses a scratch database (agenttask_bench_profile, dropped at the end).
set -euo pipefail
cd "$(dirname "$0")/../.."
source loadtest/bench/common.sh
BIN="$1"
TASKS="${2:-3000}"
TENANTS="${3:-100}"
MODE="${4:-statements}"
bench_scratch agenttask_bench_profile
OUT=target/bench-profile
[ -x "$BIN" ] && { [ "$MODE" = statements ] || [ "$MODE" = perf ]; } ||
    { echo "usage: $0 SERVICE_BINARY [tasks] [tenants] [statements|perf]" >&2; exit 2; }

cargo build --release --locked -p agenttask-loadtest >&2
mkdir -p "$OUT"
work="$(mktemp -d)"
bench_tenants prof "$TENANTS" > "$work/tenants.toml"
svc=
perf=
trap 'bench_stop_service; bench_cleanup' EXIT
log=warn
[ "$MODE" = statements ] && log="warn,sqlx::query=debug"
bench_drop_db 2>/dev/null
AGENTTASK_DATABASE_URL="$URL" AGENTTASK_TENANTS="$work/tenants.toml" AGENTTASK_HTTP_ADDR="127.0.0.1:$PORT" \
    AGENTTASK_MAX_RUNNING=256 AGENTTASK_LOG="$log" AGENTTASK_LOG_FORMAT=json "$BIN" serve --backend null \
    2>"$work/service.log" &
svc=$!
bench_await_ready
sleep 2 # the tenants' consumers start right after readiness
# Statements from here on are the load's (start-up is left out).
start_line="$(wc -l < "$work/service.log")"
if [ "$MODE" = perf ]; then
    perf record -a -g -F 499 -o "$OUT/perf.data" 2>"$work/perf.err" &
    perf=$!
fi
target/release/agenttask-loadtest --tenants-file "$work/tenants.toml" --count "$TASKS" --concurrency "$TASKS" \
    -o json > "$work/report.json"
[ -n "$perf" ] && kill -INT "$perf" && wait "$perf" || true
bench_stop_service
python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(f'{r[\"tasks_per_second\"]:.0f} tasks/s ($MODE mode)')" \
    "$work/report.json"
if [ "$MODE" = perf ]; then
    perf report -i "$OUT/perf.data" --no-children --sort comm -g none --stdio 2>/dev/null | grep '%' | head -8
    echo "postgres, hottest symbols:"
    perf report -i "$OUT/perf.data" --no-children --comm postgres --sort sym -g none --stdio 2>/dev/null |
        grep '%' | head -12
    exit 0
fi
python3 - "$work/service.log" "$start_line" "$TASKS" <<'PY'
import collections, json, re, sys
log, start, tasks = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
# Which component runs a statement, by a fragment of its text (first match wins).
GROUPS = [
    ("ingest", ("queued_counts", "SAVEPOINT", "insert into agenttask.tasks", "client_id = $2 and phase = $3")),
    ("admission", ("admitted_at = now()", "coalesce(sum(cpu_millis)", "q.task_id")),
    ("claim", ("attempt = t.attempt + 1",)),
    ("publisher", ("select message_id", "delete from agenttask.outbox")),
    ("executor writes", ("update agenttask.tasks", "insert into agenttask.outbox", "select task_id, tenant, client_id",
                         "reply_exchange, reply_routing_key")),
    ("commit", ("COMMIT",)),
]
count, secs = collections.Counter(), collections.Counter()
group_count, group_secs = collections.Counter(), collections.Counter()
for i, line in enumerate(open(log)):
    if i < start:
        continue
    try:
        entry = json.loads(line)
    except ValueError:
        continue
    if entry.get("target") != "sqlx::query":
        continue
    f = entry["fields"]
    text = re.sub(r"\s+", " ", (f.get("db.statement") or f.get("summary", "")).strip())
    group = next((g for g, keys in GROUPS if any(k in text for k in keys)), "other")
    for c, s, key in ((count, secs, text[:90]), (group_count, group_secs, group)):
        c[key] += 1
        s[key] += f.get("elapsed_secs", 0.0)
print(f"{sum(count.values()) / tasks:.2f} statements per task; by component (per task, summed client-side time):")
for g, _ in GROUPS + [("other", ())]:
    print(f"  {g:16} {group_count[g] / tasks:5.2f}  {group_secs[g]:6.2f} s")
print("most frequent statements:")
for text, n in count.most_common(15):
    print(f"  {n / tasks:5.2f}  {secs[text]:6.2f} s  {text}")
PY

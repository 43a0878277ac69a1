#!/usr/bin/env bash
# Memory of the scheduler process with 1,000,000 queued tasks over 1,000 tenants.
#
#   loadtest/bench/scheduler_memory.sh [tasks] [tenants]
#
# Fills a scratch database (agenttask_bench_memory, dropped at the end) directly with queued
# tasks, starts `agenttask serve --components scheduler` (release build) against it with room
# for 50 running tasks and no executor, lets it become leader and admit, and prints its peak
# and current RSS and how long its first admission took.
set -euo pipefail
cd "$(dirname "$0")/../.."
. loadtest/bench/common.sh
TASKS="${1:-1000000}"
TENANTS="${2:-1000}"
DB=agenttask_bench_memory
URL="postgres://postgres@127.0.0.1:5432/$DB"

cargo build --release --locked --bin agenttask >&2
bench_drop_db
AGENTTASK_DATABASE_URL="$URL" target/release/agenttask migrate 2>/dev/null
work="$(mktemp -d)"
trap 'rm -rf "$work"; bench_drop_db' EXIT
{
    echo "[defaults]"
    echo "max_concurrency = 8"
    echo "max_queued = 100000000"
    echo "rate_per_second = 100000"
    for i in $(seq 0 $((TENANTS - 1))); do echo "[tenants.bench-$i]"; done
} > "$work/tenants.toml"

echo "inserting $TASKS queued tasks for $TENANTS tenants..." >&2
start=$(date +%s)
"${PSQL[@]}" "$URL" <<SQL
insert into agenttask.tasks (task_id, tenant, client_id, language, phase, priority, timeout_seconds,
    cpu_millis, memory_bytes, program, reply_exchange, reply_routing_key, submitted_at)
select gen_random_uuid(), 'bench-' || (g % $TENANTS), 'k' || g, 'python', 'Queued', 0, 30, 500,
    268435456, '{"code": "print(1)"}', 'agenttask.results', 'bench-' || (g % $TENANTS),
    now() + make_interval(secs => g / 1000000.0)
from generate_series(1, $TASKS) g;
analyze agenttask.tasks;
SQL
echo "inserted in $(( $(date +%s) - start ))s" >&2

# Room for 50 tasks of 500m in the global CPU capacity too (its default is this host's CPUs).
AGENTTASK_DATABASE_URL="$URL" AGENTTASK_TENANTS="$work/tenants.toml" AGENTTASK_MAX_RUNNING=50 AGENTTASK_CAPACITY_CPU=1000 \
AGENTTASK_HTTP_ADDR=127.0.0.1:0 AGENTTASK_LOG=info \
    target/release/agenttask serve --components scheduler 2> "$work/scheduler.log" &
pid=$!
t0=$(date +%s%N)
until [ "$("${PSQL[@]}" -Atc "select count(*) from agenttask.tasks where phase = 'Pending'" "$URL")" -ge 50 ]; do
    sleep 0.05
    kill -0 "$pid" 2>/dev/null || { cat "$work/scheduler.log" >&2; exit 1; }
done
t1=$(date +%s%N)
sleep 5   # a few more rounds and housekeeping (gauges count the queues)
rss_kb=$(awk '/VmRSS/ {print $2}' /proc/$pid/status)
hwm_kb=$(awk '/VmHWM/ {print $2}' /proc/$pid/status)
kill -TERM "$pid"; wait "$pid" || true
queued=$("${PSQL[@]}" -Atc "select count(*) from agenttask.tasks where phase = 'Queued'" "$URL")
awk -v q="$queued" -v t="$TENANTS" -v ms=$(( (t1 - t0) / 1000000 )) -v rss="$rss_kb" -v hwm="$hwm_kb" \
    'BEGIN { printf "queued=%s tenants=%s first_50_admitted_after_ms=%s rss_mb=%.1f peak_rss_mb=%.1f\n", q, t, ms, rss/1024, hwm/1024 }'

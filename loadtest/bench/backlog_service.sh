#!/usr/bin/env bash
# The whole service under a deep backlog: 1,000,000 queued tasks over 1,000 tenants, none of which
# has room (each holds its concurrency with a task that keeps running), and one more tenant with
# room that submits tasks one at a time through RabbitMQ.
#
#   loadtest/bench/backlog_service.sh [tasks] [tenants] [probes]
#
# Prints the service's RSS (current and peak) with every component running (ingest consuming
# every tenant's queue, the scheduler, the executor with --backend null, the publisher, HTTP), and
# the probe tenant's admission wait and publish-to-result percentiles. Uses a scratch database
# (agenttask_bench_backlog, dropped at the end) and deletes the tenants' queues at exit.
set -euo pipefail
cd "$(dirname "$0")/../.."
. loadtest/bench/common.sh
TASKS="${1:-1000000}"
TENANTS="${2:-1000}"
PROBES="${3:-200}"
bench_scratch agenttask_bench_backlog

bench_build
bench_drop_db
AGENTTASK_DATABASE_URL="$URL" target/release/agenttask migrate 2>/dev/null
work="$(mktemp -d)"
svc=
trap '[ -n "$svc" ] && kill -KILL "$svc" 2>/dev/null; bench_cleanup' EXIT
{
    printf '[defaults]\nmax_concurrency = 1\nmax_queued = 100000000\nrate_per_second = 1000\n\n'
    for i in $(seq 0 $((TENANTS - 1))); do printf '[tenants.backlog-%04d]\n' "$i"; done
    printf '\n[tenants.backlog-probe]\nmax_concurrency = 64\n'
} > "$work/tenants.toml"

# Each backlogged tenant's one slot is held by a running task whose lease (held by no live
# executor) outlasts the run, so nothing of the backlog can be admitted; the queue is real.
echo "inserting $TASKS queued tasks for $TENANTS tenants..." >&2
start=$(date +%s)
"${PSQL[@]}" "$URL" <<SQL
insert into agenttask.tasks (task_id, tenant, client_id, language, phase, priority, timeout_seconds,
    cpu_millis, memory_bytes, program, reply_exchange, reply_routing_key, submitted_at, admitted_at,
    started_at, attempt, lease_owner, lease_expires_at)
select gen_random_uuid(), 'backlog-' || lpad((g - 1)::text, 4, '0'), 'running-' || g, 'python', 'Running',
    0, 3600, 500, 268435456, '{"code": "print(1)"}', 'agenttask.results',
    'backlog-' || lpad((g - 1)::text, 4, '0'), now(), now(), now(), 1, gen_random_uuid(),
    now() + interval '2 hours'
from generate_series(1, $TENANTS) g;
insert into agenttask.tasks (task_id, tenant, client_id, language, phase, priority, timeout_seconds,
    cpu_millis, memory_bytes, program, reply_exchange, reply_routing_key, submitted_at)
select gen_random_uuid(), 'backlog-' || lpad((g % $TENANTS)::text, 4, '0'), 'k' || g, 'python', 'Queued',
    0, 30, 500, 268435456, '{"code": "print(1)"}', 'agenttask.results',
    'backlog-' || lpad((g % $TENANTS)::text, 4, '0'), now() + make_interval(secs => g / 1000000.0)
from generate_series(1, $TASKS) g;
analyze agenttask.tasks;
SQL
echo "inserted in $(( $(date +%s) - start ))s" >&2

# Room in the global capacity (slots and CPU: the running tasks hold 500m each), so that only the
# tenants' own quotas hold the backlog back.
t0=$(date +%s%N)
AGENTTASK_DATABASE_URL="$URL" AGENTTASK_TENANTS="$work/tenants.toml" AGENTTASK_HTTP_ADDR="127.0.0.1:$PORT" \
AGENTTASK_MAX_RUNNING=$((TENANTS + 64)) AGENTTASK_CAPACITY_CPU=$((TENANTS + 64)) AGENTTASK_LOG=warn \
    target/release/agenttask serve --backend null 2> "$work/service.log" &
svc=$!
until curl -fs "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1; do
    kill -0 "$svc" 2>/dev/null || { cat "$work/service.log" >&2; exit 1; }
    sleep 0.1
done
echo "ready after $(( ($(date +%s%N) - t0) / 1000000 )) ms (first start: declares every tenant's queues)" >&2
sleep 5 # the scheduler's first full refresh and the gauges' first count

echo "== $PROBES probe tasks, one at a time, to the tenant with room"
target/release/agenttask-loadtest --tenant backlog-probe --count "$PROBES" --concurrency 1 --deadline 600
rss_kb=$(awk '/VmRSS/ {print $2}' /proc/$svc/status)
hwm_kb=$(awk '/VmHWM/ {print $2}' /proc/$svc/status)
queued=$("${PSQL[@]}" -Atc "select count(*) from agenttask.tasks where phase = 'Queued'" "$URL")
kill -TERM "$svc"; wait "$svc" || true
svc=
awk -v q="$queued" -v t="$TENANTS" -v rss="$rss_kb" -v hwm="$hwm_kb" \
    'BEGIN { printf "whole service: queued=%s tenants=%s rss_mb=%.1f peak_rss_mb=%.1f\n", q, t, rss/1024, hwm/1024 }'

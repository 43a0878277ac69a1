#!/usr/bin/env bash
# Control-plane throughput: tasks per second from publish to result through the service with
# `--backend null` (no code runs), beside RabbitMQ's own publish-and-consume rate for messages of
# the same size, and Postgres inserting the same rows (into the real schema, with its indexes and
# triggers) one per commit and batched, measured in the same run on the same machine.
#
#   loadtest/bench/null_backend.sh [tasks] [in-flight]
#
# Uses a scratch database (agenttask_bench_null, dropped at the end) and a tenant of its own.
set -euo pipefail
cd "$(dirname "$0")/../.."
. loadtest/bench/common.sh
TASKS="${1:-5000}"
INFLIGHT="${2:-256}"
bench_scratch agenttask_bench_null

bench_build
bench_drop_db
work="$(mktemp -d)"
cat > "$work/tenants.toml" <<TOML
[tenants.benchnull]
max_concurrency = 1024
max_queued = 1000000
rate_per_second = 1000000
TOML
AGENTTASK_DATABASE_URL="$URL" AGENTTASK_TENANTS="$work/tenants.toml" AGENTTASK_HTTP_ADDR="127.0.0.1:$PORT" \
    AGENTTASK_MAX_RUNNING=1024 AGENTTASK_LOG=warn \
    target/release/agenttask serve --backend null 2>"$work/service.log" &
svc=$!
trap 'kill $svc 2>/dev/null; wait $svc 2>/dev/null; target/release/agenttask-loadtest --tenant benchnull --delete-tenant-queues || true; rm -rf "$work"; bench_drop_db' EXIT
bench_await_ready 100
sleep 1 # the tenant's consumer starts right after readiness

echo "== RabbitMQ alone"
target/release/agenttask-loadtest --raw --count "$TASKS"
echo "== the service, --backend null, $INFLIGHT in flight"
target/release/agenttask-loadtest --tenant benchnull --count "$TASKS" --concurrency "$INFLIGHT"
echo "== Postgres alone: the same task rows inserted into agenttask.tasks (pgbench)"
read -r one1 one8 batch < <(bench_postgres_alone agenttask_bench_pgraw target/release/agenttask benchpg "$TASKS")
echo "raw Postgres: one row per commit $one1 rows/s (1 connection), $one8 rows/s (8 connections); 100 rows per statement $batch rows/s"
echo "== RabbitMQ alone, again (the machine is noisy)"
target/release/agenttask-loadtest --raw --count "$TASKS"

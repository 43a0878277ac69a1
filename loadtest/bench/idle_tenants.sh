#!/usr/bin/env bash
# Many tenants, idle: what `agenttask serve` costs with N configured tenants and no traffic.
#
#   loadtest/bench/idle_tenants.sh [tenants] [idle-seconds]
#
# Starts the service (release build, every component, --backend null) twice on the same tenants:
# the first start creates their quorum queues, the second finds them (an ordinary restart).
# Each time it prints the time from start to `/readyz` 200, then, after idling, its RSS, its
# threads and its TCP connections to RabbitMQ, then how long it took to exit after SIGTERM.
# Uses a scratch database (agenttask_bench_idle) and deletes the tenants' queues at exit.
# A thousand tenants are 2,000 queues: RabbitMQ needs more than its default 1,024 open files
# for that (see BENCHMARKS.md, "Many tenants, idle").
set -euo pipefail
cd "$(dirname "$0")/../.."
. loadtest/bench/common.sh
TENANTS="${1:-1000}"
IDLE="${2:-10}"
bench_scratch agenttask_bench_idle

bench_build
bench_drop_db
work="$(mktemp -d)"
svc=
trap '[ -n "$svc" ] && kill -KILL "$svc" 2>/dev/null; bench_cleanup' EXIT
bench_tenants benchidle "$TENANTS" > "$work/tenants.toml"

now_ms() { echo $(( $(date +%s%N) / 1000000 )); }

run() {
    local label="$1" t0 ready_ms rss_kb threads conns stop_ms
    t0=$(now_ms)
    AGENTTASK_DATABASE_URL="$URL" AGENTTASK_TENANTS="$work/tenants.toml" AGENTTASK_HTTP_ADDR="127.0.0.1:$PORT" \
        AGENTTASK_LOG=info target/release/agenttask serve --backend null 2>"$work/service-$label.log" &
    svc=$!
    until curl -fs "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1; do
        kill -0 "$svc" 2>/dev/null || { cat "$work/service-$label.log" >&2; exit 1; }
        sleep 0.05
    done
    ready_ms=$(( $(now_ms) - t0 ))
    sleep "$IDLE"
    rss_kb=$(ps -o rss= -p "$svc" | tr -d ' ')
    threads=$(ps -o nlwp= -p "$svc" | tr -d ' ')
    # The process's own sockets to the broker (connection names are the same in every process).
    conns=$(ss -Htnp state established '( dport = :5672 )' | grep -c "pid=$svc," || true)
    t0=$(now_ms)
    kill -TERM "$svc"
    wait "$svc" || { echo "exit status $? after SIGTERM" >&2; }
    stop_ms=$(( $(now_ms) - t0 ))
    svc=
    awk -v l="$label" -v t="$TENANTS" -v r="$ready_ms" -v rss="$rss_kb" -v th="$threads" -v c="$conns" -v s="$stop_ms" \
        'BEGIN { printf "%s: tenants=%s ready_ms=%s rss_mb=%.1f threads=%s amqp_connections=%s sigterm_exit_ms=%s\n", l, t, r, rss/1024, th, c, s }'
}

run first-start
run restart

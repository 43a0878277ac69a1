#!/usr/bin/env bash
# Warm sandboxes (issue 15), publish to result through the service, beside the plain interpreter
# started by itself, in one run: rounds alternate plain `python3 -I -B -c 'print(1)'`, the
# service with warm pools, the service with them off, and plain `Rscript --vanilla -e 'cat(1)'`.
# Then sustained throughput: plain `python3 -c 'print(1)'` back to back on every core, and the
# service with and without warm pools under a flood.
#
#   loadtest/bench/warm.sh [tasks per latency round] [rounds] [tasks for throughput]
#
# Uses a scratch database (agenttask_bench_warm, dropped at the end) and a tenant of its own.
# BENCH_BIN=DIR runs the `agenttask` and `agenttask-loadtest` binaries in DIR instead of building
# them, so that two builds (before and after a change) can be compared in one session.
set -euo pipefail
cd "$(dirname "$0")/../.."
. loadtest/bench/common.sh
N="${1:-100}"
ROUNDS="${2:-3}"
FLOOD="${3:-600}"
bench_scratch agenttask_bench_warm
CORES="$(nproc)"

BIN="${BENCH_BIN:-target/release}"
[[ -n "${BENCH_BIN:-}" ]] || bench_build
bench_drop_db
work="$(mktemp -d)"
chmod 711 "$work"
cat > "$work/tenants.toml" <<TOML
[tenants.benchwarm]
max_concurrency = 64
max_queued = 1000000
rate_per_second = 1000000
burst = 1000000
TOML
svc=
stop() {
    if [[ -n "$svc" ]]; then kill "$svc" 2>/dev/null || true; wait "$svc" 2>/dev/null || true; svc=; fi
}
trap 'stop; "$BIN"/agenttask-loadtest --tenant benchwarm --delete-tenant-queues || true; rm -rf "$work"; bench_drop_db' EXIT

metric() { curl -fs "http://127.0.0.1:$PORT/metrics" | awk -v s="$1" '$1 == s { print $2 }'; }

# start PYTHON_POOL R_POOL: the service, ready, its tenant consumed and its pools full.
start() {
    AGENTTASK_DATABASE_URL="$URL" AGENTTASK_TENANTS="$work/tenants.toml" AGENTTASK_HTTP_ADDR="127.0.0.1:$PORT" \
        AGENTTASK_DATA_DIR="$work/data" AGENTTASK_MAX_RUNNING="$((2 * CORES))" AGENTTASK_LOG=warn \
        AGENTTASK_WARM_PYTHON="$1" AGENTTASK_WARM_R="$2" \
        "$BIN"/agenttask serve 2>>"$work/service.log" &
    svc=$!
    bench_await_ready
    for _ in $(seq 1 300); do
        py="$(metric 'agenttask_warm_pool_size{language="python"}')"
        r="$(metric 'agenttask_warm_pool_size{language="r"}')"
        [[ "${py:-0}" -ge "$1" && "${r:-0}" -ge "$2" ]] && break
        sleep 0.1
    done
    sleep 1 # the tenant's consumer starts right after readiness
}

# plain N ARGV...: median wall time of starting the command N times, one at a time.
plain() {
    python3 - "$@" <<'PY'
import statistics, subprocess, sys, time
n, argv = int(sys.argv[1]), sys.argv[2:]
times = []
for _ in range(n):
    t = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, check=True)
    times.append((time.perf_counter() - t) * 1000)
print(f"plain {' '.join(a if ' ' not in a else repr(a) for a in argv)}: p50 {statistics.median(times):.1f} ms (n={n})")
PY
}

latency() { # LABEL MIX COUNT
    printf '%s: ' "$1"
    "$BIN"/agenttask-loadtest --tenant benchwarm --count "$3" --concurrency 1 --mix "$2" -o json |
        python3 -c 'import json,sys; r=json.load(sys.stdin); l=r["latency_ms"]; print("p50 %.1f ms  p95 %.1f  p99 %.1f  (%d tasks, %d unexpected)" % (l["p50"], l["p95"], l["p99"], r["tasks"], r["unexpected"]))'
}

echo "== latency, publish to result, one task at a time; $ROUNDS rounds"
for round in $(seq 1 "$ROUNDS"); do
    echo "-- round $round"
    plain "$N" /usr/bin/python3 -I -B -c 'print(1)'
    start 2 1
    latency "service, warm pools, print(1)" print=1 "$N"
    latency "service, warm pools, R cat(1)" r=1 "$((N / 4 + 1))"
    stop
    start 0 0
    latency "service, pools off, print(1)" print=1 "$N"
    latency "service, pools off, R cat(1)" r=1 "$((N / 4 + 1))"
    stop
    plain "$((N / 4 + 1))" /usr/bin/Rscript --vanilla -e 'cat(1)'
done

echo "== throughput, $FLOOD tasks, $((4 * CORES)) in flight, --max-running $((2 * CORES))"
for round in 1 2; do
    echo "-- round $round"
    python3 - "$CORES" <<'PY'
import subprocess, sys, time, concurrent.futures as cf
cores, secs = int(sys.argv[1]), 10.0
def loop():
    k, end = 0, time.monotonic() + secs
    while time.monotonic() < end:
        subprocess.run(["/usr/bin/python3", "-c", "print(1)"], stdout=subprocess.DEVNULL, check=True)
        k += 1
    return k
with cf.ThreadPoolExecutor(cores) as ex:
    total = sum(ex.map(lambda _: loop(), range(cores)))
print(f"plain python3 -c 'print(1)', {cores} at a time: {total / secs:.1f}/s")
PY
    for pools in "$CORES 0" "0 0"; do
        # shellcheck disable=SC2086
        start $pools
        printf 'service, warm python pool %s: ' "${pools%% *}"
        "$BIN"/agenttask-loadtest --tenant benchwarm --count "$FLOOD" --concurrency "$((4 * CORES))" -o json |
            python3 -c 'import json,sys; r=json.load(sys.stdin); print("%.1f tasks/s, p50 %.0f ms (%d unexpected)" % (r["tasks_per_second"], r["latency_ms"]["p50"], r["unexpected"]))'
        printf '  warm hits %s, misses %s\n' "$(metric 'agenttask_warm_pool_hits_total{language="python"}')" \
            "$(metric 'agenttask_warm_pool_misses_total{language="python",reason="empty"}')"
        stop
    done
done

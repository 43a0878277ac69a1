#!/usr/bin/env bash
# The Kubernetes backend's control plane through the API emulator: tasks per second from publish
# to result, and the latency from a task's admission (Postgres `admitted_at`) to its pod's
# creation (the reconciler's `Created` Event, whose `eventTime` has microseconds), with
# `agenttask-kubesim --kubelet simulate` (no code runs; each pod is played in a few ms).
#
#   loadtest/bench/kube_emulator.sh [tasks] [in-flight]
#
# Uses a scratch database (agenttask_bench_kube, dropped at the end), a tenant of its own and an
# emulator on a free port; everything it starts is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/../.."
. loadtest/bench/common.sh
TASKS="${1:-1000}"
INFLIGHT="${2:-200}"
bench_scratch agenttask_bench_kube

export SQLX_OFFLINE=true
cargo build --release --locked -p agenttask --bin agenttask >&2
cargo build --release --locked -p agenttask-kubesim -p agenttask-loadtest >&2
bench_drop_db
work="$(mktemp -d)"
pids=()
cleanup() {
    # The service first (it holds watches on the emulator), then the emulator.
    bench_kill_pids
    target/release/agenttask-loadtest --tenant benchkube --delete-tenant-queues || true
    rm -rf "$work"
    bench_drop_db
}
trap cleanup EXIT

bench_kubesim target/release/agenttask-kubesim simulate

cat >"$work/tenants.toml" <<TOML
[tenants.benchkube]
max_concurrency = 1000
max_queued = 1000000
rate_per_second = 1000000
TOML
AGENTTASK_DATABASE_URL="$URL" AGENTTASK_TENANTS="$work/tenants.toml" AGENTTASK_HTTP_ADDR="127.0.0.1:$PORT" \
    AGENTTASK_MAX_RUNNING=1000 AGENTTASK_CAPACITY_CPU=1000 AGENTTASK_LOG=warn \
    target/release/agenttask serve --backend kubernetes --kubeconfig "$work/kubeconfig" 2>"$work/service.log" &
pids+=($!)
bench_await_ready 100
sleep 1 # the tenant's consumer starts right after readiness

echo "== the service, --backend kubernetes (podjob) against agenttask-kubesim --kubelet simulate, $INFLIGHT in flight"
target/release/agenttask-loadtest --tenant benchkube --count "$TASKS" --concurrency "$INFLIGHT"

echo "== admitted -> pod created (the reconciler's Created Event), over $TASKS tasks"
"${kc[@]}" get events.events.k8s.io -n agenttask -o json |
    jq -r '.items[] | select(.reason == "Created") | [(.regarding.name | ltrimstr("at-")), .eventTime] | @tsv' \
        >"$work/created.tsv"
"${PSQL[@]}" -At -F $'\t' -c "select task_id, to_char(admitted_at at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') from agenttask.tasks" "$URL" \
    >"$work/admitted.tsv"
python3 - "$work/admitted.tsv" "$work/created.tsv" <<'PY'
import sys
from datetime import datetime
def parse(t):
    t = t.replace("Z", "+00:00")
    return datetime.fromisoformat(t)
admitted = dict(l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip())
lat = []
for line in open(sys.argv[2]):
    tid, created = line.rstrip("\n").split("\t")
    if tid in admitted:
        lat.append((parse(created) - parse(admitted[tid])).total_seconds() * 1000)
lat.sort()
if not lat:
    sys.exit("no Created events matched admitted tasks")
pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]
print(f"tasks {len(lat)}  p50 {pick(0.50):.1f} ms  p99 {pick(0.99):.1f} ms  max {lat[-1]:.1f} ms")
PY

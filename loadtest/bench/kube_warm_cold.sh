#!/usr/bin/env bash
# agent-sandbox warm pool against cold Sandboxes, side by side in one run, through the API emulator
# with the `exec` kubelet (real Python under bubblewrap; needs root, bubblewrap and the sandbox
# user, as the exec tests do): the latency from a task's admission (Postgres `admitted_at`) to its
# program running (the reconciler's `Running` Event, whose `eventTime` has microseconds; each task
# sleeps 2 s, so that the reconciler sees it running before it ends). Warm
# tasks claim a pre-warmed sandbox of pool `py` and are handed over to its agent; cold ones get a
# Sandbox of their own (its pod made, scheduled and started from nothing). Pairs of tasks (one
# warm, one cold) are applied as AgentTasks with kubectl, one pair every PAUSE seconds, so the pool
# refills in between and what is measured is latency, not queueing.
#
#   loadtest/bench/kube_warm_cold.sh [pairs] [pause-seconds]
#
# PROFILE=debug uses target/debug (no release build). No RabbitMQ is involved: the service runs
# the scheduler, executor and HTTP components only, and the tasks come in through kubectl. Uses a
# scratch database (agenttask_bench_warm, dropped at the end) and free ports for the emulator and
# the service; everything it starts is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/../.."
source loadtest/bench/common.sh
PAIRS="${1:-20}"
PAUSE="${2:-2.5}"
PROFILE="${PROFILE:-release}"
bench_scratch agenttask_bench_warm
bin="target/$PROFILE"

export SQLX_OFFLINE=true
# Both binaries by name: `--bin` applies to every selected package, so `-p agenttask-kubesim`
# alone beside `--bin agenttask` builds no emulator.
bins=(-p agenttask -p agenttask-kubesim --bin agenttask --bin agenttask-kubesim)
if [ "$PROFILE" = release ]; then
    cargo build --release --locked "${bins[@]}" >&2
else
    cargo build --locked "${bins[@]}" >&2
fi
bench_drop_db
work="$(mktemp -d)"
pids=()
cleanup() {
    bench_kill_pids
    [ -n "${KEEP_WORK:-}" ] && echo "work directory kept: $work" >&2 || rm -rf "$work"
    bench_drop_db
}
trap cleanup EXIT

bench_kubesim "$bin/agenttask-kubesim" exec
"${kc[@]}" create namespace bench-cold >/dev/null
"${kc[@]}" label namespace bench-cold pod-security.kubernetes.io/enforce=restricted >/dev/null
"${kc[@]}" apply --server-side -f tests/kubesim/tests/data/agent-sandbox-crds.yaml >/dev/null
"${kc[@]}" wait --for=condition=Established crd/sandboxwarmpools.extensions.agents.x-k8s.io >/dev/null
"${kc[@]}" -n agenttask create secret generic py-agent-token --from-literal=token="$(openssl rand -hex 32)" >/dev/null

cat >"$work/tenants.toml" <<TOML
[defaults]
max_concurrency = 1000
max_queued = 1000000
rate_per_second = 1000000

[tenants.benchwarm]
namespaces = ["agenttask"]
warm_pool = "py"

[tenants.benchcold]
namespaces = ["bench-cold"]
TOML
# The pool's template and the pool, as `agenttask render` prints them for the operator.
echo '{"language": "python", "code": "print(1)"}' >"$work/task.json"
"$bin/agenttask" render --backend sandbox --tenant benchwarm --tenants "$work/tenants.toml" "$work/task.json" |
    python3 -c '
import sys, yaml
docs = [d for d in yaml.safe_load_all(sys.stdin) if d and d["kind"] in ("SandboxTemplate", "SandboxWarmPool")]
for d in docs:
    if d["kind"] == "SandboxWarmPool":
        d["spec"]["replicas"] = 4
yaml.safe_dump_all(docs, sys.stdout)' >"$work/pool.yaml"
"${kc[@]}" apply --server-side -f "$work/pool.yaml" >/dev/null
for _ in $(seq 1 300); do
    [ "$("${kc[@]}" get sandboxwarmpools py -n agenttask -o jsonpath='{.status.readyReplicas}')" = 4 ] && break
    sleep 0.1
done

AGENTTASK_DATABASE_URL="$URL" AGENTTASK_TENANTS="$work/tenants.toml" AGENTTASK_HTTP_ADDR="127.0.0.1:$PORT" \
    AGENTTASK_MAX_RUNNING=1000 AGENTTASK_CAPACITY_CPU=1000 AGENTTASK_LOG=warn \
    "$bin/agenttask" serve --components scheduler,executor,http --backend kubernetes --kube-backend sandbox \
    --kubeconfig "$work/kubeconfig" 2>"$work/service.log" &
pids+=($!)
for _ in $(seq 1 100); do curl -fs "http://127.0.0.1:$PORT/healthz" >/dev/null && break; sleep 0.1; done
sleep 1

task() { # name namespace
    printf 'apiVersion: agenttask.io/v1alpha1\nkind: AgentTask\nmetadata: {name: %s, namespace: %s}\nspec: {language: python, code: "import time\\ntime.sleep(2)", timeoutSeconds: 60}\n' "$1" "$2"
}
echo "== $PAIRS pairs (warm on pool py of 4, cold), one pair every ${PAUSE}s, $PROFILE build, exec kubelet"
for i in $(seq 1 "$PAIRS"); do
    { task "w$i" agenttask; echo '---'; task "c$i" bench-cold; } | "${kc[@]}" apply -f - >/dev/null
    sleep "$PAUSE"
done
for _ in $(seq 1 600); do
    done_n="$("${kc[@]}" get agenttasks -A -o json | jq '[.items[] | select(.status.phase == "Succeeded" or .status.phase == "Failed")] | length')"
    [ "$done_n" = $((2 * PAIRS)) ] && break
    sleep 0.2
done
"${kc[@]}" get agenttasks -A -o json |
    jq -r '.items[] | [.metadata.name, .status.phase, (.metadata.annotations["agenttask.io/launch"] // "")] | @tsv' >"$work/ended.tsv"
"${kc[@]}" get events.events.k8s.io -A -o json |
    jq -r '.items[] | select(.reason == "Running" or .reason == "Claimed" or .reason == "HandedOver")
        | [.regarding.namespace + "/" + .regarding.name, .eventTime, .reason] | @tsv' >"$work/events.tsv"
"${PSQL[@]}" -At -F $'\t' -c "select kube_object, to_char(admitted_at at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') from agenttask.tasks where admitted_at is not null" "$URL" \
    >"$work/admitted.tsv"
python3 - "$work/admitted.tsv" "$work/events.tsv" "$work/ended.tsv" <<'PY'
import sys
from datetime import datetime
def parse(t):
    return datetime.fromisoformat(t.replace("Z", "+00:00"))
admitted = dict(l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip())
ended = [l.rstrip("\n").split("\t") for l in open(sys.argv[3]) if l.strip()]
not_ok = [e for e in ended if e[1] != "Succeeded"]
if not_ok:
    sys.exit(f"tasks that did not succeed: {not_ok}")
launch = {e[0]: e[2] for e in ended}
lat = {"warm": [], "cold": [], "warm tenant, ran cold (no ready replica)": []}
steps = {"Claimed": [], "HandedOver": []}
events = {}
for line in open(sys.argv[2]):
    obj, at, reason = line.rstrip("\n").split("\t")
    events.setdefault(obj, {})[reason] = parse(at)
for obj, ev in events.items():
    if obj in admitted and "Claimed" in ev and "HandedOver" in ev:
        steps["Claimed"].append((ev["Claimed"] - parse(admitted[obj])).total_seconds() * 1000)
        steps["HandedOver"].append((ev["HandedOver"] - ev["Claimed"]).total_seconds() * 1000)
for obj, ev in events.items():
    running = ev.get("Running")
    if obj in admitted and running:
        ns, name = obj.split("/")
        kind = "cold" if ns == "bench-cold" else "warm" if launch.get(name, "").startswith("warm") else "warm tenant, ran cold (no ready replica)"
        lat[kind].append((running - parse(admitted[obj])).total_seconds() * 1000)
for kind, xs in lat.items():
    xs.sort()
    if not xs:
        if kind.startswith("warm tenant"):
            continue
        sys.exit(f"no Running events for {kind} tasks")
    pick = lambda q: xs[min(len(xs) - 1, int(q * len(xs)))]
    print(f"{kind}: tasks {len(xs)}  admitted -> running p50 {pick(0.50):.0f} ms  p90 {pick(0.90):.0f} ms  max {xs[-1]:.0f} ms")
for step, xs in steps.items():
    xs.sort()
    if xs:
        what = "admitted -> claim made" if step == "Claimed" else "claim made -> handed over"
        print(f"  warm, {what}: p50 {xs[len(xs) // 2]:.0f} ms  max {xs[-1]:.0f} ms")
PY

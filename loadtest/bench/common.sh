# Shared by the bench scripts (sourced, not run).

# psql against the local Postgres as its superuser, stopping at the first error.
PSQL=(psql -h 127.0.0.1 -U postgres -v ON_ERROR_STOP=1 -q)

# The release builds of the service and the load generator that the scripts run.
bench_build() {
    cargo build --release --locked -p agenttask --bin agenttask >&2
    cargo build --release --locked -p agenttask-loadtest >&2
}

# Prints a tenants file of N tenants PREFIX-000.. with weights 1 to 4 and quotas that never bind.
bench_tenants() {
    local prefix="$1" n="$2"
    printf '[defaults]\nmax_concurrency = 1000\nmax_queued = 1000000\nrate_per_second = 1000000\nburst = 1000000\n\n'
    for i in $(seq 0 $((n - 1))); do printf '[tenants.%s-%03d]\nweight = %d\n\n' "$prefix" "$i" $((1 + i % 4)); done
}

# Deletes the tenants' quorum queues (the broker keeps, and recovers at every start, each one until
# it is deleted), then the work directory and the scratch database. Needs $work, $DB and PSQL.
bench_cleanup() {
    target/release/agenttask-loadtest --tenants-file "$work/tenants.toml" --delete-tenant-queues || true
    rm -rf "$work"
    bench_drop_db
}

# A TCP port on 127.0.0.1 that nothing listens on now: fixed ports collide when two benchmarks
# (or a benchmark and a test) run at once, and a readiness probe would then ask the wrong process.
bench_free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# A benchmark's scratch database and the service's address: sets DB (the database NAME), URL
# (its connection URL) and PORT (see bench_free_port).
bench_scratch() {
    DB="$1"
    URL="postgres://postgres@127.0.0.1:5432/$DB"
    PORT="$(bench_free_port)"
}

# Drops the scratch database $DB, whoever is still connected to it.
bench_drop_db() {
    "${PSQL[@]}" -c "drop database if exists $DB with (force)" postgres
}

# Waits until the service on $PORT answers /readyz, for at most TRIES tenths of a second (default
# 300); the caller's next step fails if it never did.
bench_await_ready() {
    for _ in $(seq 1 "${1:-300}"); do curl -fs "http://127.0.0.1:$PORT/readyz" >/dev/null && break; sleep 0.1; done
}

# Stops the service whose pid is $svc, if one is running.
bench_stop_service() { [ -n "$svc" ] && kill "$svc" 2>/dev/null && wait "$svc" 2>/dev/null; svc=; }

# Kills what the script started, last first, from the array pids.
bench_kill_pids() {
    local i
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        kill "${pids[$i]}" 2>/dev/null || true
        wait "${pids[$i]}" 2>/dev/null || true
    done
}

# Starts the API emulator BINARY with the kubelet KUBELET in the background (its pid appended to
# pids), writes $work/kubeconfig for it, sets kc to kubectl against it, and applies what an
# operator would: the CRD and the task namespace.
bench_kubesim() {
    local bin="$1" kubelet="$2" server
    "$bin" --addr 127.0.0.1:0 --kubelet "$kubelet" >"$work/sim.url" 2>"$work/sim.log" &
    pids+=($!)
    for _ in $(seq 1 100); do [ -s "$work/sim.url" ] && break; sleep 0.1; done
    server="$(head -n1 "$work/sim.url")"
    [ -n "$server" ] || { echo "the emulator did not start: $(cat "$work/sim.log")" >&2; exit 1; }
    cat >"$work/kubeconfig" <<YAML
apiVersion: v1
kind: Config
clusters: [{name: sim, cluster: {server: $server}}]
contexts: [{name: sim, context: {cluster: sim, user: sim, namespace: agenttask}}]
current-context: sim
users: [{name: sim, user: {}}]
YAML
    kc=(kubectl --kubeconfig "$work/kubeconfig" --cache-dir "$work/cache")
    "${kc[@]}" apply --server-side -f deploy/crd.yaml >/dev/null
    "${kc[@]}" apply --server-side -f deploy/kubernetes/namespaces.yaml >/dev/null
}

# Postgres alone: inserts task rows like the service's into the real schema (its indexes and
# triggers) of a fresh scratch database PGDB, migrated by the service binary BIN, with pgbench:
# ROWS rows one per commit on 1 connection, then on 8, then ROWS rows 100 per statement. Prints
# the three rates in rows/s, space-separated. Needs $work and PSQL; drops PGDB at the end.
bench_postgres_alone() {
    local pgdb="$1" bin="$2" tenant="$3" rows="$4" row cols one1 one8 batch
    "${PSQL[@]}" -c "drop database if exists $pgdb with (force)" -c "create database $pgdb" postgres
    AGENTTASK_DATABASE_URL="postgres://postgres@127.0.0.1:5432/$pgdb" "$bin" migrate 2>/dev/null
    row="gen_random_uuid(), '$tenant', gen_random_uuid()::text, 'python', 'Queued', 0, 30, 500, 268435456,
        '{\"code\": \"print(1)\"}', 'agenttask.results', '$tenant', now()"
    cols="task_id, tenant, client_id, language, phase, priority, timeout_seconds, cpu_millis, memory_bytes,
        program, reply_exchange, reply_routing_key, submitted_at"
    echo "insert into agenttask.tasks ($cols) values ($row);" > "$work/one.sql"
    echo "insert into agenttask.tasks ($cols) select $row from generate_series(1, 100);" > "$work/batch.sql"
    one1=$(pgbench -h 127.0.0.1 -U postgres -n -c 1 -t "$rows" -f "$work/one.sql" "$pgdb" 2>/dev/null | bench_tps)
    one8=$(pgbench -h 127.0.0.1 -U postgres -n -c 8 -j 2 -t $((rows / 8)) -f "$work/one.sql" "$pgdb" 2>/dev/null | bench_tps)
    batch=$(pgbench -h 127.0.0.1 -U postgres -n -c 1 -t $((rows / 100 + 1)) -f "$work/batch.sql" "$pgdb" 2>/dev/null | bench_tps)
    "${PSQL[@]}" -c "drop database if exists $pgdb with (force)" postgres
    awk -v a="$one1" -v b="$one8" -v c="$batch" 'BEGIN { printf "%.0f %.0f %.0f\n", a, b, c * 100 }'
}

# The transactions per second of a pgbench report.
bench_tps() { grep -oP '^tps = \K[0-9.]+' | head -1; }

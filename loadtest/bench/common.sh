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
    "${PSQL[@]}" -c "drop database if exists $DB with (force)" postgres
}

# A TCP port on 127.0.0.1 that nothing listens on now: fixed ports collide when two benchmarks
# (or a benchmark and a test) run at once, and a readiness probe would then ask the wrong process.
bench_free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

#!/usr/bin/env bash
# Runs the whole test suite: the static checks (deploy/local/lint.sh: fmt, clippy, the SQL's
# offline data), unit tests, and integration tests against the real Postgres, RabbitMQ and
# bubblewrap sandbox of this host (installed and started first if needed).
set -euo pipefail
cd "$(dirname "$0")/../.."
source deploy/local/common.sh

prepare_host
ensure_promtool
deploy/local/lint.sh
# Databases left by interrupted earlier runs (each test makes its own and drops it at the end).
psql -h 127.0.0.1 -U postgres -Atqc "select datname from pg_database where datname like 'agenttask_test_%'" postgres |
    while read -r db; do psql -h 127.0.0.1 -U postgres -qc "drop database if exists \"$db\" with (force)" postgres; done
rabbitmqctl -q list_vhosts 2>/dev/null | grep '^agenttask-test-' | while read -r v; do rabbitmqctl -q delete_vhost "$v" >/dev/null; done || true

cargo test --locked --workspace "$@"

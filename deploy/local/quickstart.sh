#!/usr/bin/env bash
# Sets up this host and runs AgentTask with the local sandbox backend, in the foreground.
#
#   deploy/local/quickstart.sh [extra `agenttask serve` flags]
#
# Installs bubblewrap, Python and R and the sandbox user (deploy/local/install-sandbox.sh), makes
# sure Postgres and RabbitMQ run on 127.0.0.1, builds the release binaries, and starts
# `agenttask serve` with the example tenants (demo, acme, globex). Stop it with Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/../.."
source deploy/local/common.sh

prepare_host
log "building (release)"
cargo build --release --locked --bins

mkdir -p .agenttask
if [[ -z "${AGENTTASK_ADMIN_TOKEN:-}" ]]; then
    [[ -s .agenttask/admin-token ]] || head -c 24 /dev/urandom | base64 | tr -d '/+=' > .agenttask/admin-token
    chmod 600 .agenttask/admin-token
    AGENTTASK_ADMIN_TOKEN="$(cat .agenttask/admin-token)"
    export AGENTTASK_ADMIN_TOKEN
fi
export AGENTTASK_TENANTS="${AGENTTASK_TENANTS:-deploy/tenants.example.toml}"

cat >&2 <<MSG

AgentTask is starting with the local backend. In another terminal:

  export PATH="\$PWD/target/release:\$PATH"
  agentctl submit --tenant demo -c 'print("hello from the sandbox")' --wait
  export AGENTCTL_TOKEN=\$(cat .agenttask/admin-token)
  agentctl get <task id from the line above>

Metrics: http://127.0.0.1:9464/metrics   Tenants: $AGENTTASK_TENANTS (edit, then kill -HUP to reload)

MSG
exec target/release/agenttask serve "$@"

# Shared by quickstart.sh and test.sh: make sure this host has what AgentTask needs.
# Sourced, not run.

log() { printf '%s: %s\n' "${0##*/}" "$*" >&2; }
die() { printf '%s: ERROR: %s\n' "${0##*/}" "$*" >&2; exit 1; }

# Postgres and RabbitMQ on 127.0.0.1, started the way this kind of machine starts them.
ensure_services() {
    if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
        command -v pg_ctlcluster >/dev/null || die "Postgres is not running on 127.0.0.1:5432 and pg_ctlcluster is not installed"
        log "starting Postgres"
        pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main start
    fi
    for _ in $(seq 1 60); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
    pg_isready -q -h 127.0.0.1 -p 5432 || die "Postgres did not come up on 127.0.0.1:5432"

    if ! (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; then
        command -v rabbitmq-server >/dev/null || die "RabbitMQ is not running on 127.0.0.1:5672 and rabbitmq-server is not installed"
        log "starting RabbitMQ"
        rabbitmq-server -detached
    fi
    for _ in $(seq 1 120); do (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null && break; sleep 1; done
    (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null || die "RabbitMQ did not come up on 127.0.0.1:5672"
    # The broker accepts TCP before it accepts AMQP logins; wait until it answers the AMQP
    # protocol header (a broker that takes TCP but never answers it is wedged: say so, rather
    # than let every test time out).
    for _ in $(seq 1 60); do amqp_answers && break; sleep 1; done
    amqp_answers || die "RabbitMQ on 127.0.0.1:5672 accepts TCP but does not answer AMQP; restart it: rabbitmqctl stop (or kill its beam.smp), then rabbitmq-server -detached"
    ensure_broker_file_handles
}

# RabbitMQ 3.x sizes its file-handle budget from its open-files limit at start, and every quorum
# queue reserves three handles from it. At this kind of machine's default of 1,024 (927 handles)
# the broker stops completing AMQP handshakes after about 300 queues (150 tenants: each has a
# tasks and a results queue), for every client. So the local broker's soft limit is raised to
# its hard limit (no privilege needed), through its own environment file, and the broker is
# restarted once if it runs with less. A broker elsewhere needs the same (`ulimit -n`, or
# `LimitNOFILE` under systemd): the README says so.
BROKER_ENV_FILE=/etc/rabbitmq/rabbitmq-env.conf
BROKER_MIN_FILE_HANDLES=8000

broker_file_handles() {
    rabbitmqctl -q eval 'file_handle_cache:get_limit().' 2>/dev/null | tr -dc '0-9'
}

ensure_broker_file_handles() {
    command -v rabbitmqctl >/dev/null || return 0
    local have
    have="$(broker_file_handles)"
    # Not a broker this host manages (rabbitmqctl cannot reach it): leave it alone.
    [ -n "$have" ] || return 0
    [ "$have" -ge "$BROKER_MIN_FILE_HANDLES" ] && return 0
    if [ "$(id -u)" != 0 ] || [ ! -d "$(dirname "$BROKER_ENV_FILE")" ]; then
        log "WARNING: RabbitMQ has $have file handles; with more than about 150 tenants it stops accepting connections. Raise its open-files limit (ulimit -n 65536 before it starts, or LimitNOFILE) and restart it."
        return 0
    fi
    if ! grep -qs 'agenttask: open-files limit' "$BROKER_ENV_FILE"; then
        log "raising RabbitMQ's open-files limit to its hard limit, in $BROKER_ENV_FILE (each quorum queue reserves 3 file handles; it has $have)"
        printf '%s\n' '# agenttask: open-files limit. Each quorum queue reserves 3 file handles, sized from this limit.' \
            'ulimit -n "$(ulimit -Hn)" 2>/dev/null || true' >>"$BROKER_ENV_FILE"
    fi
    log "restarting RabbitMQ so that it takes the new limit"
    rabbitmqctl -q stop >/dev/null 2>&1 || true
    for _ in $(seq 1 60); do (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null || break; sleep 1; done
    rabbitmq-server -detached
    for _ in $(seq 1 120); do amqp_answers && break; sleep 1; done
    amqp_answers || die "RabbitMQ did not come back on 127.0.0.1:5672 after its restart; start it: rabbitmq-server -detached"
    have="$(broker_file_handles)"
    [ -n "$have" ] && [ "$have" -ge "$BROKER_MIN_FILE_HANDLES" ] \
        || log "WARNING: RabbitMQ still has only ${have:-unknown} file handles (its hard limit is too low); many tenants will wedge it"
}

# Whether the broker answers the AMQP 0-9-1 protocol header within 5 s.
amqp_answers() {
    timeout 5 bash -c 'exec 3<>/dev/tcp/127.0.0.1/5672 && printf "AMQP\x00\x00\x09\x01" >&3 && head -c 1 <&3 >/dev/null' 2>/dev/null
}

# bubblewrap, the runtimes and the unprivileged sandbox user.
ensure_sandbox() {
    "$(dirname "${BASH_SOURCE[0]}")/install-sandbox.sh"
}

ensure_rust() {
    command -v cargo >/dev/null || die "cargo not found: install a Rust toolchain (rustup) first"
}

# sqlx-cli, for checking the compile-checked queries' offline data (`.sqlx/`). The version
# follows the sqlx crate in Cargo.lock; only the Postgres driver is built.
ensure_sqlx_cli() {
    local want
    want="$(awk '/^name = "sqlx"$/ { getline; gsub(/version = |"/, ""); print; exit }' Cargo.lock)"
    if cargo sqlx --version 2>/dev/null | grep -qF "$want"; then
        return
    fi
    log "installing sqlx-cli $want (once per machine)"
    cargo install sqlx-cli --version "=$want" --locked --no-default-features --features postgres,rustls
}

# promtool (Debian's prometheus package) checks and unit-tests deploy/monitoring/alerts.yml in
# the test suite. Nothing of Prometheus is started.
ensure_promtool() {
    command -v promtool >/dev/null && return
    command -v apt-get >/dev/null || die "promtool not found: install Prometheus' promtool (Debian: apt-get install prometheus)"
    log "installing promtool (Debian package prometheus)"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/dev/null; then
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/dev/null
    fi
}

# The official Kubernetes Python client (and its schema validator), used by the tests that
# check the Kubernetes API emulator (tests/kubesim) against a second, independent client.
ensure_python_tools() {
    command -v python3 >/dev/null || die "python3 not found: install Python 3"
    if ! python3 -c 'import kubernetes, kubernetes_validate' 2>/dev/null; then
        log "installing the Python packages kubernetes and kubernetes-validate"
        python3 -m pip install --quiet kubernetes kubernetes-validate \
            || die "could not install the Python packages kubernetes and kubernetes-validate"
    fi
    # Checks deploy/openapi.json against the OpenAPI 3.1 schema (tests/integration/api.rs).
    if ! python3 -c 'import openapi_spec_validator' 2>/dev/null; then
        log "installing the Python package openapi-spec-validator"
        python3 -m pip install --quiet openapi-spec-validator \
            || die "could not install the Python package openapi-spec-validator"
    fi
}

# kubectl, which the tests of the Kubernetes API emulator drive (written against kubectl 1.32; the
# older Debian kubernetes-client is only a fallback).
ensure_kubectl() {
    command -v kubectl >/dev/null && return 0
    command -v apt-get >/dev/null || die "kubectl not found: install kubectl (1.32)"
    log "installing kubectl"
    local pkg=kubectl
    apt-cache show kubectl >/dev/null 2>&1 || pkg=kubernetes-client
    apt-get install -y --no-install-recommends "$pkg" || die "could not install $pkg"
}

# Everything a run of the service or of the tests needs on this host.
prepare_host() {
    ensure_rust
    ensure_services
    ensure_sandbox
    ensure_python_tools
    ensure_kubectl
}

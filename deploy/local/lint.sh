#!/usr/bin/env bash
# Static checks, run by CI before the tests: formatting, clippy with warnings as errors, and the
# compile-checked SQL's offline data (`.sqlx/`) against a freshly migrated database, so a query
# that no longer matches the schema, or a query changed without `cargo sqlx prepare`, fails.
set -euo pipefail
cd "$(dirname "$0")/../.."
source deploy/local/common.sh

ensure_rust
ensure_sqlx_cli

log "cargo fmt --check"
cargo fmt --all --check

log "cargo clippy (warnings are errors)"
SQLX_OFFLINE=true cargo clippy --locked --workspace --all-targets -- -D warnings

# Its own database, removed afterwards, never one of the tests' databases.
db="agenttask_sqlx_check_$$"
url="postgres://postgres@127.0.0.1:5432/$db"
trap 'psql -h 127.0.0.1 -U postgres -qc "drop database if exists \"$db\" with (force)" postgres >/dev/null 2>&1 || true' EXIT
log "cargo sqlx prepare --check against a migrated database"
psql -h 127.0.0.1 -U postgres -qc "create database \"$db\"" postgres
sqlx migrate run --source migrations --database-url "$url"
DATABASE_URL="$url" cargo sqlx prepare --workspace --check

#!/usr/bin/env bash
# A small, real evaluation: submit model-written solutions (with their unit tests) as one batch,
# wait for it, and score it with one SQL query. See the README's "Evaluating model-written code".
#
#   examples/eval/run.sh TENANT [BATCH]
#
# Uses agentctl's settings (AGENTCTL_SERVER, AGENTCTL_TOKEN, AGENTCTL_AMQP_URL or its config
# file) and reads results with psql from EVAL_DATABASE_URL (the service's database, or a
# tenant's read-only role from `agentctl tenant sql-role TENANT`). EVAL_OUTPUT=csv prints the
# scores as CSV. Running it again with the same BATCH resubmits nothing: it only waits and scores.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
tenant=${1:?usage: run.sh TENANT [BATCH]}
batch=${2:-eval-$(date -u +%Y%m%d-%H%M%S)}
agentctl=${AGENTCTL:-agentctl}
database=${EVAL_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/agenttask}
solutions="$here/solutions.jsonl"

"$agentctl" batch submit "$solutions" --tenant "$tenant" --batch "$batch" --yes

# `wait` exits 1 when some task did not succeed: a solution that crashes or hangs is a result
# here (it scores 0), not a reason to stop. Anything else (timeout, no service) is.
status=0
"$agentctl" wait --tenant "$tenant" --batch "$batch" --expect "$(grep -c . "$solutions")" --timeout 600 || status=$?
if [ "$status" -gt 1 ]; then
  exit "$status"
fi

format=(--pset=footer=off)
if [ "${EVAL_OUTPUT:-}" = csv ]; then
  format=(--csv)
fi
psql "$database" --no-psqlrc --quiet -v ON_ERROR_STOP=1 -v tenant="$tenant" -v batch="$batch" \
  "${format[@]}" -f "$here/score.sql"

#!/usr/bin/env bash
# srcflow worker entrypoint.
#
#   (no arguments) or only options  -> wait until $PREFECT_API_URL/health answers, then exec
#                                      `prefect worker start --pool $SRCFLOW_POOL --type process`
#                                      (the options are passed on, e.g. `--limit 2`)
#   any other command               -> exec it as is, no waiting (e.g. `srcflow status ...`,
#                                      `python -c 'import torch; print(torch.cuda.is_available())'`)
#
# Environment:
#   PREFECT_API_URL        required for the worker, e.g. http://prefect-server:4200/api
#   SRCFLOW_POOL           work pool to poll (default srcflow; created if missing)
#   SRCFLOW_WORKER_NAME    worker name (default srcflow-<hostname>)
#   SRCFLOW_WORKER_LIMIT   max concurrent flow runs (default 1: one run per GPU worker)
#   SRCFLOW_WAIT_TRIES     /health attempts before giving up (default 60)
#   SRCFLOW_WAIT_SECONDS   pause between attempts (default 2)
set -euo pipefail

if [[ $# -gt 0 && "$1" != -* ]]; then
    exec "$@"
fi

: "${PREFECT_API_URL:?PREFECT_API_URL must be set, e.g. http://prefect-server:4200/api}"
pool="${SRCFLOW_POOL:-srcflow}"
name="${SRCFLOW_WORKER_NAME:-srcflow-${HOSTNAME:-worker}}"
limit="${SRCFLOW_WORKER_LIMIT:-1}"
tries="${SRCFLOW_WAIT_TRIES:-60}"
pause="${SRCFLOW_WAIT_SECONDS:-2}"
health="${PREFECT_API_URL%/}/health"

api_healthy() {
    python - "$health" <<'PY'
import sys
import urllib.request

try:
    with urllib.request.urlopen(sys.argv[1], timeout=5) as response:
        sys.exit(0 if response.status == 200 else 1)
except Exception:
    sys.exit(1)
PY
}

attempt=1
until api_healthy; do
    if (( attempt >= tries )); then
        echo "srcflow-worker: ${health} did not answer after ${tries} attempts; giving up" >&2
        exit 1
    fi
    echo "srcflow-worker: waiting for ${health} (${attempt}/${tries})" >&2
    attempt=$((attempt + 1))
    sleep "${pause}"
done
echo "srcflow-worker: ${health} is up; starting worker '${name}' on pool '${pool}'" >&2

exec prefect worker start --pool "${pool}" --type process --name "${name}" --limit "${limit}" \
    --with-healthcheck "$@"

#!/usr/bin/env bash
# `make up|down|trigger|status`: the local cloud + Airflow 3 (api-server, scheduler, dag-processor,
# triggerer) as processes, no Docker. The work is in plugins/dual_deploy/local_stack.py (shared with
# the tests); this sets the environment (scripts/local_env.sh) and, for `up`, the dataset.
#   scripts/stack.sh up [DATA_FOLDER]     (UNPAUSE=1 unpauses both DAGs; API_PORT, GCS_PORT, LOG_PORT, TRIGGER_LOG_PORT)
#   scripts/stack.sh trigger [CONF_JSON]  (DAG=dual_deployment)
#   scripts/stack.sh down | status
set -euo pipefail
source "$(dirname "$0")/local_env.sh"
cd "$ROOT"
cmd="${1:?usage: $0 up|down|trigger|status}"
shift

case "$cmd" in
  up)
    DATA="${1:-}"
    if [ -z "$DATA" ]; then
      DATA="$ROOT/data/flowers"
      if [ ! -d "$DATA" ]; then
        echo "==> generating the sample dataset in $DATA"
        python -m dualml.sample_data "$DATA" --per-class 60
      fi
    fi
    DATA="$(cd "$DATA" && pwd)"
    NAME="$(basename "$DATA" | tr '[:upper:]' '[:lower:]' | tr -c 'a-z0-9_\n-' '-')"
    BUCKET=$(python -c 'from dual_deploy.config import load_config; print(load_config().local.bucket)')
    exec python -m dual_deploy.local_stack up --data "$DATA" --data-uri "gs://$BUCKET/datasets/$NAME" \
      $( [ "${UNPAUSE:-0}" != 0 ] && echo --unpause ) ;;
  trigger)
    exec python -m dual_deploy.local_stack trigger "${DAG:-dual_deployment}" --conf "${1:-"{}"}" ;;
  down|status)
    exec python -m dual_deploy.local_stack "$cmd" ;;
  *)
    echo "unknown command $cmd: up|down|trigger|status" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# `make run`: sample data -> GCS emulator + local Vertex AI server -> Airflow DB -> dual_deployment
# (airflow dags test) -> summary. One run at a time per state folder; `make stop` ends all of it.
set -euo pipefail
source "$(dirname "$0")/local_env.sh"
source "$(dirname "$0")/data_helpers.sh"
cd "$ROOT"
DATA="${1:-}"
START=$(date +%s)
mkdir -p "$STATE_DIR/pids" "$STATE_DIR/logs"
exec 9>"$STATE_DIR/make-run.lock"
if ! flock -n 9; then
  echo "Another make run is using $STATE_DIR (pid $(cat "$STATE_DIR/pids/make-run.pid" 2>/dev/null || echo '?')):" \
       "wait for it to finish, or end it with: make stop" >&2
  exit 1
fi

if [ -z "$DATA" ]; then
  DATA="$ROOT/data/flowers"
  if [ ! -d "$DATA" ]; then
    echo "==> generating the sample dataset in $DATA"
    python -m dualml.sample_data "$DATA" --per-class 60
  fi
fi
DATA="$(cd "$DATA" && pwd)"
NAME="$(dataset_name "$DATA")"
BUCKET=$(python -c 'from dual_deploy.config import load_config; print(load_config().local.bucket)')
DATA_URI="gs://$BUCKET/datasets/$NAME"

# The Airflow DB is migrated while the local cloud starts and the dataset uploads (independent).
mkdir -p "$AIRFLOW_HOME"
airflow db migrate > "$STATE_DIR/logs/db-migrate.log" 2>&1 &
MIGRATE_PID=$!

echo "==> GCS emulator on $STORAGE_EMULATOR_HOST"
python -m dual_deploy.local_platform emulator-start --port "$GCS_PORT" --state-dir "$STATE_DIR"
echo "==> local Vertex AI server on $VERTEX_AI_EMULATOR_HOST (REST on $FIREBASE_REMOTE_CONFIG_EMULATOR_HOST)"
python -m dual_deploy.local_platform localcloud-start --port "$VERTEX_PORT" --state-dir "$STATE_DIR"
python -m dual_deploy.local_platform ensure-buckets
echo "==> uploading $DATA to $DATA_URI"
python -m dual_deploy.local_platform upload-dataset "$DATA" "$DATA_URI"

echo "==> airflow db migrate (AIRFLOW_HOME=$AIRFLOW_HOME)"
wait "$MIGRATE_PID" || { tail -30 "$STATE_DIR/logs/db-migrate.log"; exit 1; }

echo "==> running DAG dual_deployment (log: $STATE_DIR/logs/dags-test.log)"
rm -f "$STATE_DIR/run_summary.json"
# Progress: one line per finished task with its duration (read from Airflow's DB, not the log).
python -m dual_deploy.progress db "$AIRFLOW_HOME/airflow.db" --dag dual_deployment &
PROGRESS_PID=$!
set +e
# Its own session, so `make stop` can end the run and everything it started (pid file below).
# scripts/dags_test.sh: LocalExecutor + Execution API + triggerer, so independent tasks run at once.
setsid bash -c 'bash scripts/dags_test.sh dual_deployment "$1" 2>&1 | tee "$2" \
  | grep --line-buffered -E "Custom job was created|Status of the custom job|milli node hours|View Training|exported .* as |deferr|test accuracy|TFLite|smoke|traffic|endpoint|published|Remote Config|ERROR|Error:"' \
  _ "{\"data_uri\": \"$DATA_URI\"}" "$STATE_DIR/logs/dags-test.log" &
RUN_PID=$!
echo "{\"pid\": $RUN_PID}" > "$STATE_DIR/pids/make-run.pid"
wait "$RUN_PID"
rm -f "$STATE_DIR/pids/make-run.pid"
kill -TERM "$PROGRESS_PID" 2>/dev/null; wait "$PROGRESS_PID" 2>/dev/null
set -e
echo
if [ ! -f "$STATE_DIR/run_summary.json" ]; then
  echo "The run did not write a summary; see $STATE_DIR/logs/dags-test.log" >&2
  exit 1
fi
EXAMPLE=$(example_image "$DATA")
python -m dual_deploy.local_platform show-summary "$STATE_DIR/run_summary.json" --example-image "$EXAMPLE"
echo "make run took $(( $(date +%s) - START )) s"
python -c 'import json,sys; sys.exit(0 if json.load(open(sys.argv[1]))["status"] == "success" else 1)' "$STATE_DIR/run_summary.json"

#!/usr/bin/env bash
# `airflow dags test DAG --use-executor` with the parts Composer runs tasks with: LocalExecutor workers
# (each task in its own supervised process), an Execution API server they report to, and a triggerer
# that runs the deferred waits. Without them `dags test` runs one task at a time and every trigger
# inline, so the two training jobs (and the mobile delivery) could never overlap.
#   scripts/dags_test.sh DAG_ID [CONF_JSON]
# Uses the caller's environment (scripts/local_env.sh, or a test's): AIRFLOW_HOME must be migrated.
# The API server and the triggerer live exactly as long as the run; their logs go to
# $DAGS_TEST_LOG_DIR (default $STATE_DIR/logs). Exit status: that of `airflow dags test`, or 3 when
# one of the two exits first (a deferred task would otherwise wait for ever).
set -euo pipefail
DAG_ID="${1:?usage: $0 DAG_ID [CONF_JSON]}"
CONF="${2:-}"
[ -n "$CONF" ] || CONF="{}"
LOG_DIR="${DAGS_TEST_LOG_DIR:-${STATE_DIR:?set STATE_DIR or DAGS_TEST_LOG_DIR}/logs}"
mkdir -p "$LOG_DIR"
DIED="$LOG_DIR/.dags-test-$$-part-died"  # the watchdog's verdict (a subshell cannot set our variables)
rm -f "$DIED"

# A fresh port and JWT secret per run: two runs (make run and a test) never talk to each other's API.
PORT=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export AIRFLOW__CORE__EXECUTOR=LocalExecutor
export AIRFLOW__CORE__PARALLELISM="${AIRFLOW__CORE__PARALLELISM:-4}"
export AIRFLOW__CORE__EXECUTION_API_SERVER_URL="http://127.0.0.1:$PORT/execution/"
AIRFLOW__API_AUTH__JWT_SECRET=$(python -c 'import secrets; print(secrets.token_hex(32))')
export AIRFLOW__API_AUTH__JWT_SECRET

# Only the Execution API (no UI): tasks report their state and XComs through it.
airflow api-server --apps execution --workers 1 --host 127.0.0.1 --port "$PORT" \
  > "$LOG_DIR/execution-api.log" 2>&1 &
API_PID=$!
# Its first request, whatever it is, takes ~5 s of one-time set-up (measured: /execution/health alike):
# made here while the DAG parses, not by the first task (its client would time out at 5 s and retry).
python - "http://127.0.0.1:$PORT/execution/health" <<'PY' &
import sys, time, urllib.request
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    try:
        urllib.request.urlopen(sys.argv[1], timeout=60).read()
        break
    except OSError:
        time.sleep(0.3)
PY
WARM_PID=$!
airflow triggerer --skip-serve-logs > "$LOG_DIR/triggerer.log" 2>&1 &
TRIGGERER_PID=$!

airflow dags test "$DAG_ID" --use-executor --conf "$CONF" &
RUN_PID=$!

# Watchdog: a run whose API server or triggerer died would hang (a deferred task is never resumed).
(
  while kill -0 "$RUN_PID" 2>/dev/null; do
    for part in "execution API server:$API_PID:execution-api" "triggerer:$TRIGGERER_PID:triggerer"; do
      IFS=: read -r what pid log <<< "$part"
      if ! kill -0 "$pid" 2>/dev/null; then
        echo "ERROR: the $what (pid $pid) exited during the run; its log ($LOG_DIR/$log.log) ends:" >&2
        tail -20 "$LOG_DIR/$log.log" >&2
        touch "$DIED"
        kill -TERM "$RUN_PID" 2>/dev/null
        exit 0
      fi
    done
    sleep 2
  done
) &
WATCH_PID=$!

stop_parts() {
  kill -TERM "$RUN_PID" "$WATCH_PID" "$WARM_PID" 2>/dev/null || true
  kill -TERM "$API_PID" "$TRIGGERER_PID" 2>/dev/null || true
  wait "$API_PID" "$TRIGGERER_PID" 2>/dev/null || true
}
trap stop_parts EXIT
set +e
wait "$RUN_PID"
RC=$?
set -e
if [ -f "$DIED" ]; then
  rm -f "$DIED"
  RC=3
fi
exit "$RC"

#!/usr/bin/env bash
# Stop everything `make run` started, by pid file: an in-progress run (airflow dags test) first, then the
# local Vertex AI server (it cancels running training jobs and stops the endpoints' serving processes;
# deployed models are served again when it next starts), then the GCS emulator.
source "$(dirname "$0")/local_env.sh"
shopt -s nullglob
stopped=0
pidfiles=()
for name in make-run localcloud gcs-emulator; do [ -f "$STATE_DIR/pids/$name.pid" ] && pidfiles+=("$STATE_DIR/pids/$name.pid"); done
for f in "$STATE_DIR"/pids/*.pid; do case " ${pidfiles[*]} " in *" $f "*) ;; *) pidfiles+=("$f");; esac; done
for f in "${pidfiles[@]}"; do
  pid=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["pid"])' "$f" 2>/dev/null || cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -"$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -"$pid" 2>/dev/null || true
    echo "stopped $(basename "$f" .pid) (pid $pid)"; stopped=$((stopped+1))
  fi
  rm -f "$f"
done
[ "$stopped" -gt 0 ] || echo "nothing running"

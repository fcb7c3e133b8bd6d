#!/usr/bin/env bash
# Stop every process `make run` started (GCS emulator, endpoint servers), by pid file.
source "$(dirname "$0")/local_env.sh"
shopt -s nullglob
stopped=0
for f in "$STATE_DIR"/pids/*.pid; do
  pid=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["pid"])' "$f" 2>/dev/null || cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -"$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -"$pid" 2>/dev/null || true
    echo "stopped $(basename "$f" .pid) (pid $pid)"; stopped=$((stopped+1))
  fi
  rm -f "$f"
done
[ "$stopped" -gt 0 ] || echo "nothing running"

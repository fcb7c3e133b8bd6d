#!/usr/bin/env bash
# `make serve`: bring the local cloud back after `make stop` (or a reboot): the GCS emulator and the local
# Vertex AI server, which serves every model still deployed to an endpoint again (same URLs).
set -euo pipefail
source "$(dirname "$0")/local_env.sh"
cd "$ROOT"
mkdir -p "$STATE_DIR/pids" "$STATE_DIR/logs"
python -m dual_deploy.local_platform emulator-start --port "$GCS_PORT" --state-dir "$STATE_DIR"
python -m dual_deploy.local_platform localcloud-start --port "$VERTEX_PORT" --state-dir "$STATE_DIR"
echo "==> waiting for the deployed models' replicas (their model servers load first)"
for _ in $(seq 120); do
  out=$(python -m dual_deploy.local_platform serving)
  if ! grep -q "(0/" <<<"$out"; then break; fi
  sleep 2
done
echo "$out"
echo "Predict: POST http://$FIREBASE_REMOTE_CONFIG_EMULATOR_HOST/v1/<endpoint name>:predict (make run prints an example); stop with: make stop"

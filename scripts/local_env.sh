# Environment for the local platform; sourced by run_local.sh, stop_local.sh and tests.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export DUAL_DEPLOY_ROOT="$ROOT"
export PATH="$ROOT/.venv/bin:$PATH"
export STATE_DIR="${STATE_DIR:-$ROOT/.state}"
export GCS_PORT="${GCS_PORT:-9023}"
export STORAGE_EMULATOR_HOST="http://127.0.0.1:$GCS_PORT"
# The local Vertex AI server (emulators/localcloud): gRPC on VERTEX_PORT, REST (predict, Remote Config) on +1.
export VERTEX_PORT="${VERTEX_PORT:-9010}"
export VERTEX_AI_EMULATOR_HOST="127.0.0.1:$VERTEX_PORT"
export FIREBASE_REMOTE_CONFIG_EMULATOR_HOST="127.0.0.1:$((VERTEX_PORT + 1))"
export GOOGLE_CLOUD_PROJECT="local-project"
export DUAL_DEPLOY_PLATFORM="${DUAL_DEPLOY_PLATFORM:-local}"
export AIRFLOW_HOME="$STATE_DIR/airflow"
export AIRFLOW__CORE__DAGS_FOLDER="$ROOT/dags"
export AIRFLOW__CORE__PLUGINS_FOLDER="$ROOT/plugins"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
# The Vertex AI operators import google.cloud.aiplatform (10-20 s on 2 busy cores): above the 30 s default.
export AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT="${AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT:-120}"
export AIRFLOW__CORE__UNIT_TEST_MODE=False
export AIRFLOW__LOGGING__LOGGING_LEVEL="${AIRFLOW_LOG_LEVEL:-INFO}"
export AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT='{"conn_type": "google_cloud_platform", "extra": {"is_anonymous": true, "project": "local-project"}}'
export AIRFLOW_CONN_FIREBASE_DEFAULT="$AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT"
export PYTHONPATH="$ROOT/include:$ROOT/plugins:$ROOT/emulators${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL=2

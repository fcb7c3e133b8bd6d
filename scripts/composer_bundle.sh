#!/usr/bin/env bash
# What Cloud Composer's dags/ and plugins/ folders get (README "Running on GCP", step 4).
#   scripts/composer_bundle.sh OUT                     assemble OUT/dags and OUT/plugins
#   scripts/composer_bundle.sh OUT ENV LOCATION        ... then import them into the environment with gcloud
# OUT/plugins holds dual_deploy/ and dualml/ (both importable: Composer puts plugins/ on sys.path) and
# .airflowignore, which keeps Airflow's plugin loader from importing them before every task.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:?usage: $0 OUT [COMPOSER_ENV COMPOSER_LOCATION]}"
ENV_NAME="${2:-}"
LOCATION="${3:-}"

rm -rf "$OUT/dags" "$OUT/plugins"
mkdir -p "$OUT/dags" "$OUT/plugins"
cp -R "$ROOT/dags/." "$OUT/dags/"
cp "$ROOT/plugins/.airflowignore" "$OUT/plugins/.airflowignore"
cp -R "$ROOT/plugins/dual_deploy" "$OUT/plugins/dual_deploy"
cp -R "$ROOT/include/dualml" "$OUT/plugins/dualml"
find "$OUT" \( -name __pycache__ -o -name '*.pyc' \) -prune -exec rm -rf {} +
echo "Composer bundle in $OUT: dags/ -> the environment's dags/ folder, plugins/ -> its plugins/ folder"

[ -n "$ENV_NAME" ] || exit 0
[ -n "$LOCATION" ] || { echo "give the environment's location too (COMPOSER_LOCATION)" >&2; exit 2; }
# One import per top-level entry, no wildcards (gcloud no longer expands them): a folder source lands as
# plugins/<folder>/, a file as plugins/<file>. .airflowignore goes first, so a worker that syncs mid-upload
# never loads the packages as plugins; plugins before dags, which import them.
composer_import() {  # composer_import FOLDER(dags|plugins) SOURCE
  echo "==> $1/$(basename "$2")"
  gcloud composer environments storage "$1" import --environment "$ENV_NAME" --location "$LOCATION" --source "$2"
}
composer_import plugins "$OUT/plugins/.airflowignore"
for entry in "$OUT/plugins"/*; do composer_import plugins "$entry"; done
for entry in "$OUT/dags"/*; do composer_import dags "$entry"; done
echo "Imported into Composer environment $ENV_NAME ($LOCATION). Files deleted here stay in the bucket:"
echo "remove them with 'gcloud composer environments storage {dags,plugins} delete'."

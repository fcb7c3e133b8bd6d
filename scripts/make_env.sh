#!/usr/bin/env bash
# `make env`: write .env for `docker compose up` from .env.example, generating every secret that is
# empty (or still a change-me placeholder). Values already set are never changed, so re-running is
# safe and only fills what is missing. Usage: scripts/make_env.sh [path/to/.env]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ENV_FILE="${1:-$ROOT/.env}"
EXAMPLE="$ROOT/.env.example"
SECRETS=(POSTGRES_PASSWORD AIRFLOW__CORE__FERNET_KEY AIRFLOW__API_AUTH__JWT_SECRET)

random_bytes_b64url() {  # $1 bytes of randomness, URL-safe base64 (with padding)
  if command -v python3 >/dev/null 2>&1; then
    python3 -c "import base64, os, sys; print(base64.urlsafe_b64encode(os.urandom(int(sys.argv[1]))).decode())" "$1"
  else
    openssl rand -base64 "$1" | tr '+/' '-_'
  fi
}

generate() {
  case "$1" in
    AIRFLOW__CORE__FERNET_KEY) random_bytes_b64url 32 ;;            # a Fernet key is 32 bytes, URL-safe base64
    *) random_bytes_b64url 33 | tr -d '=' ;;                        # 44 characters, safe inside a database URL
  esac
}

umask 077
created=""
if [ ! -f "$ENV_FILE" ]; then
  cp "$EXAMPLE" "$ENV_FILE"
  created=1
fi
chmod 600 "$ENV_FILE"

generated=()
for key in "${SECRETS[@]}"; do
  current="$(grep -E "^${key}=" "$ENV_FILE" | tail -1 | cut -d= -f2- || true)"
  current="${current%\"}"; current="${current#\"}"
  if [ -n "$current" ] && [[ "$current" != change-me* ]]; then
    continue
  fi
  value="$(generate "$key")"
  tmp="$(mktemp "${ENV_FILE}.XXXXXX")"
  if grep -qE "^${key}=" "$ENV_FILE"; then
    awk -v k="$key" -v v="$value" 'BEGIN { FS = OFS = "=" } $1 == k { print k "=" v; next } { print }' "$ENV_FILE" > "$tmp"
  else
    { cat "$ENV_FILE"; printf '%s=%s\n' "$key" "$value"; } > "$tmp"
  fi
  mv "$tmp" "$ENV_FILE"
  generated+=("$key")
done

if [ -n "$created" ]; then
  echo "wrote $ENV_FILE from .env.example with generated ${generated[*]}"
elif [ ${#generated[@]} -gt 0 ]; then
  echo "$ENV_FILE: generated ${generated[*]} (other values kept)"
else
  echo "$ENV_FILE: every secret is already set (nothing changed)"
fi

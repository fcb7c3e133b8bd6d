# dual-deploy: `make run` (local end-to-end run) and `make test`.
SHELL := /bin/bash
PY_BOOT ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA ?=

.PHONY: help setup lock tools test test-fast test-ui lint run stop serve up down trigger status bench clean
.PHONY: composer-bundle composer-upload
.PHONY: prune env

help:
	@echo "make setup   - create .venv with exactly the versions in requirements.lock (uv, ~1-2 min)"
	@echo "make lock    - re-compile requirements.lock after editing requirements*.txt (LOCK_ARGS=--upgrade)"
	@echo "make run     - sample data -> GCS emulator + local Vertex AI server -> Airflow -> dual_deployment DAG (DATA=/path/to/folder)"
	@echo "               CONFIG=dags/config/dual_deploy_automl.yaml: the all-AutoML setup"
	@echo "make stop    - stop everything make run started (an in-progress run, the local Vertex AI server, the GCS emulator)"
	@echo "make serve   - bring the local cloud back: the deployed models serve again (after make stop)"
	@echo "make prune   - delete old run artifacts (KEEP=5 newest kept, and whatever serves or is published; DRY_RUN=1)"
	@echo "make env     - .env for docker compose with generated secrets (keeps values already set)"
	@echo "make up      - Airflow 3 UI on http://localhost:8080 + local cloud as processes (UNPAUSE=1, API_PORT=...)"
	@echo "make trigger - trigger dual_deployment on the make-up stack and follow it (CONF='{\"targets\": [\"mobile\"]}')"
	@echo "make down    - stop everything make up started"
	@echo "make tools   - system tools the tests need (docker-compose; chromium for the browser test)"
	@echo "make test    - ruff + the whole test suite"
	@echo "make bench   - benchmarks -> bench/results.json + README performance table (BENCH_ARGS=--quick)"
	@echo "make composer-bundle - build/composer/{dags,plugins}: what Cloud Composer's folders get"
	@echo "make composer-upload COMPOSER_ENV=env COMPOSER_LOCATION=region - bundle, then gcloud import"

# The venv is exactly requirements.lock (uv pip sync: adds, upgrades and removes to match); the lock
# must match requirements*.txt, else setup stops and says to run `make lock`.
$(STAMP): requirements.lock requirements.txt requirements-dev.txt
	@$(PY_BOOT) scripts/requirements_lock.py check
	@command -v uv >/dev/null 2>&1 || $(PY_BOOT) -m pip install --quiet --disable-pip-version-check 'uv>=0.5,<1'
	@if command -v uv >/dev/null 2>&1; then UV=uv; else UV="$(PY_BOOT) -m uv"; fi; \
	  $$UV venv --allow-existing -p 3.11 $(VENV) && VIRTUAL_ENV=$(VENV) $$UV pip sync --require-hashes requirements.lock
	@touch $(STAMP)

setup: $(STAMP)

# Re-resolve requirements.lock after editing requirements*.txt (keeps the other pins;
# LOCK_ARGS=--upgrade moves everything to the newest allowed versions). Commit the lock.
lock:
	@$(PY_BOOT) scripts/requirements_lock.py compile $(LOCK_ARGS)

lint: setup
	$(VENV)/bin/ruff check dags plugins include tests scripts bench
	$(VENV)/bin/ruff check --select AIR3 dags plugins

# Debian's docker-compose validates docker-compose.yaml offline (no Docker engine needed).
tools:
	@command -v docker-compose >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "==> installing docker-compose (apt-get)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null; \
	  else echo "docker-compose is missing: run 'sudo apt-get install docker-compose'" >&2; fi; }
	@# Debian's Chromium for tests/test_ui_browser.py (Playwright drives it; it never downloads a browser).
	@test -x /usr/bin/chromium || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "==> installing chromium (apt-get)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium is missing (the browser test needs it): run 'sudo apt-get install chromium'" >&2; fi; }

test: setup tools lint
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# The Airflow UI in Chromium against a make-up stack of its own (free ports; part of `make test` too).
test-ui: setup tools
	$(PY) -m pytest -q tests/test_ui_browser.py

# CONFIG=dags/config/dual_deploy_automl.yaml: another config file (DUAL_DEPLOY_CONFIG), e.g. the all-AutoML one.
run: setup
	@$(if $(CONFIG),DUAL_DEPLOY_CONFIG="$(abspath $(CONFIG))") bash scripts/run_local.sh "$(DATA)"

stop:
	@bash scripts/stop_local.sh

# The local cloud without a run: the GCS emulator + the local Vertex AI server, which serves every
# deployed model again (after make stop or a reboot).
serve: setup
	@bash scripts/serve_local.sh

# Retention of old run folders under the artifacts root (plugins/dual_deploy/retention.py).
KEEP ?= 5
prune: setup
	@source scripts/local_env.sh && \
	  python -m dual_deploy.local_platform emulator-start --port "$$GCS_PORT" --state-dir "$$STATE_DIR" >/dev/null && \
	  python -m dual_deploy.retention --keep $(KEEP) $(if $(DRY_RUN),--dry-run)

env:
	@bash scripts/make_env.sh

# The local Airflow stack (api-server, scheduler, dag-processor, triggerer + local cloud) as processes;
# state in .state/ (AIRFLOW_HOME .state/airflow-up). Ports: API_PORT (8080), GCS_PORT (9023),
# VERTEX_PORT (9010, REST on +1), LOG_PORT (8793), TRIGGER_LOG_PORT (8794). UNPAUSE=1 unpauses both DAGs.
up: setup
	@API_PORT=$(API_PORT) LOG_PORT=$(LOG_PORT) TRIGGER_LOG_PORT=$(TRIGGER_LOG_PORT) $(if $(GCS_PORT),GCS_PORT=$(GCS_PORT)) \
	  $(if $(VERTEX_PORT),VERTEX_PORT=$(VERTEX_PORT)) UNPAUSE=$(UNPAUSE) bash scripts/stack.sh up "$(DATA)"

down:
	@bash scripts/stack.sh down

status:
	@bash scripts/stack.sh status

trigger:
	@DAG=$(or $(DAG),dual_deployment) bash scripts/stack.sh trigger '$(or $(CONF),{})'

# Benchmarks -> bench/results.json + the README performance table (~15 min on 2 cores;
# BENCH_ARGS="--quick --skip-e2e" for a shorter run).
bench: setup
	$(PY) bench/run_all.py $(BENCH_ARGS)

# Cloud Composer (README "Running on GCP", step 4): the dags/ and plugins/ folders, then gcloud import.
COMPOSER_BUNDLE ?= build/composer
composer-bundle:
	@bash scripts/composer_bundle.sh "$(COMPOSER_BUNDLE)"

composer-upload:
	@test -n "$(COMPOSER_ENV)" -a -n "$(COMPOSER_LOCATION)" || { echo "usage: make composer-upload COMPOSER_ENV=<environment> COMPOSER_LOCATION=<region>" >&2; exit 2; }
	@bash scripts/composer_bundle.sh "$(COMPOSER_BUNDLE)" "$(COMPOSER_ENV)" "$(COMPOSER_LOCATION)"

clean: down
	rm -rf .state data

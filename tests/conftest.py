"""Shared pytest fixtures. Each fixture below is self-contained; add new ones in their own section."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

# --- gcs_emulator -------------------------------------------------------------------------------
# A real GCS JSON API server (gcp-storage-emulator, in memory) for the whole test session.
# Yields its endpoint URL ("http://127.0.0.1:<port>") with STORAGE_EMULATOR_HOST pointing at it;
# the previous value is restored afterwards. google-cloud-storage (and so dualml.storage) honour
# that variable. Create buckets with
#     storage.Client(project="local-project", credentials=AnonymousCredentials()).create_bucket(name)
# and use unique bucket names per test: the emulator is shared by the session.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _emulator_executable() -> str:
    candidate = Path(sys.executable).parent / "gcp-storage-emulator"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("gcp-storage-emulator")
    if not found:
        pytest.skip("gcp-storage-emulator is not installed (pip install gcp-storage-emulator)")
    return found


def _reset_dualml_storage_client() -> None:
    # dualml.storage caches its client; a client made before the emulator variable changed
    # would keep talking to the old endpoint.
    try:
        from dualml import storage
    except ImportError:
        return
    cache_clear = getattr(getattr(storage, "_client", None), "cache_clear", None)
    if cache_clear:
        cache_clear()


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
    port = _free_port()
    log_path = tmp_path_factory.mktemp("gcs_emulator") / "emulator.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [_emulator_executable(), "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory"],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"gcp-storage-emulator exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"gcp-storage-emulator did not listen on {port} in 30 s:\n{log_path.read_text()}"
                    )
                time.sleep(0.2)
        previous = os.environ.get("STORAGE_EMULATOR_HOST")
        os.environ["STORAGE_EMULATOR_HOST"] = url
        _reset_dualml_storage_client()
        try:
            yield url
        finally:
            if previous is None:
                os.environ.pop("STORAGE_EMULATOR_HOST", None)
            else:
                os.environ["STORAGE_EMULATOR_HOST"] = previous
            _reset_dualml_storage_client()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- airflow_home ------------------------------------------------------------------------------
# Importing Airflow writes airflow.cfg (and may open a SQLite DB) under AIRFLOW_HOME. Tests never
# use the developer's ~/airflow or the `make run` state (.state/airflow): the session gets its own
# throw-away AIRFLOW_HOME, set before any test module imports Airflow. Tests that run Airflow
# commands in a subprocess make their own (see tests/test_dag_run_local.py).


def pytest_configure(config):
    import tempfile

    home = tempfile.mkdtemp(prefix="dual-deploy-airflow-home-")
    config._dual_deploy_airflow_home = (home, os.environ.get("AIRFLOW_HOME"))
    os.environ["AIRFLOW_HOME"] = home
    os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")


def pytest_unconfigure(config):
    home, previous = getattr(config, "_dual_deploy_airflow_home", (None, None))
    if home is None:
        return
    if previous is None:
        os.environ.pop("AIRFLOW_HOME", None)
    else:
        os.environ["AIRFLOW_HOME"] = previous
    shutil.rmtree(home, ignore_errors=True)


# --- localcloud ---------------------------------------------------------------------------------
# The local Vertex AI API server (emulators/localcloud) as a subprocess, started once per session, with
# the project's image mapping (emulators/localcloud.yaml) and the session's GCS emulator as the
# storage its containers see. A module that uses ``localcloud`` gets, for that module only,
# VERTEX_AI_EMULATOR_HOST / FIREBASE_REMOTE_CONFIG_EMULATOR_HOST and an anonymous google_cloud_default
# connection, which route the provider's hooks and the aiplatform_v1 clients to it (other modules see
# the real Google endpoints, as on Composer). Yields a localcloud.process.LocalCloudProcess: .state(),
# .add_fault(...), .clear_faults(), .preempt(job_id), .kill9(), .restart(). Tests share the server: use
# unique display names, clear the faults you add.

_ANONYMOUS_GCP_CONN = '{"conn_type": "google_cloud_platform", "extra": {"is_anonymous": true, "project": "local-project"}}'


@pytest.fixture(scope="session")
def localcloud_server(gcs_emulator, tmp_path_factory):
    import yaml

    from localcloud.process import LocalCloudProcess

    root = Path(__file__).resolve().parents[1]
    state = tmp_path_factory.mktemp("localcloud")
    # The project's image mapping plus test images: instant stand-ins for the trainer (tests/fakes/) and
    # the serving container (localcloud/stand_in_model.py: good, wrong labels, slow), for tests of the
    # cloud-facing code that need no TensorFlow.
    cfg = yaml.safe_load((root / "emulators" / "localcloud.yaml").read_text())
    cfg["root"] = str(root)
    stand_in = ["{python}", "{root}/emulators/localcloud/stand_in_model.py"]
    cfg["images"] += [
        {"match": "*/dual-deploy-test/fake-trainer*", "entrypoint": ["{python}", "{root}/tests/fakes/trainer.py"]},
        {"match": "*/dual-deploy-test/fake-serving:*", "entrypoint": stand_in},
        {"match": "*/dual-deploy-test/fake-serving-bad-labels:*", "entrypoint": stand_in,
         "env": {"STAND_IN_LABEL": "not-a-class"}},
        {"match": "*/dual-deploy-test/fake-serving-slow:*", "entrypoint": stand_in,
         "env": {"STAND_IN_PREDICT_DELAY_S": "2"}},
    ]
    (state / "localcloud.yaml").write_text(yaml.safe_dump(cfg))
    server = LocalCloudProcess(state / "server", config=state / "localcloud.yaml", storage_emulator_host=gcs_emulator)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def localcloud(localcloud_server):
    from dual_deploy.emulator_hosts import install

    server = localcloud_server
    saved = {k: os.environ.get(k) for k in (*server.env(), "AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT")}
    os.environ.update(server.env())
    os.environ["AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT"] = _ANONYMOUS_GCP_CONN
    install()  # idempotent; the switch reads the variable whenever a channel is created
    try:
        yield server
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

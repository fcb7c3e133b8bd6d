"""End-to-end test of data-triggered retraining on a real Airflow (slow: trains tiny real models).

What runs, all as processes on this machine, all stopped at the end:

- a GCS API server (gcp-storage-emulator, in memory) on a free port;
- Airflow 3 as it runs in production, one process per component: ``api-server`` (REST API and
  the Execution API on a free port), ``scheduler`` (LocalExecutor), ``dag-processor`` and
  ``triggerer``, on a throw-away AIRFLOW_HOME with a SQLite database (``airflow db migrate`` first);
- the serving process the ``cloud`` deploy task starts (it outlives the task by design).

Airflow runs a snapshot of dags/, plugins/ and include/ taken when the test starts. The config
is ``dags/config/dual_deploy.yaml`` with the local platform shrunk to a tiny, fast run in a fresh
bucket, both schedules off (only this test's triggers run) and the watcher's
sensor poking every few seconds. Data goes in with the google-cloud-storage client, as an
uploader would. Phases:

A. nothing new: the incoming prefix is empty, the watcher's sensor DEFERS (task state
   ``deferred``); a half-finished batch (images, no ``_COMPLETE``) lands, the trigger fires in
   the triggerer, ``find_new_dataset`` skips ("upload in progress"): no ``dual_deployment`` run.
B. new data: ``_COMPLETE`` is written, the watcher creates ``dual_deployment`` run
   ``newdata__<fingerprint>`` with ``data_uri`` = the batch; it runs to success; the run summary
   in the bucket says success and the ledger records the fingerprint as ``success``.
C. the same data again: ``find_new_dataset`` skips ("already success"): still one run.
"""

from __future__ import annotations

import copy
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
WATCHER = "dual_deployment_new_data"
MAIN = "dual_deployment"
CLASSES = ("daisy", "roses", "tulips")
PER_CLASS = 8
BATCH = "batch-0001"
MARKER = "_COMPLETE"
TINY_TRAINING = {"image_size": 32, "batch_size": 8, "epochs": 1, "weights": None, "fine_tune_epochs": 0,
                 "augment": False, "deterministic": True}
# One epoch from scratch scores about chance: the champion gate's absolute minimum would (rightly)
# stop delivery, and this test is about what starts training, not model quality.
TINY_GATE = {"min_accuracy": 0.0, "min_macro_f1": 0.0}
# As in tests/test_dag_run_local.py: DenseNet121's graph costs minutes on 2 cores and the trigger
# path is the same for every architecture; DUAL_DEPLOY_E2E_CLOUD_ARCH=densenet121 runs the configured one.
CLOUD_ARCH = os.environ.get("DUAL_DEPLOY_E2E_CLOUD_ARCH", "mobilenet_v3_small")
ANON_CONN = json.dumps(
    {"conn_type": "google_cloud_platform", "extra": {"is_anonymous": True, "project": "local-project"}}
)
TERMINAL_RUN_STATES = {"success", "failed"}
# Every process this test starts (and their children) carries this variable: the final sweep
# finds and ends anything left, and the test asserts nothing is.
MARKER_VAR = "DUAL_DEPLOY_E2E_MARKER"


# ---------------------------------------------------------------- small helpers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 40) -> str:
    if not path.exists():
        return f"({path} does not exist)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def _wait_for(what: str, check, timeout_s: float, interval_s: float = 2.0, diagnose=None):
    """Poll ``check()`` until it returns something truthy; fail with ``diagnose()`` on timeout."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
            last = e
        else:
            if last:
                return last
        time.sleep(interval_s)
    detail = diagnose() if diagnose else ""
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what} (last: {last!r})\n{detail}")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"  # a zombie has already exited
    except OSError:
        return False


def _own_pids(marker: str, sessions: set[int]) -> list[int]:
    """Live processes this test started: in one of the sessions it created (every component is a
    session leader), or carrying its marker variable (processes that made their own session, such
    as the serving app the deploy task starts). Both are needed: the api-server rewrites its process
    title over its environment, so /proc/<pid>/environ reads empty there."""
    needle = f"{MARKER_VAR}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        pid = int(entry.name)
        try:
            sid = int((entry / "stat").read_text().rsplit(")", 1)[-1].split()[3])
            env = (entry / "environ").read_bytes() if sid not in sessions else b""
        except (OSError, ValueError, IndexError):
            continue
        if (sid in sessions or needle in env.split(b"\0")) and _alive(pid):
            found.append(pid)
    return sorted(found)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


# ---------------------------------------------------------------- the GCS side (as an uploader)


class Bucket:
    def __init__(self, endpoint: str, name: str):
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        self.name = name
        self.client = storage.Client(project="local-project", credentials=AnonymousCredentials(),
                                     client_options={"api_endpoint": endpoint})
        self.bucket = self.client.bucket(name)

    def create(self) -> None:
        self.client.create_bucket(self.name)

    def upload_file(self, name: str, path: Path) -> None:
        self.bucket.blob(name).upload_from_filename(str(path))

    def upload_bytes(self, name: str, data: bytes) -> None:
        self.bucket.blob(name).upload_from_string(data)

    def names(self, prefix: str = "") -> list[str]:
        return sorted(b.name for b in self.client.list_blobs(self.name, prefix=prefix))

    def read_json(self, name: str) -> dict:
        return json.loads(self.bucket.blob(name).download_as_bytes())


# ---------------------------------------------------------------- the Airflow side


class AirflowStack:
    """The emulator and the Airflow components as subprocesses (own process groups, logs in files)."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.marker = uuid.uuid4().hex
        self.home = tmp / "airflow_home"
        self.state_dir = tmp / "state"
        self.logs = tmp / "logs"
        for d in (self.home, self.state_dir, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        self.gcs_port = _free_port()
        self.api_port = _free_port()
        self.endpoint_port = _free_port()
        self.gcs_url = f"http://127.0.0.1:{self.gcs_port}"
        self.api_url = f"http://127.0.0.1:{self.api_port}"
        self.bucket_name = f"dd-trig-{uuid.uuid4().hex[:10]}"
        self.src = self._snapshot(tmp / "src")
        self.config_path = self._write_config(tmp / "dual_deploy.yaml")
        self.procs: dict[str, subprocess.Popen] = {}
        # One value for every component: a per-process JWT secret makes task tokens "invalid".
        self.jwt_secret = secrets.token_hex(32)
        self.log_server_ports = (_free_port(), _free_port())

    # -- configuration

    @staticmethod
    def _snapshot(dest: Path) -> Path:
        """Airflow runs a copy of dags/, plugins/ and include/ taken now: the dag-processor re-parses
        files that change, so an edit to the working tree during the (minutes long) run must not
        swap the DAG under a running dag run."""
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
        for folder in ("dags", "plugins", "include"):
            shutil.copytree(ROOT / folder, dest / folder, ignore=ignore)
        return dest

    def _write_config(self, path: Path) -> Path:
        """The shipped config with the local platform shrunk to a tiny run in this test's bucket."""
        raw = yaml.safe_load((self.src / "dags" / "config" / "dual_deploy.yaml").read_text())
        local = raw.setdefault("platforms", {}).setdefault("local", {}) or {}
        raw["platforms"]["local"] = local
        b = self.bucket_name
        local["schedule"] = None  # no scheduled dual_deployment runs: only the watcher starts training
        local["artifacts_uri"] = f"gs://{b}/runs"
        local["data"] = {"uri": f"gs://{b}/datasets/unused", "min_images_per_class": 5}
        local["triggers"] = {
            "incoming_uri": f"gs://{b}/incoming",
            "ledger_uri": f"gs://{b}/dual-deploy/ledger.json",
            "marker_name": MARKER,
            "watch_schedule": None,  # the test triggers the watcher itself
            "sensor_poke_interval_s": 3,
            "sensor_timeout_s": 180,
        }
        local["local"] = {
            "storage_emulator_host": self.gcs_url,
            "bucket": b,
            "state_dir": str(self.state_dir),
            "endpoint_base_port": self.endpoint_port,
            "startup_timeout_s": 180,
        }
        targets = local.setdefault("targets", {}) or {}
        local["targets"] = targets
        cloud = targets.setdefault("cloud", {})
        cloud["training"] = dict(TINY_TRAINING)
        cloud["architecture"] = CLOUD_ARCH
        cloud["gate"] = dict(TINY_GATE)
        cloud["endpoint"] = {"min_replica_count": 1, "max_replica_count": 1}
        mobile = targets.setdefault("mobile", {})
        mobile["training"] = dict(TINY_TRAINING)
        mobile["gate"] = dict(TINY_GATE)
        # A real gate on a tiny test split (~3 images: one flip is 33 points): float16 keeps the
        # TFLite model's top-1 equal to Keras', which is what the agreement gate checks.
        mobile["tflite"] = {"mode": "float16", "min_agreement": 0.9, "max_accuracy_drop": 0.34,
                            "max_size_mb": 20, "num_calibration_images": 8}
        mobile.setdefault("publish", {})["backend"] = "local"
        path.write_text(yaml.safe_dump(copy.deepcopy(raw), sort_keys=False))
        return path

    def env(self) -> dict[str, str]:
        """scripts/local_env.sh with this test's home, ports and config, plus the Airflow settings
        that make a multi-process Airflow on SQLite quick to react."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("AIRFLOW", "DUAL_DEPLOY", "AIP_", "STORAGE_EMULATOR", "PYTEST"))}
        env.update(
            PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",  # Airflow spawns `airflow` by name
            STORAGE_EMULATOR_HOST=self.gcs_url,
            GOOGLE_CLOUD_PROJECT="local-project",
            DUAL_DEPLOY_PLATFORM="local",
            DUAL_DEPLOY_CONFIG=str(self.config_path),
            DUAL_DEPLOY_STATE_DIR=str(self.state_dir),
            AIRFLOW_HOME=str(self.home),
            AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT=ANON_CONN,
            AIRFLOW__CORE__DAGS_FOLDER=str(self.src / "dags"),
            AIRFLOW__CORE__PLUGINS_FOLDER=str(self.src / "plugins"),
            AIRFLOW__CORE__LOAD_EXAMPLES="False",
            AIRFLOW__CORE__UNIT_TEST_MODE="False",
            AIRFLOW__CORE__EXECUTOR="LocalExecutor",
            AIRFLOW__CORE__PARALLELISM="4",
            AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="False",
            AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"{self.api_url}/execution/",
            AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS="True",
            AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT="300",  # Google/Vertex imports are slow on 2 busy cores
            AIRFLOW__DAG_PROCESSOR__DAG_FILE_PROCESSOR_TIMEOUT="360",
            AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL="900",  # parse once: re-parsing costs CPU
            AIRFLOW__API__PORT=str(self.api_port),
            AIRFLOW__API__WORKERS="1",
            AIRFLOW__API_AUTH__JWT_SECRET=self.jwt_secret,
            AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT=str(self.log_server_ports[0]),
            AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT=str(self.log_server_ports[1]),
            AIRFLOW__LOGGING__LOGGING_LEVEL="INFO",
            AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK="False",
            PYTHONPATH=os.pathsep.join([str(self.src / "include"), str(self.src / "plugins")]),
            TF_CPP_MIN_LOG_LEVEL="2",
            **{MARKER_VAR: self.marker},
        )
        return env

    # -- processes

    def start(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        with open(self.logs / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(cmd, env=env or self.env(), cwd=self.tmp, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs[name] = proc
        return proc

    def start_emulator(self) -> None:
        exe = VENV_BIN / "gcp-storage-emulator"
        self.start("gcs-emulator", [str(exe), "start", "--host", "127.0.0.1", "--port", str(self.gcs_port),
                                    "--in-memory"])

        def listening():
            self._check_alive("gcs-emulator")
            with socket.create_connection(("127.0.0.1", self.gcs_port), timeout=1):
                return True

        _wait_for("the GCS emulator", listening, 60, 0.3, self.diagnose)

    def migrate(self) -> None:
        log = self.logs / "db-migrate.log"
        with open(log, "wb") as out:
            proc = subprocess.run([str(VENV_BIN / "airflow"), "db", "migrate"], env=self.env(), cwd=self.tmp,
                                  stdout=out, stderr=subprocess.STDOUT, timeout=600, start_new_session=True)
        assert proc.returncode == 0, f"airflow db migrate failed:\n{_tail(log)}"

    def start_airflow(self) -> None:
        airflow = str(VENV_BIN / "airflow")
        self.start("api-server", [airflow, "api-server", "--host", "127.0.0.1", "--port", str(self.api_port),
                                  "--workers", "1"])
        self.start("dag-processor", [airflow, "dag-processor"])
        self.start("scheduler", [airflow, "scheduler", "--skip-serve-logs"])
        self.start("triggerer", [airflow, "triggerer", "--skip-serve-logs"])

    def _check_alive(self, *names: str) -> None:
        for name in names or tuple(self.procs):
            proc = self.procs[name]
            if proc.poll() is not None:
                pytest.fail(f"{name} exited with {proc.returncode}:\n{_tail(self.logs / f'{name}.log', 60)}")

    def stop(self) -> list[int]:
        """Stop everything: components (SIGTERM to the group, then SIGKILL), the serving processes
        the deploy task started (pid files), then anything else carrying the marker. Returns the
        pids still alive afterwards (should be none)."""
        for name in reversed(list(self.procs)):
            if self.procs[name].poll() is None:
                _signal_group(self.procs[name].pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in self.procs.values():
            _signal_group(proc.pid, signal.SIGKILL)  # the rest of each group (task workers, children)
            if proc.poll() is None:
                proc.wait(timeout=10)
        pid_dir = self.state_dir / "pids"
        for pid_file in sorted(pid_dir.glob("*.pid")) if pid_dir.exists() else ():
            try:
                pid = int(json.loads(pid_file.read_text())["pid"])
            except (ValueError, KeyError, TypeError):
                continue
            _signal_group(pid, signal.SIGTERM)
            for _ in range(50):
                if not _alive(pid):
                    break
                time.sleep(0.1)
            _signal_group(pid, signal.SIGKILL)
        sessions = {proc.pid for proc in self.procs.values()}
        for pid in _own_pids(self.marker, sessions):  # stragglers that left their group
            _signal_group(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _own_pids(self.marker, sessions):
            time.sleep(0.2)
        return _own_pids(self.marker, sessions)

    # -- REST API (simple auth manager with all_admins: no token needed)

    def api(self, method: str, path: str, body: dict | None = None, ok=(200,)) -> dict | None:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.api_url}/api/v2{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json", "Accept": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            if e.code in ok:
                return None
            raise AssertionError(f"{method} {path} -> {e.code}: {e.read()[:2000]!r}") from None

    def dag_ready(self, dag_id: str) -> bool:
        try:
            return bool(self.api("GET", f"/dags/{dag_id}"))
        except AssertionError:
            return False

    def healthy(self) -> bool:
        self._check_alive()
        h = self.api("GET", "/monitor/health")
        parts = ("metadatabase", "scheduler", "triggerer", "dag_processor")
        return all(((h or {}).get(p) or {}).get("status") == "healthy" for p in parts)

    def trigger(self, dag_id: str) -> str:
        run = self.api("POST", f"/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": {}})
        return run["dag_run_id"]

    def runs(self, dag_id: str) -> list[dict]:
        return self.api("GET", f"/dags/{dag_id}/dagRuns?limit=100")["dag_runs"]

    def run(self, dag_id: str, run_id: str) -> dict:
        return self.api("GET", f"/dags/{dag_id}/dagRuns/{urllib.parse.quote(run_id, safe='')}")

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str | None]:
        tis = self.api("GET", f"/dags/{dag_id}/dagRuns/{urllib.parse.quote(run_id, safe='')}/taskInstances"
                              "?limit=100")["task_instances"]
        return {ti["task_id"]: ti["state"] for ti in tis}

    def task_log(self, dag_id: str, run_id: str, task_id: str, trigger: bool = False) -> str:
        """The task's log files (every attempt) as written under AIRFLOW_HOME/logs, or with
        ``trigger`` the triggerer's log of its trigger (``attempt=N.log.trigger.<job>.log``)."""
        base = self.home / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}" / f"task_id={task_id}"
        files = [p for p in sorted(base.rglob("*.log")) if (".log.trigger." in p.name) == trigger]
        return "\n".join(p.read_text(errors="replace") for p in files)

    def wait_run_done(self, dag_id: str, run_id: str, timeout_s: float) -> dict:
        def finished():
            self._check_alive()
            run = self.run(dag_id, run_id)
            return run if run["state"] in TERMINAL_RUN_STATES else None

        return _wait_for(f"{dag_id} run {run_id} to finish", finished, timeout_s, 3,
                         lambda: self.diagnose(dag_id, run_id))

    def wait_defer_exit_processed(self, dag_id: str, run_id: str, task_id: str, timeout_s: float = 120) -> bool:
        """Wait until the scheduler has handled the executor's event for the worker that deferred.

        Airflow 3.3.2 race (apache/airflow#66374, #67287, #72716): if the trigger fires before the
        scheduler drains the worker's "success" event from the defer exit, the resumed try (same
        try_number, now queued/running) is taken for a task killed externally and marked
        up_for_retry, and the sensor resumes only after retry_delay (minutes). Data landing within
        seconds of the deferral is what this test does on purpose, so it waits for the scheduler's
        "TaskInstance Finished" line of the deferral first. Not fatal when the line never shows
        (the retry still gets there, only later).
        """
        needle = f"TaskInstance Finished: dag_id={dag_id}, task_id={task_id}, run_id={run_id},"
        log = self.logs / "scheduler.log"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if needle in log.read_text(errors="replace"):
                return True
            time.sleep(1)
        return False

    def diagnose(self, dag_id: str | None = None, run_id: str | None = None) -> str:
        out = []
        if dag_id and run_id:
            try:
                states = self.task_states(dag_id, run_id)
                out.append(f"task states of {dag_id} {run_id}: {json.dumps(states)}")
                for tid, state in states.items():
                    if state not in ("success", "skipped"):
                        out.append(f"--- log of {tid} ({state}):\n" + "\n".join(
                            self.task_log(dag_id, run_id, tid).splitlines()[-40:]))
            except Exception as e:  # noqa: BLE001 - diagnostics must not hide the real failure
                out.append(f"(could not read task states: {e!r})")
        for log in sorted(self.logs.glob("*.log")):
            out.append(f"--- {log.name} (tail):\n{_tail(log, 25)}")
        return "\n".join(out)


# ---------------------------------------------------------------- the test


def _sample_batch(tmp: Path) -> Path:
    from dualml import sample_data

    local = tmp / "batch"
    sample_data.generate(local, per_class=PER_CLASS, size=48, seed=11, classes=CLASSES)
    return local


def test_new_data_in_the_bucket_triggers_training_once(tmp_path):
    timings: dict[str, float] = {}
    stack = AirflowStack(tmp_path)
    t0 = time.monotonic()
    leftover: list[int] = []
    try:
        # ------------------------------------------------------------ bring-up
        stack.start_emulator()
        gcs = Bucket(stack.gcs_url, stack.bucket_name)
        gcs.create()
        stack.migrate()
        stack.start_airflow()
        _wait_for("Airflow components healthy (api-server, scheduler, dag-processor, triggerer)",
                  stack.healthy, 300, 3, stack.diagnose)
        _wait_for("both DAGs parsed and serialized", lambda: stack.dag_ready(WATCHER) and stack.dag_ready(MAIN),
                  420, 3, stack.diagnose)
        for dag_id in (WATCHER, MAIN):
            stack.api("PATCH", f"/dags/{dag_id}", {"is_paused": False})
        assert stack.runs(MAIN) == [], "dual_deployment must not be scheduled by itself (schedule is null)"
        timings["bring-up"] = time.monotonic() - t0

        # ------------------------------------------------------------ A: nothing new
        t = time.monotonic()
        assert gcs.names("incoming/") == []
        run_a = stack.trigger(WATCHER)
        _wait_for("wait_for_data to defer (empty incoming prefix)",
                  lambda: stack._check_alive() or stack.task_states(WATCHER, run_a).get("wait_for_data") == "deferred",
                  240, 2, lambda: stack.diagnose(WATCHER, run_a))
        stack.wait_defer_exit_processed(WATCHER, run_a, "wait_for_data")
        assert stack.task_states(WATCHER, run_a)["wait_for_data"] == "deferred"  # nothing to fire on yet
        # The sensor now waits in the triggerer. A batch arrives, but its upload is not finished.
        local = _sample_batch(tmp_path)
        for path in sorted(local.rglob("*.jpg")):
            gcs.upload_file(f"incoming/{BATCH}/{path.relative_to(local).as_posix()}", path)
        result = stack.wait_run_done(WATCHER, run_a, 240)
        states = stack.task_states(WATCHER, run_a)
        assert result["state"] == "success", stack.diagnose(WATCHER, run_a)
        assert states == {"wait_for_data": "success", "find_new_dataset": "skipped", "trigger_training": "skipped"}, \
            stack.diagnose(WATCHER, run_a)
        sensor_log = stack.task_log(WATCHER, run_a, "wait_for_data")
        assert "defer" in sensor_log.lower(), sensor_log[-3000:]
        # What the trigger did is logged by the triggerer beside the task's log (<attempt>.log.trigger.<job>.log).
        trigger_log = stack.task_log(WATCHER, run_a, "wait_for_data", trigger=True)
        assert "Trigger fired event" in trigger_log and f"incoming/{BATCH}/" in trigger_log, trigger_log[-3000:]
        find_log = stack.task_log(WATCHER, run_a, "find_new_dataset")
        assert f"{BATCH}: no {MARKER} marker yet" in find_log, find_log[-3000:]
        assert stack.runs(MAIN) == [], "an unfinished upload must not start training"
        assert gcs.names("runs/") == []
        timings["A: defer, fire, half-finished batch skipped"] = time.monotonic() - t

        # ------------------------------------------------------------ B: new data
        t = time.monotonic()
        gcs.upload_bytes(f"incoming/{BATCH}/{MARKER}", b"")  # written last, as the convention says
        run_b = stack.trigger(WATCHER)
        result = stack.wait_run_done(WATCHER, run_b, 240)
        assert result["state"] == "success", stack.diagnose(WATCHER, run_b)
        assert stack.task_states(WATCHER, run_b) == {
            "wait_for_data": "success", "find_new_dataset": "success", "trigger_training": "success"}, \
            stack.diagnose(WATCHER, run_b)
        main_runs = stack.runs(MAIN)
        assert len(main_runs) == 1, main_runs
        main_run_id = main_runs[0]["dag_run_id"]
        assert main_run_id.startswith("newdata__"), main_run_id
        fingerprint = main_run_id[len("newdata__"):]
        data_uri = f"gs://{stack.bucket_name}/incoming/{BATCH}"
        assert main_runs[0]["conf"] == {"data_uri": data_uri}
        ledger_uri_name = "dual-deploy/ledger.json"
        assert gcs.read_json(ledger_uri_name)[fingerprint]["status"] in ("triggered", "success")

        result = stack.wait_run_done(MAIN, main_run_id, 900)
        assert result["state"] == "success", stack.diagnose(MAIN, main_run_id)
        main_states = stack.task_states(MAIN, main_run_id)
        assert main_states and all(s == "success" for s in main_states.values()), main_states
        assert {"validate_dataset", "stage_split", "cloud.train", "cloud.champion_gate", "cloud.deploy",
                "mobile.train", "mobile.champion_gate", "mobile.convert_tflite", "mobile.publish",
                "run_summary"} <= set(main_states), sorted(main_states)

        summaries = [n for n in gcs.names("runs/") if n.endswith("/run_summary.json")]
        assert len(summaries) == 1, summaries
        summary = gcs.read_json(summaries[0])
        assert summary["status"] == "success", json.dumps(summary, indent=1)[:4000]
        assert summary["run_id"] == main_run_id and summary["dag_id"] == MAIN
        assert summary["data"]["data_uri"] == data_uri and summary["data"]["fingerprint"] == fingerprint
        assert summary["data"]["classes"] == {c: PER_CLASS for c in CLASSES}
        assert all(t["status"] == "success" for t in summary["targets"].values()), summary["targets"]
        assert summary["targets"]["mobile"]["tflite"]["passed"] is True
        entry = gcs.read_json(ledger_uri_name)[fingerprint]
        assert entry["status"] == "success" and entry["run_id"] == main_run_id and entry["data_uri"] == data_uri
        assert entry["summary_uri"] == f"gs://{stack.bucket_name}/{summaries[0]}"
        # The endpoint the deploy task left running answers; teardown must stop it (pid file).
        url = urllib.parse.urlsplit(summary["targets"]["cloud"]["endpoint"]["prediction_url"])
        assert url.hostname == "127.0.0.1" and url.port >= stack.endpoint_port, url
        with urllib.request.urlopen(f"http://127.0.0.1:{url.port}/health", timeout=10) as r:
            assert r.status == 200
        serving = [json.loads(p.read_text())["pid"] for p in (stack.state_dir / "pids").glob("*.pid")]
        assert serving and all(_alive(pid) for pid in serving), serving
        timings["B: new batch -> dual_deployment success"] = time.monotonic() - t

        # ------------------------------------------------------------ C: the same data again
        t = time.monotonic()
        run_c = stack.trigger(WATCHER)
        result = stack.wait_run_done(WATCHER, run_c, 240)
        assert result["state"] == "success", stack.diagnose(WATCHER, run_c)
        assert stack.task_states(WATCHER, run_c) == {
            "wait_for_data": "success", "find_new_dataset": "skipped", "trigger_training": "skipped"}, \
            stack.diagnose(WATCHER, run_c)
        find_log = stack.task_log(WATCHER, run_c, "find_new_dataset")
        assert f"same data (fingerprint {fingerprint}) already success" in find_log, find_log[-3000:]
        assert [r["dag_run_id"] for r in stack.runs(MAIN)] == [main_run_id], "the same data must not train twice"
        assert len(stack.runs(WATCHER)) == 3
        timings["C: same data again skipped"] = time.monotonic() - t
    finally:
        t = time.monotonic()
        leftover = stack.stop()
        timings["teardown"] = time.monotonic() - t
        timings["total"] = time.monotonic() - t0
        print("\ntimings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    assert leftover == [], f"processes this test started are still running: {leftover}"
    assert all(p.poll() is not None for p in stack.procs.values())

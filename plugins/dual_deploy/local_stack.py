"""The local Airflow 3 stack as processes, no Docker: `make up` / `make down` / `make trigger`, and the tests.

``python -m dual_deploy.local_stack up|down|status|trigger`` (scripts/up.sh sets the environment).

What runs, one process group each, logs in ``<state>/logs/``:

- the local cloud, as ``make run`` starts it (``python -m dual_deploy.local_platform``, pid files in
  ``<state>/pids``): the GCS emulator and the local Vertex AI server (emulators/localcloud: training
  jobs, Model Registry, endpoints; its serving processes are its children), plus the buckets;
- Airflow as in production, one process per component: ``api-server`` (UI, REST API, Execution API),
  ``scheduler`` (LocalExecutor: tasks run as its children), ``dag-processor``, ``triggerer``.

AIRFLOW_HOME is ``<state>/airflow-up`` with a SQLite database, not ``make run``'s ``<state>/airflow``:
a scheduler keeps writing to its database while it is up, and ``airflow dags test`` on the same
SQLite file would race it for locks and for the same dag runs. The local cloud (bucket contents,
endpoints, champions) is shared with ``make run``. LocalExecutor on SQLite is what ``airflow
standalone`` runs in Airflow 3 (no Postgres here); tasks of a run then go one at a time through the
database, which is fine for one user.

``<state>/up/stack.json`` records each component's pid and start time (so ``down`` never signals a
recycled pid) and a marker variable every child inherits: ``down`` stops the groups, the local cloud's
pid files, then sweeps whatever still carries the marker, and says if anything survived.

Standard library only: imported by tests and CLIs, never by DAGs.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

COMPONENTS = ("api-server", "dag-processor", "scheduler", "triggerer")
MARKER_VAR = "DUAL_DEPLOY_STACK_MARKER"
HEALTH_PARTS = ("metadatabase", "scheduler", "triggerer", "dag_processor")
TERMINAL_RUN_STATES = {"success", "failed"}
USER = "admin"


class StackError(RuntimeError):
    """Something about the stack is wrong; the message says what and where to look."""


class DagImportError(StackError):
    """A DAG file failed to import: waiting longer will not help."""


@dataclass
class Ports:
    api: int = 8080
    gcs: int = 9023
    worker_log: int = 8793  # the scheduler serves running tasks' logs to the UI on this port
    trigger_log: int = 8794
    vertex: int = 9010  # the local Vertex AI server: gRPC here, REST (predict, Remote Config) on vertex + 1

    @classmethod
    def from_env(cls, env: dict[str, str] | os._Environ = os.environ) -> Ports:
        d = cls()
        return cls(api=int(env.get("API_PORT") or d.api), gcs=int(env.get("GCS_PORT") or d.gcs),
                   worker_log=int(env.get("LOG_PORT") or d.worker_log),
                   trigger_log=int(env.get("TRIGGER_LOG_PORT") or d.trigger_log),
                   vertex=int(env.get("VERTEX_PORT") or d.vertex))

    @classmethod
    def free(cls) -> Ports:
        vertex = free_port()
        while port_in_use(vertex + 1):
            vertex = free_port()
        return cls(*(free_port() for _ in range(4)), vertex=vertex)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def tail(path: Path, n: int = 40) -> str:
    if not path.exists():
        return f"({path} does not exist)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


# ---------------------------------------------------------------- processes


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()
    except OSError:
        return None


def alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] != "Z"  # a zombie has already exited


def start_time(pid: int) -> int | None:
    st = _stat(pid)
    return int(st[19]) if st else None  # field 22 of /proc/<pid>/stat, in clock ticks since boot


def signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def own_pids(marker: str, sessions: set[int]) -> list[int]:
    """Live processes of this stack: in one of the sessions it created (every component leads its own),
    or carrying its marker variable (processes that made their own session, such as the serving app a
    deploy task starts). Both are needed: the api-server rewrites its process title over its
    environment, so /proc/<pid>/environ reads empty there."""
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
        if (sid in sessions or needle in env.split(b"\0")) and alive(pid):
            found.append(pid)
    return sorted(found)


def stop_group(pid: int, grace_s: float = 10) -> None:
    """SIGTERM the process group led by ``pid``, SIGKILL what is left after ``grace_s``."""
    signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and alive(pid):
        time.sleep(0.1)
    signal_group(pid, signal.SIGKILL)


# Stop order of the local cloud's pid files: an in-progress `make run` first, then the local Vertex AI
# server (gracefully: it cancels training jobs and stops its serving processes), the GCS emulator last.
_STOP_FIRST = ("make-run", "localcloud")
_STOP_LAST = ("gcs-emulator",)
_GRACE_S = {"localcloud": 60.0}


def stop_pid_files(pid_dir: Path) -> list[str]:
    """Stop every process recorded under ``pid_dir`` (``make run``'s convention: JSON with "pid", or a
    bare pid); returns the names stopped."""
    files = sorted(pid_dir.glob("*.pid")) if pid_dir.is_dir() else []
    order = {name: i for i, name in enumerate(_STOP_FIRST)} | {name: 99 for name in _STOP_LAST}
    stopped = []
    for pid_file in sorted(files, key=lambda f: (order.get(f.stem, 50), f.name)):
        text = pid_file.read_text().strip()
        try:
            pid = int(json.loads(text)["pid"]) if text.startswith("{") else int(text)
        except (ValueError, KeyError, TypeError):
            pid = -1
        if pid > 0 and alive(pid):
            stop_group(pid, _GRACE_S.get(pid_file.stem, 10.0))
            stopped.append(pid_file.stem)
        pid_file.unlink(missing_ok=True)
    return stopped


# ---------------------------------------------------------------- the stack


@dataclass
class Component:
    name: str
    pid: int
    started: int | None  # /proc start time, to tell our process from a recycled pid

    def running(self) -> bool:
        return alive(self.pid) and start_time(self.pid) == self.started


class LocalStack:
    """The local cloud and the Airflow components of one state folder.

    ``base_env`` is the environment the components start from: scripts/local_env.sh's (DAGs and plugins
    folders, PYTHONPATH, the anonymous GCS connection) or a test's own; the stack adds what makes the
    components one Airflow (home, executor, ports, shared secrets). ``all_admins`` turns the login off
    (tests that only talk to the REST API)."""

    def __init__(self, state_dir: Path, *, root: Path | None = None, ports: Ports | None = None,
                 base_env: dict[str, str] | None = None, all_admins: bool = False, unpause_new: bool = False,
                 host: str = "127.0.0.1"):
        self.root = (root or Path(__file__).resolve().parents[2]).resolve()
        self.state_dir = Path(state_dir).resolve()
        self.home = self.state_dir / "airflow-up"
        self.run_dir = self.state_dir / "up"
        self.logs = self.state_dir / "logs"
        self.pid_dir = self.state_dir / "pids"
        self.file = self.run_dir / "stack.json"
        self.ports = ports or Ports()
        self.host = host
        self.base_env = dict(os.environ if base_env is None else base_env)
        self.all_admins = all_admins
        self.unpause_new = unpause_new
        self.components: dict[str, Component] = {}
        self.marker = uuid.uuid4().hex
        self._token: str | None = None
        self._load()

    # -- recorded state

    def _load(self) -> None:
        if not self.file.exists():
            return
        data = json.loads(self.file.read_text())
        self.marker = data["marker"]
        self.components = {c["name"]: Component(**c) for c in data["components"]}
        if not any(c.running() for c in self.components.values()):
            return  # nothing of it left: a new `up` may use other ports
        self.ports = Ports(**data["ports"])
        self.host = data.get("host", self.host)
        self.all_admins = data.get("all_admins", self.all_admins)

    def _save(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.file.write_text(json.dumps({
            "marker": self.marker, "ports": asdict(self.ports), "host": self.host, "all_admins": self.all_admins,
            "components": [asdict(c) for c in self.components.values()]}, indent=1))

    def _secrets(self) -> dict[str, str]:
        """One JWT secret and one API secret key for every component (per-process random values make
        task tokens and log-server requests "invalid"), kept across restarts."""
        path = self.run_dir / "secrets.json"
        if not path.exists():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            path.touch(mode=0o600)
            path.write_text(json.dumps({"jwt_secret": secrets.token_hex(32), "secret_key": secrets.token_hex(16)}))
        return json.loads(path.read_text())

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.ports.api}"

    @property
    def ui_url(self) -> str:
        return f"http://localhost:{self.ports.api}" if self.host in ("127.0.0.1", "0.0.0.0") else self.api_url

    @property
    def gcs_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.gcs}"

    @property
    def passwords_file(self) -> Path:
        return self.home / "simple_auth_manager_passwords.json.generated"

    def password(self) -> str | None:
        try:
            return json.loads(self.passwords_file.read_text())[USER]
        except (OSError, ValueError, KeyError):
            return None

    def env(self) -> dict[str, str]:
        s = self._secrets()
        env = dict(self.base_env)
        venv_bin = str(Path(sys.executable).parent)
        env.update(
            PATH=f"{venv_bin}{os.pathsep}{env.get('PATH', '')}",  # Airflow spawns `airflow` by name
            STORAGE_EMULATOR_HOST=self.gcs_url,
            VERTEX_AI_EMULATOR_HOST=f"127.0.0.1:{self.ports.vertex}",
            FIREBASE_REMOTE_CONFIG_EMULATOR_HOST=f"127.0.0.1:{self.ports.vertex + 1}",
            DUAL_DEPLOY_STATE_DIR=str(self.state_dir),
            AIRFLOW_HOME=str(self.home),
            AIRFLOW__CORE__EXECUTOR="LocalExecutor",
            AIRFLOW__CORE__LOAD_EXAMPLES="False",
            AIRFLOW__CORE__UNIT_TEST_MODE="False",
            AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION=str(not self.unpause_new),
            # Tasks reach the Execution API through this URL: it must follow the API port.
            AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"{self.api_url}/execution/",
            AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS=f"{USER}:admin",
            AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS=str(self.all_admins),
            AIRFLOW__API__HOST=self.host,
            AIRFLOW__API__PORT=str(self.ports.api),
            AIRFLOW__API__WORKERS="1",
            AIRFLOW__API__SECRET_KEY=s["secret_key"],
            AIRFLOW__API_AUTH__JWT_SECRET=s["jwt_secret"],
            AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT=str(self.ports.worker_log),
            AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT=str(self.ports.trigger_log),
            AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK="False",  # else it binds 8974 too
            **{MARKER_VAR: self.marker},
        )
        # Sensible for 2 cores; a value the caller set wins.
        for key, value in {
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT": "120",
            "AIRFLOW__DAG_PROCESSOR__DAG_FILE_PROCESSOR_TIMEOUT": "180",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "60",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        }.items():
            env.setdefault(key, value)
        return env

    # -- bring-up

    def running(self) -> dict[str, bool]:
        return {name: c.running() for name, c in self.components.items()}

    def _check_ports(self) -> None:
        wanted = {"API_PORT": self.ports.api, "LOG_PORT": self.ports.worker_log,
                  "TRIGGER_LOG_PORT": self.ports.trigger_log}  # (the local cloud's are reused when they answer)
        busy = [f"{k}={v}" for k, v in wanted.items() if port_in_use(v)]
        if busy:
            raise StackError(f"port(s) already in use: {', '.join(busy)} (another Airflow, or `make up` of another "
                             "checkout?). Stop it, or pick others, e.g. `make up API_PORT=8090 LOG_PORT=8795 "
                             "TRIGGER_LOG_PORT=8796`")

    def _start(self, name: str, cmd: list[str]) -> Component:
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"airflow-{name}.log", "ab") as log:
            proc = subprocess.Popen(cmd, env=self.env(), cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        comp = Component(name, proc.pid, start_time(proc.pid))
        self.components[name] = comp
        self._save()
        return comp

    def start_local_cloud(self) -> None:
        """The local stand-ins of the cloud APIs the DAGs talk to, as `make run` starts them (shared with it;
        each start is idempotent). A new stand-in goes here, with a pid file and its address in env()."""
        mod = [sys.executable, "-m", "dual_deploy.local_platform"]
        self._run([*mod, "emulator-start", "--port", str(self.ports.gcs), "--state-dir", str(self.state_dir)],
                  "gcs-emulator-start", timeout_s=60)
        self._run([*mod, "localcloud-start", "--port", str(self.ports.vertex), "--state-dir", str(self.state_dir),
                   "--storage-emulator-host", self.gcs_url], "localcloud-start", timeout_s=240)
        self._run([*mod, "ensure-buckets"], "ensure-buckets", timeout_s=120)

    def _run(self, cmd: list[str], name: str, timeout_s: float) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.run(cmd, env=self.env(), cwd=self.root, stdout=out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, timeout=timeout_s, start_new_session=True)
        if proc.returncode != 0:
            raise StackError(f"`{' '.join(cmd[1:4])} ...` failed ({proc.returncode}); {log}:\n{tail(log)}")

    def upload_dataset(self, folder: Path, data_uri: str) -> None:
        self._run([sys.executable, "-m", "dual_deploy.local_platform", "upload-dataset", str(folder), data_uri],
                  "upload-dataset", timeout_s=600)

    def migrate(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self._run([str(Path(sys.executable).parent / "airflow"), "db", "migrate"], "airflow-db-migrate", 600)

    def start_airflow(self) -> None:
        if any(self.running().values()):
            raise StackError("Airflow components of this state folder are still running: stop them first (down)")
        self._check_ports()
        self.components = {}
        airflow = str(Path(sys.executable).parent / "airflow")
        self._start("api-server", [airflow, "api-server", "--host", self.host, "--port", str(self.ports.api),
                                   "--workers", "1"])
        self._start("dag-processor", [airflow, "dag-processor"])
        self._start("scheduler", [airflow, "scheduler"])
        self._start("triggerer", [airflow, "triggerer"])

    def check_alive(self) -> None:
        for name, comp in self.components.items():
            if not comp.running():
                raise StackError(f"{name} exited; {self.logs / f'airflow-{name}.log'}:\n"
                                 f"{tail(self.logs / f'airflow-{name}.log', 60)}")

    def wait_for(self, what: str, check: Callable[[], object], timeout_s: float, interval_s: float = 2.0):
        """Poll ``check()`` until truthy (components must stay up); StackError with a diagnosis on timeout."""
        deadline = time.monotonic() + timeout_s
        last: object = None
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                last = check()
            except DagImportError:
                raise
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError, StackError) as e:
                last = e  # not up yet (connection refused, 503 while starting)
            else:
                if last:
                    return last
            time.sleep(interval_s)
        raise StackError(f"timed out after {timeout_s:.0f} s waiting for {what} (last: {last!r})\n{self.diagnose()}")

    def healthy(self) -> bool:
        h = self.api("GET", "/monitor/health", auth=False)
        return all(((h or {}).get(p) or {}).get("status") == "healthy" for p in HEALTH_PARTS)

    def dags_ready(self, dag_ids: list[str]) -> bool:
        errors = (self.api("GET", "/importErrors?limit=100") or {}).get("import_errors") or []
        if errors:
            raise DagImportError("DAG import errors:\n" + "\n".join(f"{e['filename']}:\n{e['stack_trace']}"
                                                                     for e in errors))
        return all(self.dag(d) for d in dag_ids)

    def up(self, dag_ids: list[str], unpause: list[str] = (), data: tuple[Path, str] | None = None,
           log: Callable[[str], None] = print, timeout_s: float = 600) -> None:
        """Everything, idempotently: already running -> nothing started. Fails with a StackError."""
        t0 = time.monotonic()
        state = self.running()
        if state and all(state.values()):
            log(f"==> already up (pids {', '.join(str(c.pid) for c in self.components.values())})")
        else:
            if any(state.values()):
                log("==> some components had exited: restarting the stack")
                self.stop_airflow()
            log(f"==> local cloud: GCS emulator on {self.gcs_url}, local Vertex AI server on "
                f"127.0.0.1:{self.ports.vertex} (state in {self.state_dir})")
            self.start_local_cloud()
            if data:
                log(f"==> dataset {data[0]} -> {data[1]}")
                self.upload_dataset(*data)
            log(f"==> airflow db migrate (AIRFLOW_HOME={self.home})")
            self.migrate()
            log(f"==> starting {', '.join(COMPONENTS)} (logs: {self.logs}/airflow-*.log)")
            self.start_airflow()
        self.wait_for("Airflow components healthy (" + ", ".join(HEALTH_PARTS) + ")", self.healthy, timeout_s, 2)
        self.wait_for(f"DAGs {', '.join(dag_ids)} parsed", lambda: self.dags_ready(dag_ids), timeout_s, 3)
        for dag_id in unpause:
            self.api("PATCH", f"/dags/{dag_id}", {"is_paused": False})
        log(f"==> up in {time.monotonic() - t0:.0f} s")

    # -- REST API

    def token(self) -> str | None:
        if self.all_admins:
            return None
        if self._token is None:
            password = self.password()
            if password is None:
                raise StackError(f"no password for {USER!r} in {self.passwords_file} yet (api-server not started?)")
            req = urllib.request.Request(f"{self.api_url}/auth/token", method="POST",
                                         data=json.dumps({"username": USER, "password": password}).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=30) as r:
                self._token = json.loads(r.read())["access_token"]
        return self._token

    def api(self, method: str, path: str, body: dict | None = None, ok: tuple[int, ...] = (), auth: bool = True):
        """Call /api/v2; an HTTP error whose code is in ``ok`` returns None, any other raises StackError."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        token = self.token() if auth else None
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.api_url}/api/v2{path}", data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            if e.code in ok:
                return None
            raise StackError(f"{method} {path} -> {e.code}: {e.read()[:2000]!r}") from None

    def dag(self, dag_id: str) -> dict | None:
        return self.api("GET", f"/dags/{dag_id}", ok=(404,))

    def trigger(self, dag_id: str, conf: dict | None = None, run_id: str | None = None) -> str:
        body: dict = {"logical_date": None, "conf": conf or {}}
        if run_id:
            body["dag_run_id"] = run_id
        return self.api("POST", f"/dags/{dag_id}/dagRuns", body)["dag_run_id"]

    def runs(self, dag_id: str) -> list[dict]:
        return self.api("GET", f"/dags/{dag_id}/dagRuns?limit=100")["dag_runs"]

    def run(self, dag_id: str, run_id: str) -> dict:
        return self.api("GET", f"/dags/{dag_id}/dagRuns/{urllib.parse.quote(run_id, safe='')}")

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        return self.api("GET", f"/dags/{dag_id}/dagRuns/{urllib.parse.quote(run_id, safe='')}/taskInstances"
                               "?limit=100")["task_instances"]

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str | None]:
        return {ti["task_id"]: ti["state"] for ti in self.task_instances(dag_id, run_id)}

    def task_log(self, dag_id: str, run_id: str, task_id: str, trigger: bool = False) -> str:
        """The task's log files (every attempt) under AIRFLOW_HOME/logs, or with ``trigger`` the
        triggerer's log of its trigger (``attempt=N.log.trigger.<job>.log``)."""
        base = self.home / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}" / f"task_id={task_id}"
        files = [p for p in sorted(base.rglob("*.log")) if (".log.trigger." in p.name) == trigger]
        return "\n".join(p.read_text(errors="replace") for p in files)

    def wait_run_done(self, dag_id: str, run_id: str, timeout_s: float) -> dict:
        def finished():
            run = self.run(dag_id, run_id)
            return run if run["state"] in TERMINAL_RUN_STATES else None

        try:
            return self.wait_for(f"{dag_id} run {run_id} to finish", finished, timeout_s, 3)
        except StackError as e:
            raise StackError(f"{e}\n{self.diagnose(dag_id, run_id)}") from None

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
        for log in sorted(self.logs.glob("airflow-*.log")):
            out.append(f"--- {log.name} (tail):\n{tail(log, 25)}")
        return "\n".join(out)

    # -- tear-down

    def stop_airflow(self, grace_s: float = 20) -> None:
        comps = [c for c in reversed(list(self.components.values())) if c.running()]
        for c in comps:
            signal_group(c.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(alive(c.pid) for c in comps):
            time.sleep(0.2)
        for c in comps:
            signal_group(c.pid, signal.SIGKILL)  # the rest of each group: task workers and their children

    def down(self) -> tuple[list[str], list[int]]:
        """Stop the components, the local cloud (pid files) and any straggler carrying the marker.
        Returns (what was stopped, pids still alive afterwards: should be none)."""
        stopped = [n for n, running in self.running().items() if running]
        sessions = {c.pid for c in self.components.values() if c.running()}
        self.stop_airflow()
        stopped += stop_pid_files(self.pid_dir)
        for pid in own_pids(self.marker, sessions):  # stragglers that left their group
            signal_group(pid, signal.SIGKILL)
            stopped.append(f"pid {pid}")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and own_pids(self.marker, sessions):
            time.sleep(0.2)
        left = own_pids(self.marker, sessions)
        if not left:
            self.file.unlink(missing_ok=True)
        return stopped, left


# ---------------------------------------------------------------- CLI


def _stack(args) -> LocalStack:
    return LocalStack(Path(args.state_dir), ports=Ports.from_env())


def _print_login(stack: LocalStack, fresh: bool) -> None:
    where = stack.passwords_file
    if stack.all_admins:
        print(f"Airflow UI: {stack.ui_url}  (no login: all users are admins)")
        return
    print(f"Airflow UI: {stack.ui_url}  login: {USER} / {stack.password()}"
          + ("  (generated now; kept in " if fresh else "  (from ") + f"{where})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dual_deploy.local_stack", description=__doc__.split("\n")[0])
    p.add_argument("--state-dir", default=os.environ.get("STATE_DIR", ".state"))
    sub = p.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("up", help="start the local cloud and Airflow (idempotent)")
    u.add_argument("--dags", default="dual_deployment,dual_deployment_new_data",
                   help="DAG ids to wait for (comma-separated)")
    u.add_argument("--unpause", action="store_true", help="unpause those DAGs (their schedules start)")
    u.add_argument("--data", help="dataset folder to upload (tf_flowers layout)")
    u.add_argument("--data-uri", help="where to upload it (gs://...)")
    u.add_argument("--timeout", type=float, default=600)
    sub.add_parser("down", help="stop everything `up` started")
    sub.add_parser("status", help="what is running")
    t = sub.add_parser("trigger", help="trigger a DAG run and follow it task by task")
    t.add_argument("dag_id", nargs="?", default="dual_deployment")
    t.add_argument("--conf", default="{}", help='run conf (JSON), e.g. \'{"targets": ["mobile"]}\'')
    t.add_argument("--no-follow", action="store_true")
    args = p.parse_args(argv)
    stack = _stack(args)

    if args.cmd == "down":
        stopped, left = stack.down()
        print(f"stopped: {', '.join(stopped)}" if stopped else "nothing running")
        if left:
            print(f"still running after SIGKILL: pids {left}", file=sys.stderr)
            return 1
        return 0
    if args.cmd == "status":
        state = stack.running()
        for name, running in state.items():
            print(f"{name:14s} {'running' if running else 'stopped'} (pid {stack.components[name].pid})")
        if state and all(state.values()):
            _print_login(stack, fresh=False)
        elif not state:
            print("not up (make up)")
        return 0 if state and all(state.values()) else 1
    if args.cmd == "up":
        fresh = not stack.passwords_file.exists()
        dag_ids = [d for d in args.dags.split(",") if d]
        data = (Path(args.data), args.data_uri) if args.data else None
        try:
            stack.up(dag_ids, unpause=dag_ids if args.unpause else (), data=data, timeout_s=args.timeout)
        except StackError as e:
            print(f"make up failed: {e}\n(`make down` stops what did start)", file=sys.stderr)
            return 1
        print(f"DAGs: {', '.join(dag_ids)} ({'unpaused' if args.unpause else 'paused: unpause in the UI, or make up UNPAUSE=1'})")
        _print_login(stack, fresh)
        print("Trigger a run from the UI (Trigger, Params form) or `make trigger [CONF='{\"targets\": [\"mobile\"]}']`;"
              " stop everything with `make down`.")
        return 0
    # trigger
    state = stack.running()
    if not state or not all(state.values()):
        print("the stack is not up: `make up` first", file=sys.stderr)
        return 1
    try:
        conf = json.loads(args.conf)
    except ValueError as e:
        print(f"CONF is not JSON ({e}): {args.conf!r}", file=sys.stderr)
        return 2
    dag = stack.dag(args.dag_id)
    if dag is None:
        print(f"no DAG {args.dag_id!r}", file=sys.stderr)
        return 2
    if dag["is_paused"]:
        stack.api("PATCH", f"/dags/{args.dag_id}", {"is_paused": False})
        print(f"unpaused {args.dag_id} (runs of a paused DAG never start)")
    try:
        run_id = stack.trigger(args.dag_id, conf)
    except StackError as e:
        print(f"trigger failed: {e}", file=sys.stderr)
        return 1
    url = f"{stack.ui_url}/dags/{args.dag_id}/runs/{urllib.parse.quote(run_id, safe='')}"
    print(f"triggered {args.dag_id} run {run_id} with conf {json.dumps(conf)}\n  {url}")
    if args.no_follow:
        return 0
    from dual_deploy.progress import ApiSource, follow

    result = follow(ApiSource(stack, args.dag_id, run_id))
    return 0 if result == "success" else 1


if __name__ == "__main__":
    sys.exit(main())

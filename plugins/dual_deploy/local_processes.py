"""Background processes the local platform starts: the trainer (foreground, streamed) and
serving apps (background, outliving the task, stopped by ``make stop``).

Every background process gets a pid file under ``<state_dir>/pids`` so ``make stop`` (and
the next deployment) can end it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path


class ProcessFailed(RuntimeError):
    """A local platform process exited with an error or never became healthy."""


def include_path() -> str:
    """The folder holding the ``dualml`` package (``include/`` in the repo, plugins/ on Composer)."""
    spec = importlib.util.find_spec("dualml")
    if spec is None or not spec.submodule_search_locations:
        raise ProcessFailed("package 'dualml' (include/) is not importable: add include/ to PYTHONPATH")
    return str(Path(list(spec.submodule_search_locations)[0]).parent)


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    paths = [include_path()] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.update(extra or {})
    return env


def run_streaming(cmd: list[str], env: dict[str, str], log: Callable[[str], None], timeout_s: float | None = None) -> int:
    """Run ``cmd`` to completion, passing each output line to ``log`` as it arrives."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    deadline = time.monotonic() + timeout_s if timeout_s else None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            log(line.rstrip())
            if deadline and time.monotonic() > deadline:
                raise ProcessFailed(f"{cmd[2:4]} exceeded its {timeout_s:.0f} s timeout")
        return proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


class ServingProcesses:
    """Start/stop ``python -m dualml.serving`` processes, tracked by pid files."""

    def __init__(self, state_dir: str, python: str | None = None):
        self.state_dir = Path(state_dir).resolve()
        self.pid_dir = self.state_dir / "pids"
        self.log_dir = self.state_dir / "logs"
        self.python = python or sys.executable

    def start(self, name: str, model_uri: str, port: int, host: str = "127.0.0.1", extra_env=None) -> int:
        self.pid_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = child_env({"AIP_HTTP_PORT": str(port), "AIP_STORAGE_URI": model_uri, **(extra_env or {})})
        log_file = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen(
            [self.python, "-m", "dualml.serving", "--host", host],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # outlives the Airflow task; `make stop` ends it
        )
        (self.pid_dir / f"{name}.pid").write_text(json.dumps({"pid": proc.pid, "port": port, "model_uri": model_uri}))
        return proc.pid

    def wait_healthy(self, name: str, url: str, timeout_s: float) -> None:
        info = self.info(name)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if info and not _alive(info["pid"]):
                raise ProcessFailed(f"serving process {name} exited during startup; see {self.log_dir / (name + '.log')}:\n"
                                    + self.tail_log(name))
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        raise ProcessFailed(f"serving process {name} not healthy at {url} after {timeout_s:.0f} s:\n{self.tail_log(name)}")

    def info(self, name: str) -> dict | None:
        f = self.pid_dir / f"{name}.pid"
        return json.loads(f.read_text()) if f.exists() else None

    def tail_log(self, name: str, lines: int = 20) -> str:
        f = self.log_dir / f"{name}.log"
        return "\n".join(f.read_text(errors="replace").splitlines()[-lines:]) if f.exists() else ""

    def stop(self, name: str, timeout_s: float = 10) -> bool:
        info = self.info(name)
        (self.pid_dir / f"{name}.pid").unlink(missing_ok=True)
        if not info or not _alive(info["pid"]):
            return False
        os.killpg(info["pid"], signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and _alive(info["pid"]):
            time.sleep(0.1)
        if _alive(info["pid"]):
            os.killpg(info["pid"], signal.SIGKILL)
        return True

    def rename(self, old: str, new: str) -> None:
        (self.pid_dir / f"{old}.pid").rename(self.pid_dir / f"{new}.pid")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by us) counts as dead.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True

"""Start, stop, crash and query a ``python -m localcloud`` server process (tests and scripts).

``LocalCloudProcess(state_dir, config=...)`` starts it on free ports (or given ones), waits for its
``server.json``, and offers the admin calls tests use: ``state()``, ``add_fault(...)``,
``clear_faults()``, ``preempt(job)``, ``fail(job)``, ``fail_pipeline(pipeline)``, plus ``kill9()`` and ``restart()`` to replay
crashes. ``env()`` is what a client process needs to reach it (VERTEX_AI_EMULATOR_HOST, ...).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # emulators/


def _free_port_pair(host: str = "127.0.0.1") -> int:
    """A free port whose successor is free too."""
    for _ in range(100):
        with socket.socket() as a:
            a.bind((host, 0))
            port = a.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as b:
                try:
                    b.bind((host, port + 1))
                except OSError:
                    continue
                return port
    raise RuntimeError("no two consecutive free ports found")


class LocalCloudProcess:
    def __init__(self, state_dir: str | Path, config: str | Path | None = None, grpc_port: int = 0,
                 storage_emulator_host: str | None = None, python: str | None = None,
                 log_path: str | Path | None = None, start_timeout_s: float = 180):
        self.state_dir = Path(state_dir)
        self.config = config
        self.grpc_port = grpc_port
        self.storage_emulator_host = storage_emulator_host
        self.python = python or sys.executable
        self.log_path = Path(log_path) if log_path else self.state_dir / "localcloud.log"
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen | None = None
        self.info: dict = {}

    # ---- lifecycle
    def start(self) -> LocalCloudProcess:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        # REST is on the gRPC port + 1, as clients derive it (dual_deploy.emulator_hosts), also on free ports.
        # (server.json is not removed first: a stale one names another pid, and a live one belongs to a
        # server this start must not disturb; it is refused with StateDirBusy.)
        self.grpc_port = self.grpc_port or _free_port_pair()
        cmd = [self.python, "-m", "localcloud", "--state-dir", str(self.state_dir),
               "--grpc-port", str(self.grpc_port), "--http-port", str(self.grpc_port + 1)]
        if self.config:
            cmd += ["--config", str(self.config)]
        if self.storage_emulator_host:
            cmd += ["--storage-emulator-host", self.storage_emulator_host]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_ROOT), *filter(None, [env.get("PYTHONPATH")])])
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + self.start_timeout_s
        info_file = self.state_dir / "server.json"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"local Vertex AI server exited with {self.proc.returncode}:\n{self.tail()}")
            if info_file.exists():
                self.info = json.loads(info_file.read_text())
                if self.info.get("pid") == self.proc.pid:
                    return self
            time.sleep(0.1)
        raise RuntimeError(f"local Vertex AI server not up within {self.start_timeout_s:.0f} s:\n{self.tail()}")

    def stop(self, timeout_s: float = 60) -> None:
        """Graceful stop (SIGTERM): running jobs are cancelled, serving processes stopped."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill9(self) -> None:
        """Crash the server (its job and serving processes keep running, as after a real crash)."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> LocalCloudProcess:
        """Start again on the same ports and state (after stop() or kill9())."""
        host, grpc_port = self.grpc.rsplit(":", 1)
        self.grpc_port = int(grpc_port)
        return self.start()

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # ---- addresses
    @property
    def grpc(self) -> str:
        return self.info["grpc"]

    @property
    def http(self) -> str:
        return f"http://{self.info['http']}"

    def env(self) -> dict[str, str]:
        return {"VERTEX_AI_EMULATOR_HOST": self.grpc, "FIREBASE_REMOTE_CONFIG_EMULATOR_HOST": self.info["http"]}

    # ---- admin API
    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.http + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def state(self) -> dict:
        return self._call("GET", "/localcloud/state")

    def add_fault(self, **rule) -> int:
        return self._call("POST", "/localcloud/faults", rule)["id"]

    def faults(self) -> list[dict]:
        return self._call("GET", "/localcloud/faults")["faults"]

    def clear_faults(self) -> None:
        self._call("DELETE", "/localcloud/faults")

    def preempt(self, job: str) -> None:
        self._call("POST", f"/localcloud/customJobs/{job}:preempt", {})

    def fail(self, job: str, message: str = "injected failure") -> None:
        self._call("POST", f"/localcloud/customJobs/{job}:fail", {"message": message})

    def fail_pipeline(self, pipeline: str, message: str = "injected failure") -> None:
        """The training pipeline's training fails with ``message`` (as a failing AutoML training does)."""
        self._call("POST", f"/localcloud/trainingPipelines/{pipeline}:fail", {"message": message})

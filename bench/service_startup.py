"""Start-up of the local stand-ins ``make run`` starts: the GCS emulator and the local Vertex AI server.

Two figures each, from a fresh state folder per round:

- the command ``scripts/run_local.sh`` runs (``python -m dual_deploy.local_platform emulator-start`` /
  ``localcloud-start`` with ``scripts/local_env.sh``'s environment): wall time until it returns with the
  server answering - what ``make run`` waits for;
- the server process alone (``gcp-storage-emulator start`` / ``python -m localcloud``): spawn until its
  first HTTP answer (``/storage/v1/b``; ``/localcloud/health``).

Anchor, same rounds: ``python -m http.server`` spawned the same way until it answers (a Python process
that imports next to nothing and serves HTTP), and ``python -c pass`` (the interpreter alone). Rounds
are interleaved; medians with the 1-minute load average around each round. Everything started is
stopped by pid before the next round.

``python bench/service_startup.py [--rounds N] [--out FILE]``
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import benchlib

START_TIMEOUT_S = 240


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except Exception:  # noqa: BLE001 - any failure means "not up yet"
        return False


def _spawn_until_answers(cmd: list[str], url: str, env: dict, log: Path) -> tuple[float, subprocess.Popen]:
    t0 = time.perf_counter()
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=benchlib.ROOT, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    while time.perf_counter() - t0 < START_TIMEOUT_S:
        if _answers(url):
            return time.perf_counter() - t0, proc
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[:3]} exited {proc.returncode}: {log.read_text(errors='replace')[-1500:]}")
        time.sleep(0.05)
    _stop(proc.pid)
    raise RuntimeError(f"{cmd[:3]} did not answer on {url} within {START_TIMEOUT_S} s")


def _stop(pid: int, grace_s: float = 60) -> None:
    """SIGTERM the process group ``pid`` leads (the local cloud cancels its jobs on SIGTERM), then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    return
            except ChildProcessError:  # not our child (started by the CLI): poll for it instead
                if not Path(f"/proc/{pid}").exists():
                    return
            time.sleep(0.1)


def _stop_pid_files(state: Path) -> None:
    benchlib.setup_paths()
    from dual_deploy.local_stack import stop_pid_files

    stop_pid_files(state / "pids")


def _env(state: Path, gcs_port: int, vertex_port: int) -> dict:
    env = benchlib.local_env(str(state))
    env.update(GCS_PORT=str(gcs_port), VERTEX_PORT=str(vertex_port),
               STORAGE_EMULATOR_HOST=f"http://127.0.0.1:{gcs_port}",
               VERTEX_AI_EMULATOR_HOST=f"127.0.0.1:{vertex_port}",
               FIREBASE_REMOTE_CONFIG_EMULATOR_HOST=f"127.0.0.1:{vertex_port + 1}")
    return env


def _free_pair() -> int:
    sys.path.insert(0, str(benchlib.ROOT / "emulators"))
    from localcloud.process import _free_port_pair

    return _free_port_pair()


def _timed_command(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=benchlib.ROOT, capture_output=True, text=True, timeout=START_TIMEOUT_S)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[1:4])} exited {proc.returncode}: {proc.stderr[-1500:]}")
    return time.perf_counter() - t0


def one_round(work: Path, rnd: int) -> dict:
    py = sys.executable
    out: dict = {"load1_before": round(os.getloadavg()[0], 2)}
    # Anchors: the interpreter alone, and a trivial Python HTTP server.
    out["python_pass_s"] = _timed_command([py, "-c", "pass"], dict(os.environ))
    port = benchlib.free_port()
    out["http_server_s"], proc = _spawn_until_answers(
        [py, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(work)],
        f"http://127.0.0.1:{port}/", dict(os.environ), work / "http-server.log")
    _stop(proc.pid)

    # What make run runs (scripts/run_local.sh), fresh state each round.
    state = work / f"state-{rnd}"
    gcs_port, vertex_port = benchlib.free_port(), _free_pair()
    env = _env(state, gcs_port, vertex_port)
    mod = [py, "-m", "dual_deploy.local_platform"]
    try:
        out["gcs_emulator_command_s"] = _timed_command(
            [*mod, "emulator-start", "--port", str(gcs_port), "--state-dir", str(state)], env)
        out["localcloud_command_s"] = _timed_command(
            [*mod, "localcloud-start", "--port", str(vertex_port), "--state-dir", str(state)], env)
    finally:
        _stop_pid_files(state)

    # The servers alone, spawned directly (a second fresh state).
    state = work / f"state-{rnd}-direct"
    (state / "gcs").mkdir(parents=True)
    gcs_port, vertex_port = benchlib.free_port(), _free_pair()
    env = _env(state, gcs_port, vertex_port)
    exe = shutil.which("gcp-storage-emulator", path=str(Path(py).parent)) or "gcp-storage-emulator"
    out["gcs_emulator_server_s"], gcs = _spawn_until_answers(
        [exe, "start", "--host", "127.0.0.1", "--port", str(gcs_port), "--quiet"],
        f"http://127.0.0.1:{gcs_port}/storage/v1/b", {**env, "STORAGE_BASE": str(state / "gcs")}, work / "gcs.log")
    try:
        out["localcloud_server_s"], lc = _spawn_until_answers(
            [py, "-m", "localcloud", "--state-dir", str(state / "localcloud"), "--grpc-port", str(vertex_port),
             "--http-port", str(vertex_port + 1), "--config", str(benchlib.ROOT / "emulators" / "localcloud.yaml"),
             "--storage-emulator-host", env["STORAGE_EMULATOR_HOST"]],
            f"http://127.0.0.1:{vertex_port + 1}/localcloud/health", env, work / "localcloud.log")
        _stop(lc.pid)
    finally:
        _stop(gcs.pid)
    out["load1_after"] = round(os.getloadavg()[0], 2)
    return out


def run(rounds: int = 3) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-services-") as tmp:
        work = Path(tmp)
        samples = []
        for rnd in range(rounds):
            samples.append(one_round(work, rnd))
            s = samples[-1]
            benchlib.log(f"service_startup: round {rnd + 1}/{rounds}: gcs {s['gcs_emulator_command_s']:.1f} s "
                         f"(server {s['gcs_emulator_server_s']:.1f}), localcloud {s['localcloud_command_s']:.1f} s "
                         f"(server {s['localcloud_server_s']:.1f}), http.server {s['http_server_s']:.2f} s "
                         f"(load {s['load1_before']}-{s['load1_after']})")
    keys = [k for k in samples[0] if k.endswith("_s")]
    med = {k: statistics.median(s[k] for s in samples) for k in keys}
    return {
        "method": "fresh state per round; command = `python -m dual_deploy.local_platform emulator-start|localcloud-start` "
                  "as scripts/run_local.sh runs it (until it returns, server answering); server = the server process "
                  "alone, spawn to first HTTP answer; anchors: `python -m http.server` to first answer, `python -c pass`",
        "rounds": rounds,
        "median": med,
        "ratio_vs_http_server": {k: benchlib.ratio(med[k], med["http_server_s"])
                                 for k in keys if k.startswith(("gcs", "localcloud"))},
        "samples": samples,
        "load_average_1m": [min(s["load1_before"] for s in samples), max(s["load1_after"] for s in samples)],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="1 round")
    p.add_argument("--out", help="write the result JSON here")
    a = p.parse_args(argv)
    benchlib.emit(run(rounds=1 if a.quick else a.rounds), a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

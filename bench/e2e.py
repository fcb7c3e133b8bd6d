"""Local end-to-end wall time: ``bash scripts/run_local.sh`` (what ``make run`` runs) on a fresh state.

Fresh state: ``STATE_DIR`` and ``DUAL_DEPLOY_STATE_DIR`` point at a new temporary folder, so the
GCS emulator's data, the Airflow SQLite database (``airflow db migrate`` included) and the endpoint
registry start empty and a developer's ``.state/`` is left alone. The run uses the local platform's
ports (GCS emulator 9023, endpoint 8501); when either is taken (a developer's ``make run`` leaves
its endpoint up) it runs on free ports instead (``GCS_PORT`` and a copy of the config file with
another ``endpoint_base_port``), never against someone else's servers. ``make stop`` (with the same state folder) always runs
afterwards, then the folder is deleted. Reported: wall seconds, exit status, the run summary's
status and each DAG step's duration.

``python bench/e2e.py [--free-ports] [--out FILE]``
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import benchlib

PORTS = (9023, 8501)  # GCS emulator, first endpoint port (scripts/local_env.sh, the config file)
CONFIG = benchlib.ROOT / "dags" / "config" / "dual_deploy.yaml"
TIMEOUT_S = 45 * 60


def _other_ports(state: str) -> tuple[dict, dict] | None:
    """Env and description for a run on free ports: GCS_PORT and a copy of the config file
    with another ``endpoint_base_port`` (DUAL_DEPLOY_CONFIG). None if the config cannot be moved."""
    text = CONFIG.read_text()
    endpoint_port = benchlib.free_port()
    moved, n = re.subn(r"(?m)^(\s*endpoint_base_port:\s*)\d+", rf"\g<1>{endpoint_port}", text)
    if n != 1:
        return None
    config = Path(state) / "dual_deploy.yaml"
    config.write_text(moved)
    gcs_port = benchlib.free_port()
    env = {"GCS_PORT": str(gcs_port), "DUAL_DEPLOY_CONFIG": str(config)}
    return env, {"gcs_port": gcs_port, "endpoint_port": endpoint_port}


def run(timeout_s: float = TIMEOUT_S, free_ports: bool = False) -> dict:
    state = tempfile.mkdtemp(prefix="bench-e2e-state-")
    env = {**os.environ, "STATE_DIR": state, "DUAL_DEPLOY_STATE_DIR": state}
    data_existed = (benchlib.ROOT / "data" / "flowers").is_dir()
    log_path = Path(state).with_name(Path(state).name + ".log")
    result: dict = {"state_dir": "fresh temporary folder", "sample_data_generated": not data_existed,
                    "ports": {"gcs_port": PORTS[0], "endpoint_port": PORTS[1]}}
    busy = [p for p in PORTS if benchlib.port_in_use(p)]
    if busy or free_ports:
        # A developer's `make run` (its endpoint stays up) holds the standard ports: run beside it.
        other = _other_ports(state)
        if other is None:
            shutil.rmtree(state, ignore_errors=True)
            return {"skipped": f"port(s) {', '.join(map(str, busy))} in use and endpoint_base_port not found in {CONFIG}"}
        env.update(other[0])
        result["ports"] = other[1]
        result["ports_note"] = (f"standard port(s) {', '.join(map(str, busy))} were in use; ran on free ports"
                                if busy else "--free-ports")
    try:
        benchlib.log(f"e2e: bash scripts/run_local.sh (log {log_path})")
        t0 = time.perf_counter()
        with open(log_path, "wb") as logf:
            try:
                proc = subprocess.run(["bash", "scripts/run_local.sh"], cwd=benchlib.ROOT, env=env,
                                      stdout=logf, stderr=subprocess.STDOUT, timeout=timeout_s)
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                rc = None
        wall = time.perf_counter() - t0
        result.update(wall_s=wall, exit_code=rc)
        summary_path = Path(state) / "run_summary.json"
        if summary_path.is_file():
            summary = json.loads(summary_path.read_text())
            steps = summary.get("steps") or {}
            result["status"] = summary.get("status")
            result["steps_s"] = {k: v.get("duration_s") for k, v in steps.items() if isinstance(v, dict)}
            result["dag_steps_s"] = sum(v for v in result["steps_s"].values() if v)
        else:
            result["status"] = "no run summary"
        if rc != 0:
            result["error"] = "timed out" if rc is None else f"scripts/run_local.sh exited {rc}"
            result["log_tail"] = log_path.read_text(errors="replace")[-3000:]
    finally:
        stop = subprocess.run(["make", "stop"], cwd=benchlib.ROOT, env=env, capture_output=True, text=True)
        result["make_stop"] = (stop.stdout + stop.stderr).strip()[-500:]
        shutil.rmtree(state, ignore_errors=True)
        log_path.unlink(missing_ok=True)
    benchlib.log(f"e2e: {result.get('wall_s', 0):.0f} s, status {result.get('status')}")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--free-ports", action="store_true", help="run on free ports even if 9023/8501 are free")
    p.add_argument("--out")
    a = p.parse_args(argv)
    res = run(free_ports=a.free_ports)
    benchlib.emit(res, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

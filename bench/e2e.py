"""Local end-to-end wall time: ``bash scripts/run_local.sh`` (what ``make run`` runs) on a fresh state.

Fresh state: ``STATE_DIR`` and ``DUAL_DEPLOY_STATE_DIR`` point at a new temporary folder, so the
GCS emulator's data, the Airflow SQLite database (``airflow db migrate`` included) and the endpoint
registry start empty and a developer's ``.state/`` is left alone. The run uses the local platform's
ports (GCS emulator 9023, local Vertex AI server 9010 and 9011); when one is taken (a developer's
``make run`` leaves the local cloud up) it runs on free ports instead (``GCS_PORT``, ``VERTEX_PORT``),
never against someone else's servers. ``make stop`` (with the same state folder) always runs
afterwards, then the folder is deleted. Reported: wall seconds, exit status, each
set-up step of scripts/run_local.sh (its ``==>`` lines, timed as they are printed), the run summary's
status, accuracy and each DAG step's duration, the DAG run's wall time and each target branch's span
(from the run's Airflow DB: the branches run side by side), and each trainer process's own phases
(training_config.json).

``python bench/e2e.py [--free-ports] [--out FILE]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import benchlib

PORTS = {"GCS_PORT": 9023, "VERTEX_PORT": 9010}  # scripts/local_env.sh; the Vertex AI server's REST is on +1
TIMEOUT_S = 45 * 60


def _ports_busy() -> list[int]:
    return [p for p in (PORTS["GCS_PORT"], PORTS["VERTEX_PORT"], PORTS["VERTEX_PORT"] + 1) if benchlib.port_in_use(p)]


def _free_ports() -> dict[str, str]:
    """GCS_PORT and VERTEX_PORT (with VERTEX_PORT + 1 free too) that nothing listens on."""
    gcs = benchlib.free_port()
    while True:
        vertex = benchlib.free_port()
        if vertex != gcs and vertex + 1 != gcs and not benchlib.port_in_use(vertex + 1):
            return {"GCS_PORT": str(gcs), "VERTEX_PORT": str(vertex)}


def _trainer_phases(state: str) -> dict:
    """Per target, the trainer's own phase timings (training_config.json the job wrote to its model
    folder, read from the GCS emulator's files in the state folder)."""
    out = {}
    for path in sorted(Path(state, "gcs").rglob("training_config.json")):
        target = path.parent.parent.name  # runs/<run>/<target>/model/training_config.json
        try:
            timings = json.loads(path.read_text()).get("timings") or {}
        except (OSError, ValueError):
            continue
        out[target] = {"total_s": timings.get("total_seconds"),
                       "phases_s": {k: v.get("wall_s") for k, v in (timings.get("phases") or {}).items()}}
    return out


def _branch_spans(state: str) -> dict:
    """The DAG run's wall time and each target branch's span (its first task's start to its last task's
    end) from the run's Airflow DB: the branches run side by side, so their task durations overlap."""
    import sqlite3
    from datetime import datetime

    db_path = Path(state, "airflow", "airflow.db")
    if not db_path.is_file():
        return {}
    db = sqlite3.connect(db_path)
    try:
        run = db.execute("SELECT start_date, end_date FROM dag_run WHERE dag_id = 'dual_deployment' "
                         "ORDER BY start_date DESC LIMIT 1").fetchone()
        tasks = db.execute("SELECT task_id, start_date, end_date FROM task_instance WHERE dag_id = 'dual_deployment' "
                           "AND start_date IS NOT NULL AND end_date IS NOT NULL").fetchall()
    finally:
        db.close()
    if not run or not run[1]:
        return {}
    ts = datetime.fromisoformat
    branches: dict[str, list] = {}
    for task_id, start, end in tasks:
        if "." in task_id:
            b = branches.setdefault(task_id.split(".", 1)[0], [ts(start), ts(end)])
            b[0], b[1] = min(b[0], ts(start)), max(b[1], ts(end))
    return {"dag_run_s": round((ts(run[1]) - ts(run[0])).total_seconds(), 1),
            "branches_s": {k: round((e - s).total_seconds(), 1) for k, (s, e) in sorted(branches.items())}}


def run(timeout_s: float = TIMEOUT_S, free_ports: bool = False) -> dict:
    state = tempfile.mkdtemp(prefix="bench-e2e-state-")
    env = {**os.environ, "STATE_DIR": state, "DUAL_DEPLOY_STATE_DIR": state}
    data_existed = (benchlib.ROOT / "data" / "flowers").is_dir()
    log_path = Path(state).with_name(Path(state).name + ".log")
    result: dict = {"state_dir": "fresh temporary folder", "sample_data_generated": not data_existed,
                    "ports": dict(PORTS)}
    busy = _ports_busy()
    if busy or free_ports:
        # A developer's `make run` / `make serve` holds the standard ports: run beside it.
        ports = _free_ports()
        env.update(ports)
        result["ports"] = {k: int(v) for k, v in ports.items()}
        result["ports_note"] = (f"standard port(s) {', '.join(map(str, busy))} were in use; ran on free ports"
                                if busy else "--free-ports")
    try:
        benchlib.log(f"e2e: bash scripts/run_local.sh (log {log_path})")
        t0 = time.perf_counter()
        marks: list[tuple[str, float]] = []  # run_local.sh's "==> step" lines, timed as they come
        rc = None
        with open(log_path, "wb") as logf:
            proc = subprocess.Popen(["bash", "scripts/run_local.sh"], cwd=benchlib.ROOT, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            try:
                for line in proc.stdout:
                    logf.write(line)
                    if line.startswith(b"==> "):
                        marks.append((line[4:].decode(errors="replace").split(" (")[0].strip(),
                                      time.perf_counter() - t0))
                    if time.perf_counter() - t0 > timeout_s:
                        proc.kill()
                        break
                rc = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        wall = time.perf_counter() - t0
        result.update(wall_s=wall, exit_code=rc)
        # Set-up steps: each "==>" step lasts until the next; the DAG run until the script ends.
        bounds = [m[1] for m in marks[1:]] + [wall] if marks else []
        result["script_steps_s"] = {name: round(end - start, 1) for (name, start), end in zip(marks, bounds, strict=True)}
        result["before_first_step_s"] = round(marks[0][1], 1) if marks else None
        summary_path = Path(state) / "run_summary.json"
        if summary_path.is_file():
            summary = json.loads(summary_path.read_text())
            steps = summary.get("steps") or {}
            result["status"] = summary.get("status")
            result["steps_s"] = {k: v.get("duration_s") for k, v in steps.items() if isinstance(v, dict)}
            result["dag_steps_s"] = sum(v for v in result["steps_s"].values() if v)
            result["accuracy"] = {t: (v.get("metrics") or {}).get("accuracy")
                                  for t, v in (summary.get("targets") or {}).items() if isinstance(v, dict)}
        else:
            result["status"] = "no run summary"
        result["trainer_phases"] = _trainer_phases(state)
        result.update(_branch_spans(state))
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
    p.add_argument("--free-ports", action="store_true", help="run on free ports even if 9023/9010/9011 are free")
    p.add_argument("--out")
    a = p.parse_args(argv)
    res = run(free_ports=a.free_ports)
    benchlib.emit(res, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

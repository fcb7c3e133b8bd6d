"""scripts/dags_test.sh, what ``make run`` runs the DAG with: ``airflow dags test --use-executor`` beside an
Execution API server and a triggerer, on a throw-away AIRFLOW_HOME (SQLite, migrated first).

A probe DAG has two deferrable sensors side by side and a task after them. The script must run the
independent sensors at the same time, each wait in the triggerer (not inline), and resume them; and a
run whose triggerer dies must end at once with a clear error instead of waiting for ever on a deferred
task.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "dags_test.sh"
DAG = textwrap.dedent('''
    from datetime import timedelta

    import pendulum
    from airflow.providers.standard.operators.empty import EmptyOperator
    from airflow.providers.standard.sensors.date_time import DateTimeSensorAsync
    from airflow.sdk import dag

    WAIT = "{{{{ (dag_run.start_date + macros.timedelta(seconds={wait_s})).isoformat() }}}}"

    @dag(dag_id="deferral_probe", schedule=None, start_date=pendulum.datetime(2026, 1, 1), catchup=False)
    def probe():
        a = DateTimeSensorAsync(task_id="wait_a", target_time=WAIT)
        b = DateTimeSensorAsync(task_id="wait_b", target_time=WAIT)
        [a, b] >> EmptyOperator(task_id="after")

    probe()
''')


@pytest.fixture
def probe_env(tmp_path):
    def make(wait_s: int) -> dict[str, str]:
        home, dags = tmp_path / "home", tmp_path / "dags"
        dags.mkdir(exist_ok=True)
        (dags / "probe.py").write_text(DAG.format(wait_s=wait_s))
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
        env.update(AIRFLOW_HOME=str(home), AIRFLOW__CORE__DAGS_FOLDER=str(dags),
                   AIRFLOW__CORE__LOAD_EXAMPLES="False", AIRFLOW__CORE__UNIT_TEST_MODE="False",
                   DAGS_TEST_LOG_DIR=str(tmp_path / "logs"),
                   PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
        migrate = subprocess.run(["airflow", "db", "migrate"], env=env, capture_output=True, text=True, timeout=300)
        assert migrate.returncode == 0, migrate.stdout[-3000:] + migrate.stderr[-3000:]
        return env

    return make


def _spans(home: str) -> dict[str, tuple[float, float, str]]:
    def ts(value: str) -> float:
        return datetime.fromisoformat(value).replace(tzinfo=UTC).timestamp()

    db = sqlite3.connect(Path(home) / "airflow.db")
    try:
        rows = db.execute("SELECT task_id, start_date, end_date, state FROM task_instance").fetchall()
    finally:
        db.close()
    return {t: (ts(s) if s else 0.0, ts(e) if e else 0.0, state) for t, s, e, state in rows}


def test_independent_deferred_tasks_wait_side_by_side_in_the_triggerer(probe_env):
    env = probe_env(wait_s=8)
    run = subprocess.run(["bash", str(SCRIPT), "deferral_probe"], env=env, capture_output=True, text=True,
                         timeout=400)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    spans = _spans(env["AIRFLOW_HOME"])
    assert {t: s[2] for t, s in spans.items()} == {"wait_a": "success", "wait_b": "success", "after": "success"}
    (a0, a1, _), (b0, b1, _) = spans["wait_a"], spans["wait_b"]
    assert max(a0, b0) < min(a1, b1), spans  # both waits at once, not one after the other
    assert "running trigger in line" not in run.stdout + run.stderr
    logs = Path(env["AIRFLOW_HOME"]) / "logs" / "dag_id=deferral_probe"
    for task in ("wait_a", "wait_b"):  # the triggerer's own log of each trigger, beside the task's
        assert list(logs.glob(f"run_id=*/task_id={task}/attempt=1.log.trigger.*.log")), task
    # Nothing outlives the run: the API server and the triggerer are stopped with it.
    assert not [p for p in psutil.process_iter(["cmdline", "environ"])
                if "triggerer" in " ".join(p.info["cmdline"] or [])
                and (p.info["environ"] or {}).get("AIRFLOW_HOME") == env["AIRFLOW_HOME"]]


def _cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:  # exited meanwhile (a zombie until its parent reaps it)
        return ""


def test_a_dead_triggerer_ends_the_run_with_an_error_instead_of_a_hang(probe_env, tmp_path):
    env = probe_env(wait_s=3600)
    out_path, err_path = tmp_path / "out.log", tmp_path / "err.log"
    # Files, not pipes: the run logs every second, and a full pipe would block it (a hang of the test's own).
    with open(out_path, "w") as out_f, open(err_path, "w") as err_f:
        proc = subprocess.Popen(["bash", str(SCRIPT), "deferral_probe"], env=env, stdout=out_f, stderr=err_f,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # until both sensors are deferred
            spans = _spans(env["AIRFLOW_HOME"]) if (Path(env["AIRFLOW_HOME"]) / "airflow.db").exists() else {}
            if sum(s[2] == "deferred" for s in spans.values()) == 2:
                break
            assert proc.poll() is None, err_path.read_text()[-3000:]
            time.sleep(0.5)
        else:
            pytest.fail("the sensors never deferred")
        triggerer = [p for p in psutil.Process(proc.pid).children(recursive=True) if "triggerer" in _cmdline(p)]
        assert triggerer, [_cmdline(p) for p in psutil.Process(proc.pid).children(recursive=True)]
        for p in triggerer:
            p.kill()
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the script and everything it started
            proc.wait()
    out, err = out_path.read_text(errors="replace"), err_path.read_text(errors="replace")
    assert proc.returncode == 3, out[-2000:] + err[-2000:]
    assert "ERROR: the triggerer (pid" in err and "exited during the run" in err, err[-2000:]

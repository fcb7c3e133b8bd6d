"""`make run` progress: ``python -m dual_deploy.progress db`` follows a real run of scripts/dags_test.sh.

A three-task DAG (one task skipped by a short-circuit) runs under scripts/dags_test.sh on a
throw-away AIRFLOW_HOME (SQLite, migrated first) while the follower watches that database, exactly as
scripts/run_local.sh does it. It must print one line per finished task (state and duration) and the
run's outcome with the elapsed time. The API source is exercised by tests/test_ui_browser.py.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dual_deploy.progress import Snapshot, Task, follow, task_line

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parents[1]
DAG = textwrap.dedent('''
    import time
    import pendulum
    from airflow.providers.standard.operators.python import PythonOperator, ShortCircuitOperator
    from airflow.sdk import dag

    @dag(dag_id="progress_probe", schedule=None, start_date=pendulum.datetime(2026, 1, 1), catchup=False)
    def probe():
        first = PythonOperator(task_id="first", python_callable=lambda: time.sleep(1.5))
        gate = ShortCircuitOperator(task_id="gate", python_callable=lambda: False)
        after = PythonOperator(task_id="after_gate", python_callable=lambda: None)
        first >> gate >> after

    probe()
''')


def test_follow_prints_each_finished_task_once_then_the_outcome():
    snaps = iter([
        None,
        Snapshot("r1", "queued", []),
        Snapshot("r1", "running", [Task("a", -1, "success", 2.0, "2026-01-01T00:00:02"),
                                   Task("b", -1, "running", None, None)]),
        Snapshot("r1", "running", [Task("a", -1, "success", 2.0, "2026-01-01T00:00:02"),
                                   Task("b", -1, "failed", 61.25, "2026-01-01T00:01:03"),
                                   Task("c", 3, "upstream_failed", None, None)]),
        Snapshot("r1", "failed", [Task("a", -1, "success", 2.0, "2026-01-01T00:00:02"),
                                  Task("b", -1, "failed", 61.25, "2026-01-01T00:01:03"),
                                  Task("c", 3, "upstream_failed", None, None)]),
    ])

    class Source:
        def snapshot(self):
            return next(snaps)

    lines: list[str] = []
    assert follow(Source(), out=lines.append, interval_s=0) == "failed"
    assert [line.split("] ", 1)[1].split()[:3] for line in lines] == [
        ["run", "r1", "queued"], ["run", "r1", "started"], ["a", "success", "2.0"], ["b", "failed", "61.2"],
        ["c[3]", "upstream_failed", "-"], ["run", "r1:", "failed"]]
    assert lines[-1].endswith("(3 tasks, 0:00 elapsed)"), lines[-1]
    assert task_line(Task("x", -1, "success", 5.0, None), 3725).startswith("[1:02:05] x")


@pytest.mark.slow
def test_db_follower_reports_a_real_dags_test_run(tmp_path):
    home, dags = tmp_path / "home", tmp_path / "dags"
    dags.mkdir()
    (dags / "probe.py").write_text(DAG)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(AIRFLOW_HOME=str(home), AIRFLOW__CORE__DAGS_FOLDER=str(dags), AIRFLOW__CORE__LOAD_EXAMPLES="False",
               AIRFLOW__CORE__UNIT_TEST_MODE="False", PYTHONPATH=str(ROOT / "plugins"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    airflow = str(Path(sys.executable).parent / "airflow")
    migrate = subprocess.run([airflow, "db", "migrate"], env=env, capture_output=True, text=True, timeout=300)
    assert migrate.returncode == 0, migrate.stdout[-3000:] + migrate.stderr[-3000:]

    follower = subprocess.Popen([sys.executable, "-m", "dual_deploy.progress", "--interval", "0.5", "db",
                                 str(home / "airflow.db"), "--dag", "progress_probe"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        run = subprocess.run(["bash", str(ROOT / "scripts" / "dags_test.sh"), "progress_probe"],
                             env={**env, "DAGS_TEST_LOG_DIR": str(tmp_path / "logs")}, capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        out, err = follower.communicate(timeout=30)  # it exits by itself once the run is done
    finally:
        if follower.poll() is None:
            follower.send_signal(signal.SIGTERM)
            follower.wait(10)
    lines = out.splitlines()
    assert follower.returncode == 0, out + err
    lines = [line for line in lines if not line.endswith(" queued (waits for an earlier run or a free slot)")]
    assert re.fullmatch(r"\[ *\d+:\d\d\] run manual__\S+ started", lines[0]), lines
    tasks = {m.group(1): (m.group(2), m.group(3)) for line in lines[1:-1]
             if (m := re.fullmatch(r"\[ *\d+:\d\d\] (\S+) +(\S+) +([\d.]+ s|-)", line.strip()))}
    assert set(tasks) == {"first", "gate", "after_gate"} and len(lines) == 5, lines
    assert tasks["first"][0] == "success" and float(tasks["first"][1].split()[0]) >= 1.5, tasks
    assert tasks["gate"][0] == "success" and tasks["after_gate"][0] == "skipped", tasks
    assert re.fullmatch(r"\[ *\d+:\d\d\] run manual__\S+: success \(3 tasks, \d+:\d\d elapsed\)", lines[-1]), lines

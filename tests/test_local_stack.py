"""`make down` / `make up` bookkeeping of plugins/dual_deploy/local_stack.py, on real processes (fast).

The whole stack (Airflow components, browser) is exercised by tests/test_ui_browser.py and
tests/test_triggers_e2e.py; here: what `down` stops and what it must never touch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from dual_deploy.local_stack import MARKER_VAR, Component, LocalStack, Ports, StackError, alive, start_time

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


def _spawn(env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen(SLEEPER, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, **kw)


@pytest.fixture
def procs():
    started: list[subprocess.Popen] = []
    yield started
    for p in started:  # whatever a failing test left
        if p.poll() is None:
            p.kill()
        p.wait()


def test_down_stops_groups_pid_files_and_marked_stragglers_but_not_a_recycled_pid(tmp_path, procs):
    stack = LocalStack(tmp_path, base_env={})
    marked_env = {**os.environ, MARKER_VAR: stack.marker}
    # A component leading its own group, with a child in that group (a task worker).
    child_pid_file = tmp_path / "child.pid"
    leader = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                               "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
                               f"open({str(child_pid_file)!r}, 'w').write(str(c.pid)); time.sleep(120)"],
                              env=marked_env, start_new_session=True)
    deadline = time.monotonic() + 30
    while not (child_pid_file.exists() and child_pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    child_pid = int(child_pid_file.read_text())
    # A process that made its own session but carries the marker (the serving app a deploy task starts).
    straggler = _spawn(marked_env, start_new_session=True)
    # The local cloud, tracked by a pid file like `make run` writes.
    cloud = _spawn(start_new_session=True)
    # A recorded component whose pid now belongs to someone else (start time differs): never signalled.
    bystander = _spawn(start_new_session=True)
    procs += [leader, straggler, cloud, bystander]
    stack.components = {"scheduler": Component("scheduler", leader.pid, start_time(leader.pid)),
                        "api-server": Component("api-server", bystander.pid, start_time(bystander.pid) - 1)}
    stack._save()
    (tmp_path / "pids").mkdir()
    (tmp_path / "pids" / "gcs-emulator.pid").write_text(json.dumps({"pid": cloud.pid, "port": 1}))

    again = LocalStack(tmp_path, base_env={})  # `make down` is another process: it reads stack.json
    assert again.running() == {"scheduler": True, "api-server": False}
    stopped, left = again.down()

    assert left == []
    assert "scheduler" in stopped and "gcs-emulator" in stopped and f"pid {straggler.pid}" in stopped, stopped
    for p in (leader, straggler, cloud):
        p.wait(timeout=10)
    assert not alive(child_pid), "the component's child (same process group) survived"
    assert alive(bystander.pid), "down signalled a pid that is no longer its process"
    assert not (tmp_path / "up" / "stack.json").exists() and not list((tmp_path / "pids").iterdir())
    assert LocalStack(tmp_path, base_env={}).down() == ([], [])  # nothing left: a second down is a no-op


def test_execution_api_url_and_log_ports_follow_the_configured_ports(tmp_path):
    ports = Ports.from_env({"API_PORT": "8090", "GCS_PORT": "9024", "LOG_PORT": "8795", "TRIGGER_LOG_PORT": ""})
    assert ports == Ports(api=8090, gcs=9024, worker_log=8795, trigger_log=8794)
    env = LocalStack(tmp_path, ports=ports, base_env={"AIRFLOW__CORE__PARALLELISM": "2"}).env()
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://127.0.0.1:8090/execution/"
    assert env["AIRFLOW__API__PORT"] == "8090" and env["STORAGE_EMULATOR_HOST"] == "http://127.0.0.1:9024"
    assert env["AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT"] == "8795"
    assert env["AIRFLOW_HOME"] == str(tmp_path.resolve() / "airflow-up")
    assert env["AIRFLOW__CORE__PARALLELISM"] == "2"  # the caller's setting wins over the stack's default
    # One secret for every component, kept across restarts (else task tokens are "invalid").
    assert LocalStack(tmp_path, base_env={}).env()["AIRFLOW__API_AUTH__JWT_SECRET"] == \
        env["AIRFLOW__API_AUTH__JWT_SECRET"]


def test_up_refuses_busy_ports_and_says_how_to_pick_others(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        stack = LocalStack(tmp_path, ports=Ports(api=busy, gcs=1, worker_log=2, trigger_log=3), base_env={})
        with pytest.raises(StackError, match=rf"API_PORT={busy}.*make up API_PORT="):
            stack.start_airflow()
    assert stack.components == {}

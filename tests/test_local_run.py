"""`make run` / `make stop` / `make serve` guarantees that need no training (issue 15 items 1 and 7):
one run at a time per state folder, and the console says what actually serves, flagging a summary the
endpoint does not match (e.g. after `make stop`)."""

from __future__ import annotations

import fcntl
import os
import subprocess
from pathlib import Path

from dual_deploy.local_platform import check_serving, serving_lines

ROOT = Path(__file__).resolve().parents[1]

SUMMARY = {"targets": {
    "cloud": {"kind": "endpoint", "endpoint": {"endpoint_id": "22", "model_version_id": "2"}},
    "mobile": {"kind": "mobile", "published": {"version": 1}},
}}
EP = "projects/local-project/locations/us-central1/endpoints/22"
MODEL = "projects/local-project/locations/us-central1/models/7"


def _state(split: dict[str, int], ready: bool = True) -> dict:
    return {
        "endpoints": [{"name": EP, "display_name": "flowers-cloud-endpoint", "traffic_split": split,
                       "deployed_models": [{"id": "100", "model": MODEL, "model_version_id": "1"},
                                           {"id": "200", "model": MODEL, "model_version_id": "2"}]}],
        "model_versions": [{"name": MODEL, "version_id": v, "display_name": "flowers-densenet121"} for v in "12"],
        "replicas": {f"{EP}/100": [{"ready": ready}], f"{EP}/200": [{"ready": ready}]},
    }


def test_what_serves_matches_the_summary():
    assert check_serving(SUMMARY, _state({"200": 100})) == []
    assert serving_lines(_state({"200": 100})) == [
        "endpoint flowers-cloud-endpoint: flowers-densenet121 v1 0 % (1/1 replicas ready), "
        "flowers-densenet121 v2 100 % (1/1 replicas ready)"]


def test_a_summary_the_endpoint_does_not_serve_is_flagged():
    [problem] = check_serving(SUMMARY, _state({"100": 100}))
    assert "summary says version 2 serves" in problem and "serves ['1']" in problem
    [stopped] = check_serving(SUMMARY, None)
    assert "not running: nothing answers (make serve)" in stopped
    assert "make serve" in serving_lines(None)[0]


def test_a_second_make_run_on_the_same_state_is_refused(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "pids").mkdir()
    (state / "pids" / "make-run.pid").write_text('{"pid": 4242}')
    with open(state / "make-run.lock", "w") as held:  # a make run in progress holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc = subprocess.run(["bash", str(ROOT / "scripts" / "run_local.sh"), str(tmp_path / "no-data")],
                              env={**os.environ, "STATE_DIR": str(state)}, capture_output=True, text=True,
                              timeout=120)
    assert proc.returncode == 1
    assert "Another make run is using" in proc.stderr and "4242" in proc.stderr and "make stop" in proc.stderr
    assert not (state / "logs" / "dags-test.log").exists()  # refused before doing anything

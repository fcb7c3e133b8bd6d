"""The real error reaches the user (issue 15 item 5), end to end on a real Airflow task runner.

``airflow dags test dual_deployment`` on unusable data (the environment and config of
tests/test_dag_run_local.py): the failing task's ``on_failure_callback`` (dag_helpers.DEFAULT_ARGS)
pushes its message, ``run_summary`` puts it first in ``run_summary.json``, and
``python -m dual_deploy.local_platform show-summary`` (what `make run` prints) shows it, instead
of pointing at ``cloud.train``. Slow: each case is one Airflow run (no training happens).
"""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest
from test_dag_run_local import VENV_BIN, _base_env, _dags_test, _tail, _write_config

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _dataset(tmp: Path, case: str) -> Path:
    from dualml import sample_data

    local = tmp / "data"
    local.mkdir()
    if case == "corrupt_files":
        sample_data.generate(local, per_class=10, size=32, seed=3, classes=("daisy", "roses"))
        for k in range(2):  # 2 of 20 = 10 % > data.max_bad_fraction (2 %)
            (local / "roses" / f"roses_{k:04d}.jpg").write_bytes(b"\xff\xd8 truncated, not a jpeg")
    return local


@pytest.fixture(scope="module")
def airflow_env(gcs_emulator, localcloud, tmp_path_factory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("airflow_home")
    env = _base_env(gcs_emulator, home, localcloud)
    proc = subprocess.run([str(VENV_BIN / "airflow"), "db", "migrate"], env=env, cwd=home,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"airflow db migrate failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return env


# One class: tests/test_dag_run_local.py::test_run_on_single_class_data_fails_before_training.
@pytest.mark.parametrize(("case", "expected"), [
    ("corrupt_files", ["2 of 20 images are unreadable", "roses_0000.jpg"]),
])
def test_the_first_failure_and_its_message_are_what_the_user_sees(airflow_env, gcs_emulator, tmp_path, case,
                                                                  expected):
    from dual_deploy.local_platform import upload_dataset

    bucket = f"dd-fail-{uuid.uuid4().hex[:10]}"
    state_dir = tmp_path / "state"
    config = _write_config(tmp_path / "dual_deploy.yaml", bucket, state_dir)
    data_uri = f"gs://{bucket}/datasets/{case}"
    upload_dataset(str(_dataset(tmp_path, case)), data_uri)
    log = tmp_path / "dags-test.log"
    rc = _dags_test(airflow_env, config, data_uri, log, timeout_s=300)
    assert rc != 0, _tail(log)

    path = state_dir / "run_summary.json"
    assert path.exists(), f"no summary after a failed validation:\n{_tail(log)}"
    summary = json.loads(path.read_text())
    assert summary["status"] == "failed"
    ff = summary["first_failure"]
    assert ff["task_id"] == "validate_dataset", ff
    for needle in expected:
        assert needle in ff["message"], ff["message"]
    for t in summary["targets"].values():
        assert t["status"] == "failed" and t["failed_steps"] == [] and t["cause"] == ff

    console = subprocess.run([str(VENV_BIN / "python"), "-m", "dual_deploy.local_platform", "show-summary", str(path)],
                             env={**airflow_env, "DUAL_DEPLOY_CONFIG": str(config)}, capture_output=True, text=True,
                             timeout=120, cwd=ROOT)
    assert console.returncode == 0, console.stderr
    head = console.stdout.splitlines()[:3]
    assert head[0].endswith(": FAILED") and head[1] == "  FAILED at validate_dataset:", console.stdout
    assert all(needle in head[2] for needle in expected), console.stdout
    assert "[cloud] not run: validate_dataset failed" in console.stdout
    assert ".train" not in console.stdout, console.stdout

"""Local Vertex AI server, JobService: custom jobs through the Google provider's unmodified hooks and
trigger (real aiplatform_v1 clients serializing every request over gRPC to emulators/localcloud).

Jobs here run tiny ``python -c`` commands (container_spec.command overrides the trainer image's
entrypoint, as in a container); the trainer itself runs in test_localcloud_trainer.py (slow).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import urllib.error
import uuid
from pathlib import Path

import pytest

PROJECT, REGION = "local-project", "us-central1"
PARENT = f"projects/{PROJECT}/locations/{REGION}"
TRAINER_IMAGE = "us-central1-docker.pkg.dev/local-project/dual-deploy/trainer:test"
MACHINE = {"machine_type": "n1-standard-4"}


@pytest.fixture(scope="module")
def hook(localcloud):
    from airflow.providers.google.cloud.hooks.vertex_ai.custom_job import CustomJobHook

    return CustomJobHook()


def _pool(code: str, *args: str, replicas: int = 1, env: dict | None = None, image: str = TRAINER_IMAGE) -> dict:
    return {
        "machine_spec": MACHINE,
        "replica_count": replicas,
        "container_spec": {"image_uri": image, "command": [sys.executable, "-c", code], "args": list(args),
                           "env": [{"name": k, "value": v} for k, v in (env or {}).items()]},
    }


def _job(pools: list[dict], *, labels: dict | None = None, name: str = "", output: str | None = None) -> dict:
    spec: dict = {"worker_pool_specs": pools}
    if output:
        spec["base_output_directory"] = {"output_uri_prefix": output}
    return {"display_name": name or f"lc-test-{uuid.uuid4().hex[:8]}", "labels": labels or {}, "job_spec": spec}


def _create(hook, job: dict):
    return hook.create_custom_job(project_id=PROJECT, region=REGION, custom_job=job)


def _id(job) -> str:
    return job.name.rsplit("/", 1)[-1]


def _wait(hook, job, states: set[str], timeout: float = 60, seen: list | None = None):
    deadline = time.monotonic() + timeout
    while True:
        got = hook.get_custom_job(project_id=PROJECT, region=REGION, custom_job=_id(job))
        if seen is not None and (not seen or seen[-1] != got.state.name):
            seen.append(got.state.name)
        if got.state.name in states:
            return got
        assert time.monotonic() < deadline, f"job {got.name} still {got.state.name} after {timeout} s"
        time.sleep(0.1)


def _wait_for_file(path: Path, timeout: float = 30, lines: int = 1) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            content = path.read_text().splitlines()
            if len(content) >= lines:
                return content
        time.sleep(0.1)
    raise AssertionError(f"{path} did not get {lines} line(s) within {timeout} s")


def _stored(localcloud, job) -> dict:
    return next(j for j in localcloud.state()["custom_jobs"] if j["name"] == job.name)


# ---------------------------------------------------------------- lifecycle


def test_job_runs_through_vertex_states_with_timestamps(hook, localcloud):
    created = _create(hook, _job([_pool("import time; time.sleep(1.5)")]))
    assert created.state.name == "JOB_STATE_QUEUED"
    assert created.name.startswith(f"{PARENT}/customJobs/") and _id(created).isdigit()
    assert created.create_time and not created.start_time and not created.end_time

    seen: list[str] = []
    done = _wait(hook, created, {"JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED"}, seen=seen)
    assert done.state.name == "JOB_STATE_SUCCEEDED", done.error
    order = ["JOB_STATE_QUEUED", "JOB_STATE_PENDING", "JOB_STATE_RUNNING", "JOB_STATE_SUCCEEDED"]
    assert "JOB_STATE_RUNNING" in seen and [order.index(s) for s in seen] == sorted(order.index(s) for s in seen)
    assert done.create_time <= done.start_time <= done.end_time == done.update_time
    assert (done.end_time - done.start_time).total_seconds() >= 1.4  # RUNNING while the process ran
    assert not done.error.message and done.error.code == 0
    # The provider's synchronous wait agrees, and the server's stored record is the same job.
    assert hook.wait_for_custom_job(project_id=PROJECT, region=REGION, custom_job_id=_id(created),
                                    poll_interval=1).state.name == "JOB_STATE_SUCCEEDED"
    assert _stored(localcloud, created)["state"] == "JOB_STATE_SUCCEEDED"
    # Every transition is in the server log, in Vertex's order.
    log = [line for line in localcloud.tail(400).splitlines() if f"custom job {_id(created)}:" in line]
    assert [line.rsplit(": ", 1)[-1] for line in log] == order[1:]


def test_nonzero_exit_fails_the_job_with_vertex_message(hook, localcloud):
    code = "import sys; print('bad data: no images', flush=True); sys.exit(2)"
    job = _create(hook, _job([_pool(code)]))
    done = _wait(hook, job, {"JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED"})
    assert done.state.name == "JOB_STATE_FAILED"
    assert done.error.message.startswith("The replica workerpool0-0 exited with a non-zero status of 2.")
    assert "bad data: no images" in done.error.message  # the log tail, to find out why
    assert done.error.code != 0 and done.end_time
    with pytest.raises(RuntimeError, match="exited with a non-zero status of 2"):
        hook.wait_for_custom_job(project_id=PROJECT, region=REGION, custom_job_id=_id(job), poll_interval=1)


def test_cancel_stops_the_process_and_ends_cancelled(hook, localcloud, tmp_path):
    from google.api_core.exceptions import FailedPrecondition

    pid_file = tmp_path / "pid"
    code = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(120)"
    job = _create(hook, _job([_pool(code, str(pid_file))]))
    pid = int(_wait_for_file(pid_file)[0])
    assert _wait(hook, job, {"JOB_STATE_RUNNING"}).state.name == "JOB_STATE_RUNNING"

    hook.cancel_custom_job(project_id=PROJECT, region=REGION, custom_job=_id(job))
    done = _wait(hook, job, {"JOB_STATE_CANCELLED"}, timeout=30)
    assert done.error.code == 1  # google.rpc.Code.CANCELLED, as Vertex AI documents for cancelled jobs
    assert done.end_time
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid), "the cancelled job's process is still running"
    with pytest.raises(FailedPrecondition):
        hook.cancel_custom_job(project_id=PROJECT, region=REGION, custom_job=_id(job))
    with pytest.raises(RuntimeError, match="cancelled"):
        hook.wait_for_custom_job(project_id=PROJECT, region=REGION, custom_job_id=_id(job), poll_interval=1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


# ---------------------------------------------------------------- environment


DUMP_ENV = "import json, os, sys; open(sys.argv[1], 'w').write(json.dumps(dict(os.environ)))"


def _server_environ(localcloud) -> dict[str, str]:
    raw = Path(f"/proc/{localcloud.info['pid']}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def test_job_environment_is_vertex_not_the_callers(hook, localcloud, gcs_emulator, tmp_path):
    out = tmp_path / "env.json"
    job = _create(hook, _job([_pool(DUMP_ENV, str(out), env={"EXTRA": "from-spec"})],
                             output="gs://lc-bucket/runs/r1"))
    done = _wait(hook, job, {"JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED"})
    assert done.state.name == "JOB_STATE_SUCCEEDED", done.error.message
    env = json.loads(out.read_text())

    assert env["AIP_MODEL_DIR"] == "gs://lc-bucket/runs/r1/model/"
    assert env["AIP_CHECKPOINT_DIR"] == "gs://lc-bucket/runs/r1/checkpoints/"
    assert env["AIP_TENSORBOARD_LOG_DIR"] == "gs://lc-bucket/runs/r1/logs/"
    assert env["CLOUD_ML_JOB_ID"] == _id(job)
    assert env["STORAGE_EMULATOR_HOST"] == gcs_emulator  # GCS is reachable from a job, as on GCP
    assert env["EXTRA"] == "from-spec"  # container_spec.env
    assert env["PYTHONPATH"].endswith("/include")  # the trainer image mapping's env (emulators/localcloud.yaml)
    assert "TF_CONFIG" not in env and "CLUSTER_SPEC" not in env  # one replica

    # Nothing of the server's (= the Airflow caller's) environment leaks, beyond a few basics.
    server_env = _server_environ(localcloud)
    assert "AIRFLOW_HOME" in server_env  # set by tests/conftest.py before the server started
    passthrough = {"PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "STORAGE_EMULATOR_HOST"}
    leaked = {k for k in server_env if k in env and k not in passthrough and env[k] == server_env[k]}
    assert leaked == set(), f"caller environment leaked into the job: {sorted(leaked)}"
    assert not [k for k in env if k.startswith("AIRFLOW")]


def test_two_replicas_get_tf_config_and_cluster_spec(hook, localcloud, tmp_path):
    dump = ("import os, sys, time; open(sys.argv[1], 'w').write(os.environ['TF_CONFIG'] + '\\n' + "
            "os.environ['CLUSTER_SPEC']); time.sleep(float(sys.argv[2]))")
    chief_out, worker_out = tmp_path / "chief", tmp_path / "worker"
    # The worker would run for a minute: the job succeeds when the chief exits, and Vertex AI then
    # shuts the other workers down.
    job = _create(hook, _job([_pool(dump, str(chief_out), "1"), _pool(dump, str(worker_out), "60")],
                             output="gs://lc-bucket/runs/r2"))
    done = _wait(hook, job, {"JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED"}, timeout=60)
    assert done.state.name == "JOB_STATE_SUCCEEDED", done.error.message
    assert (done.end_time - done.start_time).total_seconds() < 30

    chief_tf, chief_cs = (json.loads(x) for x in chief_out.read_text().splitlines())
    worker_tf, worker_cs = (json.loads(x) for x in worker_out.read_text().splitlines())
    assert chief_tf["task"] == {"type": "chief", "index": 0, "trial": ""}
    assert worker_tf["task"] == {"type": "worker", "index": 0, "trial": ""}
    cluster = chief_tf["cluster"]
    assert cluster == worker_tf["cluster"] and set(cluster) == {"chief", "worker"}
    addresses = cluster["chief"] + cluster["worker"]
    assert len(addresses) == len(set(addresses)) == 2
    assert all(a.startswith("127.0.0.1:") and a.rsplit(":", 1)[1].isdigit() for a in addresses)
    assert chief_tf["environment"] == "cloud"
    assert chief_cs == {"cluster": {"workerpool0": cluster["chief"], "workerpool1": cluster["worker"]},
                        "environment": "cloud", "task": {"type": "workerpool0", "index": 0}}
    assert worker_cs["task"] == {"type": "workerpool1", "index": 0}


def test_a_failing_worker_fails_the_job(hook, localcloud):
    job = _create(hook, _job([_pool("import time; time.sleep(60)"), _pool("import sys; sys.exit(3)")]))
    done = _wait(hook, job, {"JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED"}, timeout=60)
    assert done.state.name == "JOB_STATE_FAILED"
    assert done.error.message.startswith("The replica workerpool1-0 exited with a non-zero status of 3.")


# ---------------------------------------------------------------- list, validation


def test_list_custom_jobs_with_label_and_state_filters(hook, localcloud):
    from google.api_core.exceptions import InvalidArgument

    run = f"r{uuid.uuid4().hex[:10]}"
    ok = [_create(hook, _job([_pool("pass")], labels={"run": run, "target": t})) for t in ("cloud", "mobile")]
    bad = _create(hook, _job([_pool("import sys; sys.exit(1)")], labels={"run": run, "target": "cloud"}))
    other = _create(hook, _job([_pool("pass")], labels={"run": "someone-else"}))
    for j in ok + [bad, other]:
        _wait(hook, j, {"JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED"})

    def names(flt: str) -> set[str]:
        pager = hook.list_custom_jobs(project_id=PROJECT, region=REGION, page_size=2, page_token=None,
                                      filter=flt, read_mask=None)
        return {j.name for j in pager}  # several pages: the pager follows next_page_token

    assert names(f'labels.run="{run}"') == {j.name for j in ok + [bad]}
    assert names(f'labels.run="{run}" AND state!="JOB_STATE_FAILED"') == {j.name for j in ok}
    assert names(f"labels.run={run} AND state=JOB_STATE_FAILED") == {bad.name}
    assert names(f'labels.run="{run}" AND labels.target="mobile"') == {ok[1].name}
    assert names(f'display_name="{other.display_name}"') == {other.name}
    assert names(f'labels.run="{run}-nothing"') == set()
    with pytest.raises(InvalidArgument, match="Unsupported filter"):
        names(f'labels.run="{run}" OR state="JOB_STATE_FAILED"')


@pytest.mark.parametrize("change, message", [
    (lambda j: j.update(display_name="x" * 129), "display_name"),
    (lambda j: j.update(labels={"Run": "1"}), "labels key 'Run'"),
    (lambda j: j.update(labels={"run": "UPPER"}), "value 'UPPER'"),
    (lambda j: j["job_spec"]["worker_pool_specs"][0].update(machine_spec={}), "machine_type is required"),
    (lambda j: j["job_spec"]["worker_pool_specs"][0].update(replica_count=2), "must be 1"),
    (lambda j: j["job_spec"].update(base_output_directory={"output_uri_prefix": "/local/dir"}), "gs://"),
])
def test_invalid_jobs_are_rejected_before_anything_runs(hook, localcloud, change, message):
    from google.api_core.exceptions import InvalidArgument

    job = _job([_pool("pass")], labels={"case": "invalid"})
    change(job)
    before = len(localcloud.state()["custom_jobs"])
    with pytest.raises(InvalidArgument, match=message):
        _create(hook, job)
    assert len(localcloud.state()["custom_jobs"]) == before


def test_unmapped_image_fails_the_job_with_a_clear_message(hook, localcloud):
    from google.api_core.exceptions import NotFound

    job = _job([_pool("pass", image="gcr.io/elsewhere/unknown:1")])
    del job["job_spec"]["worker_pool_specs"][0]["container_spec"]["command"]
    done = _wait(hook, _create(hook, job), {"JOB_STATE_FAILED", "JOB_STATE_SUCCEEDED"})
    assert done.state.name == "JOB_STATE_FAILED"
    assert "gcr.io/elsewhere/unknown:1" in done.error.message and "images:" in done.error.message
    with pytest.raises(NotFound):
        hook.get_custom_job(project_id=PROJECT, region=REGION, custom_job="999")


# ---------------------------------------------------------------- the deferrable path and faults


def _trigger_event(job, poll_interval: int = 1) -> dict:
    from airflow.providers.google.cloud.triggers.vertex_ai import CustomJobTrigger

    trigger = CustomJobTrigger(project_id=PROJECT, location=REGION, custom_job_id=_id(job),
                               poll_interval=poll_interval)

    async def first_event():
        async for event in trigger.run():
            return event.payload

    return asyncio.run(asyncio.wait_for(first_event(), timeout=90))


def test_provider_trigger_reports_success_and_failure(hook, localcloud):
    ok = _create(hook, _job([_pool("import time; time.sleep(1)")]))
    event = _trigger_event(ok)
    assert event["status"] == "success", event
    assert event["custom_job"]["name"] == ok.name
    assert event["custom_job"]["state"] == 4  # JobState.JOB_STATE_SUCCEEDED (to_dict writes enums as numbers)

    bad = _create(hook, _job([_pool("import sys; sys.exit(2)")]))
    event = _trigger_event(bad)
    assert event["status"] == "error"
    assert "The replica workerpool0-0 exited with a non-zero status of 2" in event["message"]


def test_unavailable_on_the_nth_get_surfaces_in_the_trigger(hook, localcloud):
    job = _create(hook, _job([_pool("import time; time.sleep(4)")]))
    localcloud.clear_faults()
    localcloud.add_fault(method="GetCustomJob", code="UNAVAILABLE", message="injected: backend unavailable",
                         skip=1, times=1)
    try:
        event = _trigger_event(job)
        faults = localcloud.faults()
    finally:
        localcloud.clear_faults()
    assert event["status"] == "error"
    assert "503" in event["message"] or "UNAVAILABLE" in event["message"]
    assert "injected: backend unavailable" in event["message"]
    assert faults[0]["fired"] == 1 and faults[0]["seen"] == 2  # the first poll passed, the second failed
    # Only the poll failed: the job itself runs on and succeeds (a retry re-attaches to it).
    assert _wait(hook, job, {"JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED"}).state.name == "JOB_STATE_SUCCEEDED"


def test_preempted_job_restarts_its_replicas_and_fail_ends_it(hook, localcloud, tmp_path):
    starts = tmp_path / "starts"
    code = "import os, sys, time; open(sys.argv[1], 'a').write(f'{os.getpid()}\\n'); time.sleep(120)"
    job = _create(hook, _job([_pool(code, str(starts))]))
    first = _wait_for_file(starts)[0]
    _wait(hook, job, {"JOB_STATE_RUNNING"})

    localcloud.preempt(_id(job))
    lines = _wait_for_file(starts, lines=2)
    assert lines[1] != first and not _alive(int(first))  # a new process: as a restarted VM, from scratch
    running = _wait(hook, job, {"JOB_STATE_RUNNING"})
    assert running.state.name == "JOB_STATE_RUNNING" and not running.error.message

    localcloud.fail(_id(job), "injected: worker lost")
    done = _wait(hook, job, {"JOB_STATE_FAILED", "JOB_STATE_SUCCEEDED", "JOB_STATE_CANCELLED"}, timeout=30)
    assert done.state.name == "JOB_STATE_FAILED" and done.error.message == "injected: worker lost"
    assert not _alive(int(lines[1]))
    with pytest.raises(urllib.error.HTTPError) as e:  # only a running job can be preempted
        localcloud.preempt(_id(job))
    assert e.value.code == 400

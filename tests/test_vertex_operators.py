"""The Vertex AI operators against the local Vertex AI server, through the real client libraries.

Nothing is patched between the operators and the wire: the provider's hooks build the real
``aiplatform_v1`` clients, which serialize every request over gRPC to ``emulators/localcloud``
(VERTEX_AI_EMULATOR_HOST, set by the ``localcloud`` fixture); deferral runs the trigger the way the
triggerer does (re-created from its serialized form, in asyncio). Failures are replayed with the
server's fault injection or by killing the worker. After each scenario the server's state is
checked: jobs, model versions and aliases, the endpoint's deployed models and traffic split.

The trainer and serving containers are instant stand-ins (tests/fakes/trainer.py,
localcloud/stand_in_model.py), mapped to test images by the fixture: a version registered with the
``-bad-labels`` image answers labels the model does not have, the ``-slow`` one takes 2 s per
prediction. The real ones run in the end-to-end DAG tests.
"""

from __future__ import annotations

import asyncio
import importlib
import io
import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from airflow.sdk.exceptions import AirflowException, AirflowFailException, TaskDeferred
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from dual_deploy.operators.vertex import (
    CanaryDeployModelOperator,
    RegisterModelVersionOperator,
    VertexCustomJobOperator,
)
from dualml.dataset import SplitManifest

PROJECT, REGION = "local-project", "us-central1"
FAKE_TRAINER = "localhost/dual-deploy-test/fake-trainer:1"
FAKE_SERVING = "localhost/dual-deploy-test/fake-serving{}:1"  # "", "-bad-labels" or "-slow" (conftest.py)
ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("localcloud")


# ---------------------------------------------------------------------------- harness


class TaskInstanceStub:
    """The task-instance surface these operators use: XCom pushes (kept for assertions)."""

    def __init__(self):
        self.xcom: dict = {}

    def xcom_push(self, key, value):
        self.xcom[key] = value


def context(op, run_id: str) -> dict:
    return {"ti": TaskInstanceStub(), "task": op, "run_id": run_id}


async def _first_event(trigger):
    async for event in trigger.run():
        return event


def run_task(op, ctx):
    """execute(); on deferral re-create the trigger from its serialized form (as the triggerer does),
    run it to its first event, then resume with execute_complete (as the worker does)."""
    try:
        return op.execute(ctx)
    except TaskDeferred as deferred:
        classpath, kwargs = deferred.trigger.serialize()
        trigger = import_string(classpath)(**kwargs)
        event = asyncio.run(_first_event(trigger))
        return getattr(op, deferred.method_name)(ctx, event.payload, **(deferred.kwargs or {}))


def import_string(classpath: str):
    module, _, name = classpath.rpartition(".")
    return getattr(importlib.import_module(module), name)


def gcs():
    return storage.Client(project=PROJECT, credentials=AnonymousCredentials())


@pytest.fixture
def bucket(gcs_emulator):
    name = f"vertex-ops-{uuid.uuid4().hex[:10]}"
    gcs().create_bucket(name)
    return name


def _png(color) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def split_uri(bucket):
    b = gcs().bucket(bucket)
    files = []
    for i, (label, color) in enumerate([("daisy", "yellow"), ("rose", "red")]):
        b.blob(f"data/{label}/{i}.png").upload_from_string(_png(color))
        files.append((f"gs://{bucket}/data/{label}/{i}.png", i))
    manifest = SplitManifest(labels=["daisy", "rose"], seed=1, fractions={"test": 1.0}, files={"test": files})
    b.blob("split.json").upload_from_string(manifest.to_json())
    return f"gs://{bucket}/split.json"


def state(localcloud) -> dict:
    return localcloud.state()


# ---------------------------------------------------------------------------- training


def train_op(bucket: str, run: str, trainer_args: list[str], task_id: str = "train") -> VertexCustomJobOperator:
    return VertexCustomJobOperator(
        task_id=task_id, project_id=PROJECT, region=REGION, deferrable=True, poll_interval=1,
        poll_retry_timeout_s=2, base_output_dir=f"gs://{bucket}/runs/{run}/cloud",
        custom_job={
            "display_name": f"dual-deploy-cloud-{run}",
            "labels": {"app": "dual-deploy", "dag": "test", "run": run, "target": "cloud"},
            "job_spec": {
                "worker_pool_specs": [{
                    "machine_spec": {"machine_type": "n1-standard-4", "accelerator_type": "NVIDIA_TESLA_T4",
                                     "accelerator_count": 1},
                    "replica_count": 1,
                    "container_spec": {"image_uri": FAKE_TRAINER, "args": trainer_args},
                }],
                "base_output_directory": {"output_uri_prefix": f"gs://{bucket}/runs/{run}/cloud"},
            },
        },
    )


def jobs_of(localcloud, run: str) -> list[dict]:
    return [j for j in state(localcloud)["custom_jobs"] if j["labels"].get("run") == run]


def test_train_first_run_one_job_with_vertex_environment(localcloud, bucket):
    run = f"r-{uuid.uuid4().hex[:8]}"
    op = train_op(bucket, run, ["--accuracy=0.8"])
    out = run_task(op, context(op, run))
    assert out["metrics"]["accuracy"] == 0.8
    assert out["model_dir"] == f"gs://{bucket}/runs/{run}/cloud/model" and out["reattached"] is False
    jobs = jobs_of(localcloud, run)
    assert [j["state"] for j in jobs] == ["JOB_STATE_SUCCEEDED"]
    assert out["custom_job_name"] == jobs[0]["name"] and out["duration_s"] is not None


def test_failed_job_fails_the_task_without_retry_and_is_not_resubmitted(localcloud, bucket):
    run = f"r-{uuid.uuid4().hex[:8]}"
    op = train_op(bucket, run, ["--exit-code=2"])
    with pytest.raises(AirflowFailException, match="non-zero status of 2") as failure:
        run_task(op, context(op, run))
    assert "not retried" in str(failure.value)
    jobs = jobs_of(localcloud, run)
    assert [j["state"] for j in jobs] == ["JOB_STATE_FAILED"]


def test_transient_poll_errors_retry_the_task_which_reattaches_to_the_same_job(localcloud, bucket):
    run = f"r-{uuid.uuid4().hex[:8]}"
    # More UNAVAILABLE answers than one poll's retries (2 s here) absorb: the trigger gives up,
    # the task fails with a retryable error; the next attempt must find the running job.
    localcloud.add_fault(method="GetCustomJob", code="UNAVAILABLE", times=0)
    try:
        op = train_op(bucket, run, ["--sleep=3"])
        with pytest.raises(AirflowException) as first:
            run_task(op, context(op, run))
        assert not isinstance(first.value, AirflowFailException)
    finally:
        localcloud.clear_faults()
    retry = train_op(bucket, run, ["--sleep=3"])
    out = run_task(retry, context(retry, run))
    assert out["reattached"] is True
    jobs = jobs_of(localcloud, run)
    assert len(jobs) == 1 and jobs[0]["state"] == "JOB_STATE_SUCCEEDED"


def test_one_transient_poll_error_is_absorbed_by_the_trigger(localcloud, bucket):
    run = f"r-{uuid.uuid4().hex[:8]}"
    localcloud.add_fault(method="GetCustomJob", code="UNAVAILABLE", times=1)
    try:
        op = train_op(bucket, run, [])
        op.poll_retry_timeout_s = 30
        out = run_task(op, context(op, run))
    finally:
        localcloud.clear_faults()
    assert out["metrics"]["accuracy"] == 0.9
    assert len(jobs_of(localcloud, run)) == 1


def test_clearing_the_deferred_task_cancels_its_job(localcloud, bucket):
    run = f"r-{uuid.uuid4().hex[:8]}"
    op = train_op(bucket, run, ["--sleep=60"])
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(context(op, run))
    classpath, kwargs = deferred.value.trigger.serialize()
    asyncio.run(import_string(classpath)(**kwargs).on_kill())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and jobs_of(localcloud, run)[0]["state"] != "JOB_STATE_CANCELLED":
        time.sleep(0.2)
    assert [j["state"] for j in jobs_of(localcloud, run)] == ["JOB_STATE_CANCELLED"]


# ---------------------------------------------------------------------------- registry + endpoint


def register_op(name: str, artifact_uri: str, run: str) -> RegisterModelVersionOperator:
    behaviour = next((b for b in ("bad-labels", "slow") if b in artifact_uri), None)
    return RegisterModelVersionOperator(task_id="register_model", project_id=PROJECT, region=REGION,
                                        display_name=name, artifact_uri=artifact_uri,
                                        serving_image=FAKE_SERVING.format(f"-{behaviour}" if behaviour else ""),
                                        version_aliases=[f"run-{run}"])


def deploy_op(endpoint: str, name: str, model: dict, split_uri: str, canary: int = 10) -> CanaryDeployModelOperator:
    return CanaryDeployModelOperator(task_id="deploy", project_id=PROJECT, region=REGION,
                                     endpoint_display_name=endpoint, model_display_name=name, model=model,
                                     split_uri=split_uri, canary_traffic_percent=canary, smoke_instances=2,
                                     max_smoke_requests=200)


def release(name: str, endpoint: str, split_uri: str, artifact: str, run: str | None = None):
    """register_model >> deploy for one run. Returns (register XCom, deploy XCom or the exception)."""
    run = run or f"r{uuid.uuid4().hex[:8]}"
    reg = register_op(name, f"gs://models/{artifact}", run)
    model = run_task(reg, context(reg, run))
    dep = deploy_op(endpoint, name, model, split_uri)
    try:
        return model, run_task(dep, context(dep, run))
    except Exception as e:  # noqa: BLE001 - returned for the test to assert on
        return model, e


def endpoint_state(localcloud, display_name: str) -> dict:
    [ep] = [e for e in state(localcloud)["endpoints"] if e["display_name"] == display_name]
    return ep


def versions(localcloud, model_id: str) -> dict[str, list[str]]:
    return {v["version_id"]: sorted(v["version_aliases"]) for v in state(localcloud)["model_versions"]
            if v["name"].endswith("/models/" + model_id)}


def serving(localcloud, display_name: str) -> dict[str, int]:
    """version id -> traffic share on the endpoint."""
    ep = endpoint_state(localcloud, display_name)
    by_id = {d["id"]: d["model_version_id"] for d in ep["deployed_models"]}
    assert set(by_id) == set(ep["traffic_split"]), "a deployed model without a traffic entry (or vice versa)"
    return {by_id[k]: v for k, v in ep["traffic_split"].items()}


def test_first_run_then_canary_promote(localcloud, split_uri):
    name, endpoint = f"m{uuid.uuid4().hex[:6]}", f"ep-{uuid.uuid4().hex[:6]}"
    m1, d1 = release(name, endpoint, split_uri, "v1-good")
    assert d1["endpoint_created"] and d1["canary_traffic_percent"] == 100 and d1["default_alias"]
    assert serving(localcloud, endpoint) == {"1": 100}
    assert versions(localcloud, m1["model_id"])["1"] == sorted(["default", m1["version_aliases"][0]])

    m2, d2 = release(name, endpoint, split_uri, "v2-good")
    assert m2["model_id"] == m1["model_id"] and m2["model_version_id"] == "2"
    assert not d2["endpoint_created"] and d2["canary_traffic_percent"] == 10
    assert d2["smoke_test"]["served_by"].get(d2["deployed_model_id"]) == 1
    assert d2["undeployed"] == [d1["deployed_model_id"]]
    # The endpoint serves exactly what the deploy step reports; default is on the served version.
    assert serving(localcloud, endpoint) == {"2": 100}
    assert endpoint_state(localcloud, endpoint)["traffic_split"] == {d2["deployed_model_id"]: 100}
    assert "default" in versions(localcloud, m1["model_id"])["2"]
    assert "default" not in versions(localcloud, m1["model_id"])["1"]


def test_new_version_does_not_take_default_before_it_is_promoted(localcloud, split_uri):
    name, endpoint = f"m{uuid.uuid4().hex[:6]}", f"ep-{uuid.uuid4().hex[:6]}"
    m1, _ = release(name, endpoint, split_uri, "v1-good")
    run = "r-register-only"
    reg = register_op(name, "gs://models/v2-good", run)
    m2 = run_task(reg, context(reg, run))
    assert "default" not in m2["version_aliases"]
    assert "default" in versions(localcloud, m1["model_id"])["1"]
    # A retry of register_model reuses the version with the run's alias: one version per run.
    again = run_task(register_op(name, "gs://models/v2-good", run), context(reg, run))
    assert again["reused"] and again["model_version_id"] == m2["model_version_id"]
    assert sorted(versions(localcloud, m1["model_id"])) == ["1", "2"]


def test_smoke_failure_rolls_back_and_keeps_default(localcloud, split_uri):
    name, endpoint = f"m{uuid.uuid4().hex[:6]}", f"ep-{uuid.uuid4().hex[:6]}"
    m1, d1 = release(name, endpoint, split_uri, "v1-good")
    m2, err = release(name, endpoint, split_uri, "v2-bad-labels")
    assert isinstance(err, AirflowFailException) and "smoke test" in str(err) and "Rolled back" in str(err)
    assert serving(localcloud, endpoint) == {"1": 100}
    assert "default" in versions(localcloud, m1["model_id"])["1"]
    assert "default" not in versions(localcloud, m1["model_id"])["2"]


def test_crash_after_deploy_rolls_back_then_the_retry_delivers(localcloud, split_uri, monkeypatch):
    """Any failure after DeployModel (here: the split file cannot be read) undeploys the canary; the
    retry deploys once and promotes: no leftover, one deployed model."""
    name, endpoint = f"m{uuid.uuid4().hex[:6]}", f"ep-{uuid.uuid4().hex[:6]}"
    release(name, endpoint, split_uri, "v1-good")
    run = "r-crash"
    reg = register_op(name, "gs://models/v2-good", run)
    m2 = run_task(reg, context(reg, run))
    op = deploy_op(endpoint, name, m2, split_uri.replace("split.json", "missing-split.json"))
    with pytest.raises(AirflowException) as first:
        run_task(op, context(op, run))
    assert not isinstance(first.value, AirflowFailException), "a transient failure must stay retryable"
    assert serving(localcloud, endpoint) == {"1": 100}
    retry = deploy_op(endpoint, name, m2, split_uri)
    out = run_task(retry, context(retry, run))
    assert serving(localcloud, endpoint) == {"2": 100}
    assert out["leftovers_removed"] == []
    assert "default" in versions(localcloud, m2["model_id"])["2"]


def test_smoke_failure_after_a_retry(localcloud, split_uri):
    name, endpoint = f"m{uuid.uuid4().hex[:6]}", f"ep-{uuid.uuid4().hex[:6]}"
    m1, _ = release(name, endpoint, split_uri, "v1-good")
    run = "r-twice"
    reg = register_op(name, "gs://models/v2-bad-labels", run)
    m2 = run_task(reg, context(reg, run))
    first = deploy_op(endpoint, name, m2, split_uri.replace("split.json", "missing.json"))
    with pytest.raises(AirflowException):
        run_task(first, context(first, run))
    second = deploy_op(endpoint, name, m2, split_uri)
    with pytest.raises(AirflowFailException, match="smoke test"):
        run_task(second, context(second, run))
    assert serving(localcloud, endpoint) == {"1": 100}
    assert "default" in versions(localcloud, m1["model_id"])["1"]


def test_transient_predict_error_during_the_smoke_test_is_retried(localcloud, split_uri):
    name, endpoint = f"m{uuid.uuid4().hex[:6]}", f"ep-{uuid.uuid4().hex[:6]}"
    release(name, endpoint, split_uri, "v1-good")
    localcloud.add_fault(kind="predict", http_status=503, times=1, message="backend restarting")
    try:
        m2, d2 = release(name, endpoint, split_uri, "v2-good")
    finally:
        localcloud.clear_faults()
    assert not isinstance(d2, Exception), d2
    assert len(d2["smoke_test"]["transient_errors"]) == 1
    assert serving(localcloud, endpoint) == {"2": 100}


_KILLED_DEPLOY = textwrap.dedent("""
    import json, sys
    from dual_deploy.operators.vertex import CanaryDeployModelOperator

    class TI:
        def xcom_push(self, key, value):
            pass

    args = json.loads(sys.argv[1])
    op = CanaryDeployModelOperator(task_id="deploy", project_id="local-project", region="us-central1", **args)
    op.execute({"ti": TI(), "task": op, "run_id": "r-killed"})
""")


def test_worker_killed_during_the_smoke_test_leaves_no_canary_after_the_retry(localcloud, split_uri, tmp_path):
    """kill -9 of the worker between DeployModel and promotion: nothing rolls back in that process;
    the retry finds the canary its earlier attempt left and removes it before deploying again."""
    name, endpoint = f"m{uuid.uuid4().hex[:6]}", f"ep-{uuid.uuid4().hex[:6]}"
    release(name, endpoint, split_uri, "v1-good")
    run = "r-killed"
    reg = register_op(name, "gs://models/v2-slow", run)  # each prediction takes 2 s: a window to kill in
    m2 = run_task(reg, context(reg, run))
    script = tmp_path / "deploy.py"
    script.write_text(_KILLED_DEPLOY)
    args = {"endpoint_display_name": endpoint, "model_display_name": name, "model": m2, "split_uri": split_uri,
            "canary_traffic_percent": 10}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "plugins"), str(ROOT / "include"),
                                                        os.environ.get("PYTHONPATH", "")])}
    worker = subprocess.Popen([sys.executable, str(script), json.dumps(args)], env=env)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and len(endpoint_state(localcloud, endpoint)["deployed_models"]) < 2:
            assert worker.poll() is None, "the deploy process ended before its canary was deployed"
            time.sleep(0.2)
        assert serving(localcloud, endpoint) == {"1": 90, "2": 10}
    finally:
        worker.kill()
        worker.wait()
    assert serving(localcloud, endpoint) == {"1": 90, "2": 10}  # the leftover a crash leaves
    retry = deploy_op(endpoint, name, m2, split_uri)
    out = run_task(retry, context(retry, run))
    assert len(out["leftovers_removed"]) == 1
    assert serving(localcloud, endpoint) == {"2": 100}
    assert len(endpoint_state(localcloud, endpoint)["deployed_models"]) == 1


def _operation_done_after(polls: int):
    """A real api_core Operation whose GetOperation answers 'running' ``polls`` times, then 'done'."""
    from google.api_core import operation as api_operation
    from google.cloud.aiplatform_v1.types import DeployedModel, DeployModelResponse
    from google.longrunning import operations_pb2
    from google.protobuf import any_pb2

    response = any_pb2.Any()
    response.Pack(DeployModelResponse.pb(DeployModelResponse(deployed_model=DeployedModel(id="7"))))
    calls = []

    def refresh(retry=None, **_):
        calls.append(1)
        return operations_pb2.Operation(name="op", done=len(calls) > polls,
                                        response=response if len(calls) > polls else None)

    op = api_operation.Operation(operations_pb2.Operation(name="op"), refresh, lambda: None,
                                 result_type=DeployModelResponse)
    return op, calls


@pytest.mark.parametrize(("cap", "slowest"), [(2, 2.0), (None, 20.0)])
def test_endpoint_operations_are_polled_at_most_every_poll_interval(monkeypatch, cap, slowest):
    """The deploy's waits back off from 1 s to ``operation_poll_max_s`` (the config's poll interval), not
    to api_core's 20 s: a local deployment is seen within 2 s of finishing. api_core's default (None)
    is the anchor. Its jitter is pinned to the top of each interval so the gaps are exact."""
    import google.api_core.retry.retry_base as retry_base
    import google.api_core.retry.retry_unary as retry_unary
    from airflow.providers.google.cloud.hooks.vertex_ai.endpoint_service import EndpointServiceHook

    sleeps: list[float] = []
    monkeypatch.setattr(retry_unary.time, "sleep", sleeps.append)
    monkeypatch.setattr(retry_base.random, "uniform", lambda low, high: high)
    op, calls = _operation_done_after(12)
    deploy = CanaryDeployModelOperator(task_id="deploy", project_id=PROJECT, region=REGION, endpoint_display_name="ep",
                                       model_display_name="m", model={}, split_uri="gs://x/split.json",
                                       **({} if cap is None else {"operation_poll_max_s": cap}))
    result = deploy._wait(EndpointServiceHook(), op)
    assert result.deployed_model.id == "7"
    assert len(calls) == 13 and len(sleeps) == 12
    assert sleeps[0] == 1.0 and max(sleeps) == slowest

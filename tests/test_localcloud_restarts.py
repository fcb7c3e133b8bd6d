"""Local Vertex AI server: state across graceful restarts and ``kill -9``, the state-dir lock, and the
limits of a server of its own (deploy timeout 3 s, 2 deployed models per endpoint).

This module runs a private server (not the session's ``localcloud``): it crashes it on purpose.
VERTEX_AI_EMULATOR_HOST points the provider's hooks at it while the module runs.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from google.api_core.future.polling import DEFAULT_POLLING

PROJECT, REGION = "local-project", "us-central1"
PARENT = f"projects/{PROJECT}/locations/{REGION}"
ROOT = Path(__file__).resolve().parents[1]
SERVING_IMAGE = "us-central1-docker.pkg.dev/local-project/dual-deploy/serving:test"
TRAINER_IMAGE = "us-central1-docker.pkg.dev/local-project/dual-deploy/trainer:test"
FAST = DEFAULT_POLLING.with_delay(initial=0.05, maximum=0.5)
ANONYMOUS = '{"conn_type": "google_cloud_platform", "extra": {"is_anonymous": true, "project": "local-project"}}'
SECRET = "fernet-key-that-must-not-leak"


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    from dual_deploy.emulator_hosts import install
    from localcloud.process import LocalCloudProcess

    tmp = tmp_path_factory.mktemp("localcloud-private")
    config = tmp / "localcloud.yaml"
    config.write_text(json.dumps({  # YAML is a superset of JSON
        "root": str(ROOT),
        "images": [{"match": "*/dual-deploy/*", "entrypoint": ["{python}", "-m", "dualml.trainer"],
                    "env": {"PYTHONPATH": "{root}/include"}}],
        "deploy_timeout_s": 3,
        "max_deployed_models_per_endpoint": 2,
    }))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIRFLOW__CORE__FERNET_KEY", SECRET)  # in the server's environment: must reach no job
        server = LocalCloudProcess(tmp / "state", config=config).start()
        try:
            mp.setenv("VERTEX_AI_EMULATOR_HOST", server.grpc)
            mp.setenv("AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT", ANONYMOUS)
            mp.delenv("AIRFLOW__CORE__FERNET_KEY")
            install()
            yield server
        finally:
            server.stop()


@pytest.fixture
def hooks(cloud):
    from airflow.providers.google.cloud.hooks.vertex_ai.custom_job import CustomJobHook
    from airflow.providers.google.cloud.hooks.vertex_ai.endpoint_service import EndpointServiceHook
    from airflow.providers.google.cloud.hooks.vertex_ai.model_service import ModelServiceHook
    from airflow.providers.google.cloud.hooks.vertex_ai.prediction_service import PredictionServiceHook

    class Hooks:
        jobs = CustomJobHook()
        endpoints = EndpointServiceHook()
        models = ModelServiceHook()
        prediction = PredictionServiceHook()

    return Hooks


# ---------------------------------------------------------------- helpers (as in test_localcloud_endpoints)


def _upload(hooks, name: str, marker: str, parent_model: str | None = None, aliases=(), **env) -> str:
    from localcloud import stand_in_model

    spec = {"image_uri": SERVING_IMAGE, "command": [sys.executable, stand_in_model.__file__],
            "predict_route": "/predict", "health_route": "/health",
            "env": [{"name": k, "value": str(v)} for k, v in {"STAND_IN_VERSION": marker, **env}.items()]}
    model = {"display_name": name, "artifact_uri": f"gs://lc-models/{name}/{marker}/", "container_spec": spec,
             "version_aliases": list(aliases)}
    op = hooks.models.upload_model(project_id=PROJECT, region=REGION, model=model, parent_model=parent_model)
    r = hooks.models.wait_for_operation_result(op, timeout=60, polling=FAST)
    return f"{r.model.rsplit('/', 1)[-1]}@{r.model_version_id}"


def _endpoint(hooks, labels: dict | None = None) -> str:
    op = hooks.endpoints.create_endpoint(
        project_id=PROJECT, region=REGION,
        endpoint={"display_name": f"lc-endpoint-{uuid.uuid4().hex[:8]}", "labels": labels or {}})
    return hooks.endpoints.wait_for_operation_result(op, timeout=60, polling=FAST).name.rsplit("/", 1)[-1]


def _deploy_op(hooks, endpoint_id: str, model: str, split: dict | None):
    return hooks.endpoints.deploy_model(
        project_id=PROJECT, region=REGION, endpoint=endpoint_id, traffic_split=split,
        deployed_model={"model": f"{PARENT}/models/{model}", "dedicated_resources": {
            "machine_spec": {"machine_type": "n1-standard-2"}, "min_replica_count": 1, "max_replica_count": 1}})


def _deploy(hooks, endpoint_id: str, model: str, split: dict | None) -> str:
    op = _deploy_op(hooks, endpoint_id, model, split)
    return hooks.endpoints.wait_for_operation_result(op, timeout=60, polling=FAST).deployed_model.id


def _undeploy(hooks, endpoint_id: str, deployed_model_id: str, split: dict | None = None) -> None:
    op = hooks.endpoints.undeploy_model(project_id=PROJECT, region=REGION, endpoint=endpoint_id,
                                        deployed_model_id=deployed_model_id, traffic_split=split)
    hooks.endpoints.wait_for_operation_result(op, timeout=60, polling=FAST)


def _get(hooks, endpoint_id: str):
    return hooks.endpoints.get_endpoint(project_id=PROJECT, region=REGION, endpoint=endpoint_id)


def _predict_when_ready(hooks, endpoint_id: str, timeout: float = 30):
    """Predict, waiting out UNAVAILABLE while restored replicas start (as Vertex answers 503 then)."""
    from google.api_core.exceptions import ServiceUnavailable

    client = hooks.prediction.get_prediction_service_client(REGION)
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.predict(endpoint=f"{PARENT}/endpoints/{endpoint_id}", instances=[{"x": 1}],
                                  retry=None, timeout=30)
        except ServiceUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _replica_pids(cloud, endpoint_id: str) -> dict[str, list[int]]:
    prefix = f"{PARENT}/endpoints/{endpoint_id}/"
    return {k[len(prefix):]: [r["pid"] for r in v] for k, v in cloud.state()["replicas"].items()
            if k.startswith(prefix)}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def _wait_dead(pids, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not any(_alive(p) for p in pids)


def _wait_lines(path: Path, n: int, timeout: float = 60) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(lines := path.read_text().splitlines()) >= n:
            return lines
        time.sleep(0.1)
    raise AssertionError(f"{path}: fewer than {n} lines after {timeout} s")


def _registry(hooks, model_id: str) -> dict[str, list[str]]:
    return {v.version_id: sorted(v.version_aliases)
            for v in hooks.models.list_model_versions(project_id=PROJECT, region=REGION, model_id=model_id)}


# ---------------------------------------------------------------- tests


def test_state_survives_a_graceful_restart(cloud, hooks):
    name = f"lc-persist-{uuid.uuid4().hex[:6]}"
    v1 = _upload(hooks, name, "v1", aliases=["run-a"])
    model_id = v1.split("@")[0]
    v2 = _upload(hooks, name, "v2", parent_model=model_id, aliases=["run-b", "champion"])
    endpoint = _endpoint(hooks, {"team": "persist"})
    dm1 = _deploy(hooks, endpoint, v1, {"0": 100})
    dm2 = _deploy(hooks, endpoint, v2, {"0": 30, dm1: 70})
    before = _get(hooks, endpoint)
    registry = _registry(hooks, model_id)
    assert registry == {"1": ["default", "run-a"], "2": ["champion", "run-b"]}
    pids = [p for ps in _replica_pids(cloud, endpoint).values() for p in ps]

    cloud.stop()
    assert _wait_dead(pids), "a graceful stop leaves no serving process"
    cloud.restart()

    assert _registry(hooks, model_id) == registry
    assert hooks.models.get_model(project_id=PROJECT, region=REGION, model_id=f"{model_id}@champion").version_id == "2"
    after = _get(hooks, endpoint)
    assert after.deployed_models == before.deployed_models
    assert dict(after.traffic_split) == dict(before.traffic_split) == {dm1: 70, dm2: 30}
    assert after.labels == before.labels and after.etag == before.etag
    assert cloud.state()["routing"][f"{PARENT}/endpoints/{endpoint}"] == {dm1: 70, dm2: 30}
    # Deployed models are served again, by new processes, with the same split.
    assert _predict_when_ready(hooks, endpoint).deployed_model_id in {dm1, dm2}
    counts = Counter(_predict_when_ready(hooks, endpoint).deployed_model_id for _ in range(100))
    assert set(counts) == {dm1, dm2}
    assert not set(pids) & {p for ps in _replica_pids(cloud, endpoint).values() for p in ps}
    # Ids keep counting: a new version and a new endpoint collide with nothing stored.
    assert _upload(hooks, name, "v3", parent_model=model_id).endswith("@3")
    assert _endpoint(hooks) != endpoint
    _undeploy(hooks, endpoint, dm2, {dm1: 100})
    _undeploy(hooks, endpoint, dm1)


def test_kill9_mid_flight_then_restart(cloud, hooks, tmp_path):
    from google.api_core.exceptions import Aborted

    name = f"lc-crash-{uuid.uuid4().hex[:6]}"
    v1 = _upload(hooks, name, "v1")
    slow = _upload(hooks, name, "slow", parent_model=v1.split("@")[0], STAND_IN_READY_AFTER_S=2.5)
    endpoint = _endpoint(hooks)
    dm1 = _deploy(hooks, endpoint, v1, {"0": 100})
    served_pids = _replica_pids(cloud, endpoint)[dm1]

    starts, env_dump = tmp_path / "starts", tmp_path / "env.json"
    code = ("import json, os, sys, time; open(sys.argv[2], 'w').write(json.dumps(dict(os.environ))); "
            "open(sys.argv[1], 'a').write(f'{os.getpid()}\\n'); time.sleep(300)")
    job = hooks.jobs.create_custom_job(project_id=PROJECT, region=REGION, custom_job={
        "display_name": "lc-crash-job", "job_spec": {"worker_pool_specs": [{
            "machine_spec": {"machine_type": "n1-standard-4"}, "replica_count": 1,
            "container_spec": {"image_uri": TRAINER_IMAGE, "command": [sys.executable, "-c", code],
                               "args": [str(starts), str(env_dump)]}}]}})
    job_id = job.name.rsplit("/", 1)[-1]
    first_job_pid = int(_wait_lines(starts, 1)[0])
    assert SECRET not in env_dump.read_text()  # the server's environment stays out of jobs

    in_flight = _deploy_op(hooks, endpoint, slow, {"0": 50, dm1: 50})  # healthy only after 2.5 s
    time.sleep(0.5)
    in_flight_pids = [p for k, ps in _replica_pids(cloud, endpoint).items() if k != dm1 for p in ps]
    assert in_flight_pids and not in_flight.done(retry=None)

    cloud.kill9()
    assert all(_alive(p) for p in served_pids + [first_job_pid])  # a crash leaves its children running
    cloud.restart()

    # The operation in flight ended ABORTED; nothing of it is deployed or running.
    error = in_flight.exception(timeout=30)
    assert isinstance(error, Aborted) and "restart of the local Vertex AI server" in error.message
    ep = _get(hooks, endpoint)
    assert [d.id for d in ep.deployed_models] == [dm1] and dict(ep.traffic_split) == {dm1: 100}
    assert _wait_dead(in_flight_pids + served_pids), "leftover processes of the crashed server still run"
    assert _predict_when_ready(hooks, endpoint).deployed_model_id == dm1  # served again, by a new process
    assert set(_replica_pids(cloud, endpoint)) == {dm1}

    # The running job is resumed: its replica starts again (as after a preemption) and runs on.
    second = _wait_lines(starts, 2)[1]
    assert second != str(first_job_pid) and _wait_dead([first_job_pid])
    got = hooks.jobs.get_custom_job(project_id=PROJECT, region=REGION, custom_job=job_id)
    assert got.state.name in ("JOB_STATE_PENDING", "JOB_STATE_RUNNING") and got.start_time
    hooks.jobs.cancel_custom_job(project_id=PROJECT, region=REGION, custom_job=job_id)
    deadline = time.monotonic() + 30
    while got.state.name != "JOB_STATE_CANCELLED" and time.monotonic() < deadline:
        time.sleep(0.1)
        got = hooks.jobs.get_custom_job(project_id=PROJECT, region=REGION, custom_job=job_id)
    assert got.state.name == "JOB_STATE_CANCELLED" and _wait_dead([int(second)])
    _undeploy(hooks, endpoint, dm1)


def test_a_second_server_on_the_same_state_dir_is_refused(cloud, tmp_path):
    from localcloud.process import LocalCloudProcess

    info = json.loads((cloud.state_dir / "server.json").read_text())
    second = LocalCloudProcess(cloud.state_dir, config=cloud.config, log_path=tmp_path / "second.log")
    with pytest.raises(RuntimeError, match="another local Vertex AI server is using") as e:
        second.start()
    assert "stop it first" in str(e.value)
    assert second.proc.returncode == 3
    assert json.loads((cloud.state_dir / "server.json").read_text()) == info  # the first one undisturbed
    assert cloud.state()["endpoints"] is not None


def test_a_model_that_never_gets_healthy_times_out(cloud, hooks):
    from airflow.providers.common.compat.sdk import AirflowException

    name = f"lc-unhealthy-{uuid.uuid4().hex[:6]}"
    good = _upload(hooks, name, "good")
    sick = _upload(hooks, name, "sick", parent_model=good.split("@")[0], STAND_IN_HEALTH="fail")
    endpoint = _endpoint(hooks)
    dm = _deploy(hooks, endpoint, good, {"0": 100})
    t0 = time.monotonic()
    op = _deploy_op(hooks, endpoint, sick, {"0": 10, dm: 90})
    time.sleep(0.5)
    sick_pids = [p for k, ps in _replica_pids(cloud, endpoint).items() if k != dm for p in ps]
    with pytest.raises(AirflowException):
        hooks.endpoints.wait_for_operation_result(op, timeout=60, polling=FAST)
    assert 3 <= time.monotonic() - t0 < 30  # deploy_timeout_s: 3 in this server's config
    assert "Model server never became ready" in op.exception().message
    ep = _get(hooks, endpoint)
    assert [d.id for d in ep.deployed_models] == [dm] and dict(ep.traffic_split) == {dm: 100}
    assert sick_pids and _wait_dead(sick_pids)
    _undeploy(hooks, endpoint, dm)


def test_deployed_model_limit_per_endpoint(cloud, hooks):
    from google.api_core.exceptions import ResourceExhausted

    v1 = _upload(hooks, f"lc-limit-{uuid.uuid4().hex[:6]}", "v1")
    endpoint = _endpoint(hooks)
    dm1 = _deploy(hooks, endpoint, v1, {"0": 100})
    dm2 = _deploy(hooks, endpoint, v1, None)
    with pytest.raises(ResourceExhausted, match="limit 2"):
        _deploy_op(hooks, endpoint, v1, None)
    assert [d.id for d in _get(hooks, endpoint).deployed_models] == [dm1, dm2]
    _undeploy(hooks, endpoint, dm2)
    dm3 = _deploy(hooks, endpoint, v1, None)
    assert [d.id for d in _get(hooks, endpoint).deployed_models] == [dm1, dm3]
    _undeploy(hooks, endpoint, dm3)
    _undeploy(hooks, endpoint, dm1)

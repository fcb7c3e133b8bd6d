"""Local Vertex AI server, EndpointService + PredictionService through the provider's hooks: endpoints,
DeployModel / UndeployModel / MutateDeployedModel with Vertex's traffic-split rules, Predict routed by
the split (gRPC and REST), the 1.5 MB limit, predict and operation faults, and promotion / rollback
with zero failed requests while a client polls.

Deployed models run ``localcloud.stand_in_model`` (a stdlib HTTP server honouring AIP_HTTP_PORT,
AIP_HEALTH_ROUTE, AIP_PREDICT_ROUTE) in place of the TensorFlow serving app, so a deploy takes a
fraction of a second; its predictions carry a version marker and its pid.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter

import pytest
from google.api_core.future.polling import DEFAULT_POLLING

PROJECT, REGION = "local-project", "us-central1"
PARENT = f"projects/{PROJECT}/locations/{REGION}"
SERVING_IMAGE = "us-central1-docker.pkg.dev/local-project/dual-deploy/serving:test"
FAST = DEFAULT_POLLING.with_delay(initial=0.05, maximum=0.5)
RESOURCES = {"machine_spec": {"machine_type": "n1-standard-2"}, "min_replica_count": 1, "max_replica_count": 1}


@pytest.fixture(scope="module")
def hooks(localcloud):
    from airflow.providers.google.cloud.hooks.vertex_ai.endpoint_service import EndpointServiceHook
    from airflow.providers.google.cloud.hooks.vertex_ai.model_service import ModelServiceHook
    from airflow.providers.google.cloud.hooks.vertex_ai.prediction_service import PredictionServiceHook

    class Hooks:
        endpoints = EndpointServiceHook()
        models = ModelServiceHook()
        # PredictionServiceHook.predict itself builds PredictRequest from a dict, which proto-plus refuses
        # for `instances` with these library versions (TypeError, client side); its client is used instead.
        predict_client = PredictionServiceHook().get_prediction_service_client(REGION)

    return Hooks


def _stand_in(marker: str, routes: bool = True, **env) -> dict:
    from localcloud import stand_in_model

    spec = {"image_uri": SERVING_IMAGE, "command": [sys.executable, stand_in_model.__file__],
            "env": [{"name": k, "value": str(v)} for k, v in {"STAND_IN_VERSION": marker, **env}.items()]}
    if routes:  # else Vertex's default routes (/v1/endpoints/<e>/deployedModels/<d>[:predict])
        spec.update(predict_route="/predict", health_route="/health")
    return spec


def _upload(hooks, name: str, marker: str, parent_model: str | None = None, **spec_kw) -> str:
    """Upload a stand-in model version; its ``models/<id>@<version>`` name."""
    model = {"display_name": name, "artifact_uri": f"gs://lc-models/{name}/{marker}/",
             "container_spec": _stand_in(marker, **spec_kw)}
    op = hooks.models.upload_model(project_id=PROJECT, region=REGION, model=model, parent_model=parent_model)
    r = hooks.models.wait_for_operation_result(op, timeout=60, polling=FAST)
    return f"{r.model.rsplit('/', 1)[-1]}@{r.model_version_id}"


def _endpoint(hooks, labels: dict | None = None) -> str:
    op = hooks.endpoints.create_endpoint(
        project_id=PROJECT, region=REGION,
        endpoint={"display_name": f"lc-endpoint-{uuid.uuid4().hex[:8]}", "labels": labels or {}})
    return hooks.endpoints.wait_for_operation_result(op, timeout=60, polling=FAST).name.rsplit("/", 1)[-1]


def _deploy_op(hooks, endpoint_id: str, model: str, split: dict | None, replicas: int = 1):
    return hooks.endpoints.deploy_model(
        project_id=PROJECT, region=REGION, endpoint=endpoint_id,
        deployed_model={"model": f"{PARENT}/models/{model}", "dedicated_resources": {
            **RESOURCES, "min_replica_count": replicas, "max_replica_count": max(replicas, 1)}},
        traffic_split=split)


def _deploy(hooks, endpoint_id: str, model: str, split: dict | None, replicas: int = 1) -> str:
    op = _deploy_op(hooks, endpoint_id, model, split, replicas)
    return hooks.endpoints.wait_for_operation_result(op, timeout=120, polling=FAST).deployed_model.id


def _undeploy(hooks, endpoint_id: str, deployed_model_id: str, split: dict | None = None) -> None:
    op = hooks.endpoints.undeploy_model(project_id=PROJECT, region=REGION, endpoint=endpoint_id,
                                        deployed_model_id=deployed_model_id, traffic_split=split)
    hooks.endpoints.wait_for_operation_result(op, timeout=120, polling=FAST)


def _get(hooks, endpoint_id: str):
    return hooks.endpoints.get_endpoint(project_id=PROJECT, region=REGION, endpoint=endpoint_id)


def _split(hooks, endpoint_id: str) -> dict[str, int]:
    return dict(_get(hooks, endpoint_id).traffic_split)


def _set_split(hooks, endpoint_id: str, split: dict[str, int]):
    return hooks.endpoints.update_endpoint(project_id=PROJECT, region=REGION, endpoint_id=endpoint_id,
                                           endpoint={"traffic_split": split}, update_mask={"paths": ["traffic_split"]})


def _predict(hooks, endpoint_id: str, instances=None):
    return hooks.predict_client.predict(endpoint=f"{PARENT}/endpoints/{endpoint_id}",
                                        instances=instances or [{"x": 1}], retry=None, timeout=30)


def _routing(localcloud, endpoint_id: str) -> dict[str, int]:
    return localcloud.state()["routing"].get(f"{PARENT}/endpoints/{endpoint_id}", {})


def _replicas(localcloud, endpoint_id: str) -> dict[str, list[dict]]:
    prefix = f"{PARENT}/endpoints/{endpoint_id}/"
    return {k[len(prefix):]: v for k, v in localcloud.state()["replicas"].items() if k.startswith(prefix)}


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


def _wait_dead(pid: int, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _alive(pid)


def _rest(localcloud, path: str, body: bytes, content_type: str = "application/json"):
    req = urllib.request.Request(localcloud.http + path, data=body, method="POST",
                                 headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


# ---------------------------------------------------------------- endpoints


def test_endpoints_create_get_list_update_delete(hooks, localcloud):
    from google.api_core.exceptions import InvalidArgument, NotFound

    team = f"t{uuid.uuid4().hex[:8]}"
    a, b = _endpoint(hooks, {"team": team}), _endpoint(hooks, {"team": team, "target": "cloud"})
    got = _get(hooks, a)
    assert got.name == f"{PARENT}/endpoints/{a}" and got.create_time and got.etag
    assert not got.deployed_models and not got.traffic_split

    def ids(flt: str) -> list[str]:
        return [e.name.rsplit("/", 1)[-1] for e in hooks.endpoints.list_endpoints(
            project_id=PROJECT, region=REGION, filter=flt)]

    assert sorted(ids(f'labels.team="{team}"')) == sorted([a, b])
    assert ids(f'labels.team="{team}" AND labels.target="cloud"') == [b]
    assert ids(f'display_name="{got.display_name}"') == [a]

    updated = hooks.endpoints.update_endpoint(
        project_id=PROJECT, region=REGION, endpoint_id=a,
        endpoint={"display_name": "renamed", "labels": {"team": team, "stage": "prod"}},
        update_mask={"paths": ["display_name", "labels"]})
    assert updated.display_name == "renamed" and dict(updated.labels) == {"team": team, "stage": "prod"}
    assert _get(hooks, a).display_name == "renamed" and ids(f'labels.stage="prod" AND labels.team="{team}"') == [a]
    with pytest.raises(InvalidArgument, match="update_mask"):
        hooks.endpoints.update_endpoint(project_id=PROJECT, region=REGION, endpoint_id=a,
                                        endpoint={"network": "x"}, update_mask={"paths": ["network"]})
    with pytest.raises(InvalidArgument, match="display_name"):
        hooks.endpoints.create_endpoint(project_id=PROJECT, region=REGION, endpoint={"display_name": ""})

    op = hooks.endpoints.delete_endpoint(project_id=PROJECT, region=REGION, endpoint=b)
    hooks.endpoints.wait_for_operation_result(op, timeout=60, polling=FAST)
    with pytest.raises(NotFound):
        _get(hooks, b)
    assert ids(f'labels.team="{team}"') == [a]


# ---------------------------------------------------------------- deploy, split, routing


def test_canary_split_routes_predictions_and_undeploy_rules(hooks, localcloud):
    from google.api_core.exceptions import FailedPrecondition, InvalidArgument

    name = f"lc-canary-{uuid.uuid4().hex[:6]}"
    v1 = _upload(hooks, name, "v1", routes=False)  # Vertex's default routes
    model_id = v1.split("@")[0]
    v2 = _upload(hooks, name, "v2", parent_model=model_id)
    endpoint = _endpoint(hooks)

    dm1 = _deploy(hooks, endpoint, v1, {"0": 100})
    ep = _get(hooks, endpoint)
    assert [(d.id, d.model, d.model_version_id) for d in ep.deployed_models] == [
        (dm1, f"{PARENT}/models/{model_id}", "1")]
    assert dict(ep.traffic_split) == {dm1: 100}
    r = _predict(hooks, endpoint, [{"x": 1}, {"x": 2}])
    assert r.deployed_model_id == dm1 and r.model_version_id == "1" and r.model == f"{PARENT}/models/{model_id}"
    assert [p["version"] for p in r.predictions] == ["v1", "v1"] and r.model_display_name == name
    # Rules checked before anything starts: sum 100, known ids only.
    with pytest.raises(InvalidArgument, match="must be 100"):
        _deploy_op(hooks, endpoint, v2, {"0": 10, dm1: 80})
    with pytest.raises(InvalidArgument, match=r"DeployedModel ID\(s\) \['123'\] do not exist"):
        _deploy_op(hooks, endpoint, v2, {"0": 10, "123": 90})
    assert [d.id for d in _get(hooks, endpoint).deployed_models] == [dm1]

    # The canary: 10 % to the new version.
    dm2 = _deploy(hooks, endpoint, v2, {"0": 10, dm1: 90})
    assert dm2 != dm1
    assert _split(hooks, endpoint) == {dm1: 90, dm2: 10} == _routing(localcloud, endpoint)
    counts = Counter()
    for _ in range(300):
        resp = _predict(hooks, endpoint)
        counts[resp.deployed_model_id] += 1
        expected = "v2" if resp.deployed_model_id == dm2 else "v1"
        assert resp.predictions[0]["version"] == expected
    assert set(counts) == {dm1, dm2}
    assert 8 <= counts[dm2] <= 65, counts  # 10 % of 300 = 30 (binomial sd 5.2)
    refs = hooks.models.get_model(project_id=PROJECT, region=REGION, model_id=v2).deployed_models
    assert [(x.endpoint, x.deployed_model_id) for x in refs] == [(f"{PARENT}/endpoints/{endpoint}", dm2)]

    with pytest.raises(InvalidArgument, match="must be 100"):
        _set_split(hooks, endpoint, {dm1: 50, dm2: 60})
    with pytest.raises(InvalidArgument, match="do not exist"):
        _set_split(hooks, endpoint, {dm1: 50, "999": 50})
    assert _split(hooks, endpoint) == {dm1: 90, dm2: 10}

    # Promote: all traffic to v2.
    assert dict(_set_split(hooks, endpoint, {dm2: 100, dm1: 0}).traffic_split) == {dm2: 100, dm1: 0}
    assert {_predict(hooks, endpoint).deployed_model_id for _ in range(20)} == {dm2}

    # Undeploy rules: a model with traffic can't go without a new split (unless it is the last).
    with pytest.raises(FailedPrecondition, match="traffic"):
        _undeploy(hooks, endpoint, dm2)
    with pytest.raises(InvalidArgument, match="do not exist"):
        _undeploy(hooks, endpoint, dm1, {dm1: 100})  # the split may not name the undeployed model
    old_pids = [r["pid"] for r in _replicas(localcloud, endpoint)[dm1]]
    _undeploy(hooks, endpoint, dm1)  # no traffic: fine without a split
    assert [d.id for d in _get(hooks, endpoint).deployed_models] == [dm2]
    assert _split(hooks, endpoint) == {dm2: 100}
    assert all(_wait_dead(pid) for pid in old_pids), "the undeployed model's process is still running"
    assert set(_replicas(localcloud, endpoint)) == {dm2}

    _undeploy(hooks, endpoint, dm2)  # the last one, traffic and all
    ep = _get(hooks, endpoint)
    assert not ep.deployed_models and not ep.traffic_split
    with pytest.raises(FailedPrecondition, match="doesn't have traffic_split"):
        _predict(hooks, endpoint)
    assert not hooks.models.get_model(project_id=PROJECT, region=REGION, model_id=v2).deployed_models


def test_undeploy_with_a_new_split_and_empty_splits(hooks, localcloud):
    name = f"lc-split-{uuid.uuid4().hex[:6]}"
    v1 = _upload(hooks, name, "v1")
    endpoint = _endpoint(hooks)
    dm1 = _deploy(hooks, endpoint, v1, None)  # an empty split is left as it is: no traffic yet
    assert _split(hooks, endpoint) == {} and [d.id for d in _get(hooks, endpoint).deployed_models] == [dm1]
    dm2 = _deploy(hooks, endpoint, v1, {"0": 60, dm1: 40})
    _undeploy(hooks, endpoint, dm2, {dm1: 100})  # traffic moves with the undeploy
    assert _split(hooks, endpoint) == {dm1: 100}
    assert _predict(hooks, endpoint).deployed_model_id == dm1
    # An empty split is allowed: the endpoint takes no traffic for now.
    _set_split(hooks, endpoint, {})
    dm3 = _deploy(hooks, endpoint, v1, None)
    _undeploy(hooks, endpoint, dm3)
    assert _split(hooks, endpoint) == {} and [d.id for d in _get(hooks, endpoint).deployed_models] == [dm1]
    _undeploy(hooks, endpoint, dm1)


def test_deploy_completes_only_when_the_model_server_is_healthy(hooks, localcloud):
    from google.api_core.exceptions import FailedPrecondition

    v1 = _upload(hooks, f"lc-slow-{uuid.uuid4().hex[:6]}", "v1", STAND_IN_READY_AFTER_S=2)
    endpoint = _endpoint(hooks)
    t0 = time.monotonic()
    op = _deploy_op(hooks, endpoint, v1, {"0": 100})
    time.sleep(0.8)
    assert not op.done(retry=None)
    assert not _get(hooks, endpoint).deployed_models  # not on the endpoint before it is healthy
    with pytest.raises(FailedPrecondition, match="operation in progress"):  # one mutation at a time
        _deploy_op(hooks, endpoint, v1, {"0": 100})
    dm = hooks.endpoints.wait_for_operation_result(op, timeout=60, polling=FAST).deployed_model.id
    assert time.monotonic() - t0 >= 2
    assert _predict(hooks, endpoint).deployed_model_id == dm  # serving at once, no warm-up errors
    assert all(r["ready"] for r in _replicas(localcloud, endpoint)[dm])
    _undeploy(hooks, endpoint, dm)


def test_a_model_server_that_dies_fails_the_deploy_and_leaves_nothing(hooks, localcloud):
    from airflow.providers.common.compat.sdk import AirflowException

    name = f"lc-dies-{uuid.uuid4().hex[:6]}"
    good = _upload(hooks, name, "good")
    bad = _upload(hooks, name, "bad", parent_model=good.split("@")[0], STAND_IN_HEALTH="exit")
    endpoint = _endpoint(hooks)
    dm = _deploy(hooks, endpoint, good, {"0": 100})
    before = _get(hooks, endpoint)
    with pytest.raises(AirflowException) as e:
        op = _deploy_op(hooks, endpoint, bad, {"0": 10, dm: 90})
        hooks.endpoints.wait_for_operation_result(op, timeout=60, polling=FAST)
    assert "Model server never became ready" in str(e.value) + repr(e.value.__cause__)
    assert "told to exit at start" in op.exception().message  # the container log's last lines
    after = _get(hooks, endpoint)
    assert [d.id for d in after.deployed_models] == [dm] and dict(after.traffic_split) == {dm: 100}
    assert after.etag == before.etag
    assert set(_replicas(localcloud, endpoint)) == {dm} and _routing(localcloud, endpoint) == {dm: 100}
    assert _predict(hooks, endpoint).deployed_model_id == dm
    _undeploy(hooks, endpoint, dm)


def test_injected_operation_fault_fails_deploy_then_deploy_works(hooks, localcloud):
    from airflow.providers.common.compat.sdk import AirflowException

    v1 = _upload(hooks, f"lc-opfault-{uuid.uuid4().hex[:6]}", "v1")
    endpoint = _endpoint(hooks)
    dm1 = _deploy(hooks, endpoint, v1, {"0": 100})
    localcloud.clear_faults()
    localcloud.add_fault(kind="operation", method="DeployModel", code="INTERNAL", message="injected: deploy failed")
    try:
        with pytest.raises(AirflowException):
            op = _deploy_op(hooks, endpoint, v1, {"0": 10, dm1: 90})
            hooks.endpoints.wait_for_operation_result(op, timeout=60, polling=FAST)
        assert op.exception().message == "injected: deploy failed"
    finally:
        localcloud.clear_faults()
    assert [d.id for d in _get(hooks, endpoint).deployed_models] == [dm1]
    assert _split(hooks, endpoint) == {dm1: 100} == _routing(localcloud, endpoint)
    assert set(_replicas(localcloud, endpoint)) == {dm1}
    # The failed operation released the endpoint: the retry deploys.
    dm2 = _deploy(hooks, endpoint, v1, {"0": 10, dm1: 90})
    assert _split(hooks, endpoint) == {dm1: 90, dm2: 10}
    _undeploy(hooks, endpoint, dm2, {dm1: 100})
    _undeploy(hooks, endpoint, dm1)


def test_mutate_deployed_model_replica_count(hooks, localcloud):
    from google.api_core.exceptions import InvalidArgument

    v1 = _upload(hooks, f"lc-mutate-{uuid.uuid4().hex[:6]}", "v1")
    endpoint = _endpoint(hooks)
    dm = _deploy(hooks, endpoint, v1, {"0": 100})
    client = hooks.endpoints.get_endpoint_service_client(REGION)

    def mutate(min_count: int, max_count: int):
        op = client.mutate_deployed_model(
            endpoint=f"{PARENT}/endpoints/{endpoint}",
            deployed_model={"id": dm, "dedicated_resources": {"min_replica_count": min_count,
                                                              "max_replica_count": max_count}},
            update_mask={"paths": ["dedicated_resources.min_replica_count", "dedicated_resources.max_replica_count"]})
        return op.result(timeout=60, polling=FAST).deployed_model

    assert mutate(2, 3).dedicated_resources.min_replica_count == 2
    replicas = _replicas(localcloud, endpoint)[dm]
    assert len(replicas) == 2 and all(r["ready"] for r in replicas)
    assert len({r["pid"] for r in replicas}) == 2
    stored = _get(hooks, endpoint).deployed_models[0].dedicated_resources
    assert (stored.min_replica_count, stored.max_replica_count) == (2, 3)
    pids = {_predict(hooks, endpoint).predictions[0]["pid"] for _ in range(8)}
    assert pids == {r["pid"] for r in replicas}  # both replicas serve

    mutate(1, 1)
    assert len(_replicas(localcloud, endpoint)[dm]) == 1
    surplus = [r["pid"] for r in replicas if r["index"] == 1]
    assert all(_wait_dead(pid) for pid in surplus)
    assert _predict(hooks, endpoint).deployed_model_id == dm
    with pytest.raises(InvalidArgument, match="max_replica_count"):
        mutate(3, 2)
    with pytest.raises(InvalidArgument, match="update_mask"):
        client.mutate_deployed_model(endpoint=f"{PARENT}/endpoints/{endpoint}", deployed_model={"id": dm},
                                     update_mask={"paths": ["model"]})
    _undeploy(hooks, endpoint, dm)


def test_a_crashed_replica_is_restarted_and_serves_again(hooks, localcloud):
    from google.api_core.exceptions import ServiceUnavailable

    v1 = _upload(hooks, f"lc-crash-{uuid.uuid4().hex[:6]}", "v1")
    endpoint = _endpoint(hooks)
    dm = _deploy(hooks, endpoint, v1, {"0": 100})
    old = _replicas(localcloud, endpoint)[dm][0]["pid"]
    os.kill(old, signal.SIGKILL)
    deadline, answered = time.monotonic() + 30, None
    while time.monotonic() < deadline:
        try:
            answered = _predict(hooks, endpoint)
            if answered.predictions[0]["pid"] != old:
                break
        except ServiceUnavailable:  # while the replica restarts (as Vertex answers 503)
            pass
        time.sleep(0.1)
    assert answered is not None and answered.predictions[0]["pid"] != old
    assert _replicas(localcloud, endpoint)[dm][0]["pid"] == answered.predictions[0]["pid"]
    _undeploy(hooks, endpoint, dm)


# ---------------------------------------------------------------- prediction: limits, REST, faults


@pytest.fixture(scope="module")
def served(hooks, localcloud):
    """One endpoint with one stand-in model at 100 %: (endpoint id, deployed model id)."""
    v1 = _upload(hooks, f"lc-served-{uuid.uuid4().hex[:6]}", "v1")
    endpoint = _endpoint(hooks)
    dm = _deploy(hooks, endpoint, v1, {"0": 100})
    yield endpoint, dm
    _undeploy(hooks, endpoint, dm)


def test_request_over_1_5_mb_is_refused(hooks, localcloud, served):
    from google.api_core.exceptions import InvalidArgument

    endpoint, dm = served
    assert _predict(hooks, endpoint, [{"b64": "A" * 1_400_000}]).deployed_model_id == dm
    with pytest.raises(InvalidArgument, match="Request payload size exceeds the limit: 1572864 bytes"):
        _predict(hooks, endpoint, [{"b64": "A" * 1_600_000}])
    body = json.dumps({"instances": [{"b64": "A" * 1_600_000}]}).encode()
    status, _, answer = _rest(localcloud, f"/v1/{PARENT}/endpoints/{endpoint}:predict", body)
    assert status == 400 and answer["error"]["status"] == "INVALID_ARGUMENT"
    assert "1572864" in answer["error"]["message"]


def test_rest_predict_answers_like_grpc(hooks, localcloud, served):
    endpoint, dm = served
    body = json.dumps({"instances": [{"x": 1}, {"x": 2}]}).encode()
    status, _, answer = _rest(localcloud, f"/v1/{PARENT}/endpoints/{endpoint}:predict", body)
    assert status == 200
    assert answer["deployedModelId"] == dm and answer["modelVersionId"] == "1"
    assert [p["version"] for p in answer["predictions"]] == ["v1", "v1"]
    grpc_answer = _predict(hooks, endpoint, [{"x": 1}, {"x": 2}])
    assert [dict(p) for p in grpc_answer.predictions] == answer["predictions"]

    status, headers, raw = _rest(localcloud, f"/v1/{PARENT}/endpoints/{endpoint}:rawPredict", body)
    assert status == 200 and headers["X-Vertex-AI-Deployed-Model-Id"] == dm
    assert "deployedModelId" not in raw and len(raw["predictions"]) == 2  # the container's own body
    grpc_raw = hooks.predict_client.raw_predict(
        endpoint=f"{PARENT}/endpoints/{endpoint}", http_body={"data": body, "content_type": "application/json"})
    assert json.loads(grpc_raw.data)["predictions"] == raw["predictions"]
    # REST is where clients derive it from VERTEX_AI_EMULATOR_HOST (the gRPC port + 1).
    from dual_deploy.emulator_hosts import vertex_rest_base_url

    assert vertex_rest_base_url(REGION) == localcloud.http

    status, _, answer = _rest(localcloud, f"/v1/{PARENT}/endpoints/404404:predict", body)
    assert status == 404 and answer["error"]["status"] == "NOT_FOUND"
    status, _, answer = _rest(localcloud, f"/v1/{PARENT}/endpoints/{endpoint}:predict", b'{"instances": 1}')
    assert status == 400 and "instances" in answer["error"]["message"]


def test_predict_fault_on_a_deployed_model_is_unavailable(hooks, localcloud, served):
    from google.api_core.exceptions import ServiceUnavailable

    endpoint, dm = served
    localcloud.clear_faults()
    localcloud.add_fault(kind="predict", deployed_model_id=dm, http_status=503, times=2,
                         message="injected: model overloaded")
    try:
        for _ in range(2):
            with pytest.raises(ServiceUnavailable, match="HTTP 503"):
                _predict(hooks, endpoint)
        assert _predict(hooks, endpoint).deployed_model_id == dm  # times=2: the third goes through
        localcloud.add_fault(kind="predict", deployed_model_id=dm, http_status=503, times=1)
        status, _, answer = _rest(localcloud, f"/v1/{PARENT}/endpoints/{endpoint}:predict", b'{"instances": [1]}')
        assert status == 503 and answer["error"]["status"] == "UNAVAILABLE"
        localcloud.add_fault(kind="predict", deployed_model_id="not-this-one", http_status=500, times=0)
        assert _predict(hooks, endpoint).deployed_model_id == dm  # another model's fault
    finally:
        localcloud.clear_faults()


# ---------------------------------------------------------------- zero failed requests


class _Poller(threading.Thread):
    """Predicts in a loop with no client retries; records (start, end, deployed model id or error)."""

    def __init__(self, client, endpoint_id: str):
        super().__init__(daemon=True)
        self.client, self.endpoint = client, f"{PARENT}/endpoints/{endpoint_id}"
        self.results: list[tuple[float, float, str]] = []
        self.errors: list[str] = []
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            t0 = time.monotonic()
            try:
                r = self.client.predict(endpoint=self.endpoint, instances=[{"x": 1}], retry=None, timeout=30)
                got = r.deployed_model_id
                assert r.predictions[0]["deployed_model_id"] == got  # answered by the model it names
            except Exception as e:  # noqa: BLE001 - every failure counts
                self.errors.append(repr(e))
                got = "error"
            self.results.append((t0, time.monotonic(), got))

    def ids_after(self, t: float) -> set[str]:
        return {got for start, _, got in self.results if start > t}

    def ids_between(self, t0: float, t1: float) -> set[str]:
        return {got for start, end, got in self.results if start > t0 and end < t1}


def test_promote_and_rollback_fail_no_request(hooks, localcloud):
    name = f"lc-zero-{uuid.uuid4().hex[:6]}"
    v1 = _upload(hooks, name, "v1")
    v2 = _upload(hooks, name, "v2", parent_model=v1.split("@")[0])
    endpoint = _endpoint(hooks)
    dm1 = _deploy(hooks, endpoint, v1, {"0": 100})
    poller = _Poller(hooks.predict_client, endpoint)
    poller.start()
    try:
        time.sleep(0.5)
        # Release: canary at 10 %, promote, retire the old deployment.
        dm2 = _deploy(hooks, endpoint, v2, {"0": 10, dm1: 90})
        t_canary = time.monotonic()
        time.sleep(1.0)
        _set_split(hooks, endpoint, {dm2: 100, dm1: 0})
        t_promoted = time.monotonic()
        time.sleep(0.5)
        _undeploy(hooks, endpoint, dm1)
        time.sleep(0.5)
        # Rollback: v1 back beside v2 with no traffic, all traffic to it, then v2 retired.
        dm3 = _deploy(hooks, endpoint, v1, {"0": 0, dm2: 100})
        t_back_deployed = time.monotonic()
        _set_split(hooks, endpoint, {dm3: 100, dm2: 0})
        t_rolled_back = time.monotonic()
        time.sleep(0.5)
        _undeploy(hooks, endpoint, dm2)
        time.sleep(0.5)
    finally:
        poller.stop.set()
        poller.join(30)
    assert poller.errors == [], poller.errors[:5]
    assert len(poller.results) > 50, len(poller.results)
    assert poller.ids_between(0, t_canary) <= {dm1, dm2}
    assert poller.ids_between(t_promoted, t_back_deployed) == {dm2}
    assert poller.ids_after(t_rolled_back) == {dm3}
    assert {dm1, dm2, dm3} == {got for _, _, got in poller.results}
    ep = _get(hooks, endpoint)
    assert [d.id for d in ep.deployed_models] == [dm3] and dict(ep.traffic_split) == {dm3: 100}
    assert ep.deployed_models[0].model_version_id == "1"
    _undeploy(hooks, endpoint, dm3)

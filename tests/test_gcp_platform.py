"""The GCP platform at the API boundary: no credentials, no network.

As the Google provider's own tests do, hooks are patched where the operators use them
(``dual_deploy.operators.vertex.<Hook>``, ``...operators.vertex_ai.custom_job.CustomJobHook``) and
the tests assert the exact arguments of every Vertex AI call. Responses are real
``google.cloud.aiplatform_v1`` messages, so attribute names and field names are checked too.
The last section parses the DAG with DagBag for both platforms (subprocesses, sockets blocked)
and compares their shapes.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import yaml
from airflow.providers.google.cloud.hooks.vertex_ai.model_service import ModelServiceHook
from airflow.providers.google.cloud.operators.vertex_ai.custom_job import CreateCustomJobOperator
from airflow.providers.google.cloud.operators.vertex_ai.model_service import UploadModelOperator
from airflow.providers.google.cloud.triggers.vertex_ai import CustomJobTrigger
from airflow.sdk import DAG
from airflow.sdk.exceptions import AirflowException, AirflowFailException, TaskDeferred
from google.api_core.exceptions import InternalServerError, NotFound
from google.api_core.gapic_v1.method import DEFAULT
from google.cloud.aiplatform_v1.types import (
    CustomJob,
    DeployedModel,
    DeployModelRequest,
    DeployModelResponse,
    Endpoint,
    Model,
    PredictResponse,
    UndeployModelResponse,
    UpdateEndpointRequest,
    UploadModelRequest,
    UploadModelResponse,
)
from google.protobuf.field_mask_pb2 import FieldMask

from dual_deploy.config import DEFAULT_CONFIG, build_config
from dual_deploy.dag_helpers import TEMPLATE_FILTERS
from dual_deploy.operators.vertex import (
    CanaryDeployModelOperator,
    RegisterModelVersionOperator,
    canary_traffic_split,
    smoke_attempts,
)
from dual_deploy.platforms import build_target_group
from dualml.dataset import SplitManifest

ROOT = Path(__file__).resolve().parents[1]
PROJECT, REGION = "test-project", "europe-west4"
TRAINER = "europe-west4-docker.pkg.dev/test-project/dual-deploy/trainer:abc123"
SERVING = "europe-west4-docker.pkg.dev/test-project/dual-deploy/serving:abc123"
SA = "trainer@test-project.iam.gserviceaccount.com"
RUN_URI = "gs://test-bucket/runs/{{ run_id | slug }}"
SPLIT_URI = f"{RUN_URI}/split.json"
CUSTOM_JOB_HOOK = "airflow.providers.google.cloud.operators.vertex_ai.custom_job.CustomJobHook"
PROVIDER_MODEL_HOOK = "airflow.providers.google.cloud.operators.vertex_ai.model_service.ModelServiceHook"
CONTEXT_KEYS = ("ti", "task")


def _context() -> dict:
    return {k: mock.MagicMock() for k in CONTEXT_KEYS}


def gcp_raw() -> dict:
    """The shipped config with its GCP placeholders filled, a spot 3-replica cloud target and a
    CPU-only mobile target."""
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    raw["artifacts_uri"] = "gs://test-bucket/runs"
    raw["data"]["uri"] = "gs://test-bucket/datasets/flowers"
    for section in raw.values():  # e.g. triggers: gs://YOUR_BUCKET/... is not a valid bucket name
        if isinstance(section, dict):
            for k, v in section.items():
                if isinstance(v, str):
                    section[k] = v.replace("YOUR_BUCKET", "test-bucket")
    raw["gcp"].update(project=PROJECT, region=REGION, trainer_image=TRAINER,
                      serving_image=SERVING, service_account=SA, firebase_project="test-firebase",
                      firebase_storage_bucket="test-firebase.appspot.com")
    cloud = next(t for t in raw["targets"] if t["name"] == "cloud")
    cloud["training"].update(machine_type="n1-highmem-8", accelerator_type="NVIDIA_L4", accelerator_count=2,
                             replica_count=3, spot=True)
    mobile = next(t for t in raw["targets"] if t["name"] == "mobile")
    mobile["training"].update(accelerator_type=None, accelerator_count=0)
    return raw


@pytest.fixture(scope="module")
def cfg():
    return build_config(copy.deepcopy(gcp_raw()), "gcp")


@pytest.fixture(scope="module")
def dag(cfg):
    with DAG("gcp_builder_test", schedule=None, user_defined_filters=TEMPLATE_FILTERS) as d:
        for t in cfg.targets:
            build_target_group(t, cfg, RUN_URI, SPLIT_URI)
    return d


# ================================================================ the builder's training job


def test_cloud_train_is_a_deferrable_custom_job_with_the_exact_spec(dag, cfg):
    op = dag.get_task("cloud.train")
    assert isinstance(op, CreateCustomJobOperator)
    assert (op.project_id, op.region, op.gcp_conn_id, op.deferrable) == (PROJECT, REGION, "google_cloud_default", True)
    assert op.base_output_dir == f"{RUN_URI}/cloud"
    args = [
        "--architecture=densenet121",
        f"--split-uri={SPLIT_URI}",
        "--image-size=224", "--batch-size=32", "--learning-rate=0.001", "--weights=imagenet",
        "--fine-tune-epochs=5", "--fine-tune-at=300", "--early-stopping-patience=3", "--augment=true", "--deterministic=false",
        "--epochs={{ params.epochs or 10 }}",
    ]
    machine = {"machine_type": "n1-highmem-8", "accelerator_type": "NVIDIA_L4", "accelerator_count": 2}
    assert op.custom_job == {
        "display_name": "dual-deploy-cloud-{{ run_id | slug }}",
        "labels": {"app": "dual-deploy", "target": "cloud"},
        "job_spec": {
            "worker_pool_specs": [
                {"machine_spec": machine, "replica_count": 1, "container_spec": {"image_uri": TRAINER, "args": args}},
                {"machine_spec": machine, "replica_count": 2, "container_spec": {"image_uri": TRAINER, "args": args}},
            ],
            "base_output_directory": {"output_uri_prefix": f"{RUN_URI}/cloud"},
            "service_account": SA,
            "scheduling": {"strategy": "SPOT"},
        },
    }
    # Valid for the API: field names and enum values parse into the CustomJob message.
    job = CustomJob(op.custom_job)
    assert job.job_spec.scheduling.strategy.name == "SPOT"
    assert job.job_spec.worker_pool_specs[1].machine_spec.accelerator_type.name == "NVIDIA_L4"


def test_custom_job_renders_per_run(dag):
    op = dag.get_task("cloud.train")
    context = {"run_id": "scheduled__2026-01-05T03:00:00+00:00", "params": {"epochs": None}}
    rendered = op.render_template(op.custom_job, context, jinja_env=dag.get_template_env())
    run = "scheduled-2026-01-05t03-00-00-00-00"
    assert rendered["display_name"] == f"dual-deploy-cloud-{run}"
    assert rendered["job_spec"]["base_output_directory"] == {"output_uri_prefix": f"gs://test-bucket/runs/{run}/cloud"}
    args = rendered["job_spec"]["worker_pool_specs"][0]["container_spec"]["args"]
    assert f"--split-uri=gs://test-bucket/runs/{run}/split.json" in args and "--epochs=10" in args
    context["params"]["epochs"] = 3
    rendered = op.render_template(op.custom_job, context, jinja_env=dag.get_template_env())
    assert "--epochs=3" in rendered["job_spec"]["worker_pool_specs"][1]["container_spec"]["args"]


def test_mobile_train_without_accelerator_spot_or_extra_replicas(dag):
    op = dag.get_task("mobile.train")
    spec = op.custom_job["job_spec"]
    assert [p["machine_spec"] for p in spec["worker_pool_specs"]] == [{"machine_type": "n1-standard-4"}]
    assert spec["worker_pool_specs"][0]["replica_count"] == 1
    assert "scheduling" not in spec
    assert spec["base_output_directory"] == {"output_uri_prefix": f"{RUN_URI}/mobile"}
    assert "--architecture=mobilenet_v3_small" in spec["worker_pool_specs"][0]["container_spec"]["args"]


def test_endpoint_and_mobile_steps_are_wired_from_config(dag):
    register = dag.get_task("cloud.register_model")
    assert isinstance(register, UploadModelOperator)
    assert (register.display_name, register.serving_image) == ("flowers-densenet121", SERVING)
    assert register.version_aliases == ["run-{{ run_id | slug }}"] and register.is_default_version is True
    deploy = dag.get_task("cloud.deploy")
    assert (deploy.endpoint_display_name, deploy.machine_type, deploy.min_replica_count, deploy.max_replica_count,
            deploy.canary_traffic_percent, deploy.smoke_instances) == ("flowers-cloud-endpoint", "n1-standard-4", 1, 2,
                                                                         10, 2)
    assert dag.get_task("mobile.convert_tflite").output_dir == f"{RUN_URI}/mobile/tflite"
    publish = dag.get_task("mobile.publish")
    assert (publish.backend, publish.firebase_conn_id, publish.firebase_project, publish.firebase_storage_bucket) == (
        "firebase_ml", "firebase_default", "test-firebase", "test-firebase.appspot.com")
    assert publish.tflite_uri.operator is dag.get_task("mobile.convert_tflite")
    assert dag.get_task("mobile.convert_tflite").model_dir.operator is dag.get_task("mobile.train")
    assert register.artifact_uri.operator is dag.get_task("cloud.train") and deploy.model.operator is register


# ================================================================ training: deferral and completion


@pytest.fixture
def train_op(dag):
    return dag.get_task("cloud.train")


@mock.patch(CUSTOM_JOB_HOOK)
def test_train_defers_on_the_custom_job_trigger(mock_hook, train_op):
    hook = mock_hook.return_value
    hook.create_custom_job.return_value.name = f"projects/{PROJECT}/locations/{REGION}/customJobs/4242"
    hook.extract_custom_job_id.return_value = "4242"
    with pytest.raises(TaskDeferred) as deferred:
        train_op.execute(context=_context())
    mock_hook.assert_called_once_with(gcp_conn_id="google_cloud_default", impersonation_chain=None)
    hook.create_custom_job.assert_called_once_with(
        project_id=PROJECT, region=REGION, custom_job=train_op.custom_job, retry=DEFAULT, timeout=None, metadata=(),
    )
    hook.wait_for_custom_job.assert_not_called()
    trigger = deferred.value.trigger
    assert isinstance(trigger, CustomJobTrigger)
    assert trigger.serialize() == ("airflow.providers.google.cloud.triggers.vertex_ai.CustomJobTrigger", {
        "project_id": PROJECT, "location": REGION, "custom_job_id": "4242", "gcp_conn_id": "google_cloud_default",
        "impersonation_chain": None, "poll_interval": 60,
    })
    assert deferred.value.method_name == "execute_complete"


@mock.patch("dual_deploy.operators.vertex.GcsIO")
def test_train_completion_returns_the_local_trainers_xcom(mock_io, train_op):
    train_op.base_output_dir = "gs://test-bucket/runs/r1/cloud"  # as rendered
    metrics = {"accuracy": 0.91, "macro_f1": 0.9, "labels": ["daisy", "rose"]}
    mock_io.return_value.read_json.return_value = metrics
    job = {"name": f"projects/{PROJECT}/locations/{REGION}/customJobs/4242",
           "start_time": "2026-01-05T03:01:00.000Z", "end_time": "2026-01-05T03:21:30.500Z"}
    out = train_op.execute_complete(context=_context(), event={
        "status": "success", "message": "Custom Job 4242 completed with status JOB_STATE_SUCCEEDED", "custom_job": job,
    })
    mock_io.assert_called_once_with("google_cloud_default", impersonation_chain=None)
    mock_io.return_value.read_json.assert_called_once_with("gs://test-bucket/runs/r1/cloud/model/metrics.json")
    assert out == {
        "model_dir": "gs://test-bucket/runs/r1/cloud/model",
        "base_output_dir": "gs://test-bucket/runs/r1/cloud",
        "metrics": metrics,
        "custom_job_name": job["name"],
        "duration_s": 1230.5,
    }
    assert train_op.multiple_outputs is True  # downstream takes train.output["model_dir"]


@mock.patch("dual_deploy.operators.vertex.GcsIO")
def test_train_error_event_fails_the_task(mock_io, train_op):
    with pytest.raises(AirflowException, match="custom job .* failed: The replica workerpool0-0 exited with 1"):
        train_op.execute_complete(context=_context(), event={
            "status": "error", "message": "The replica workerpool0-0 exited with 1"})
    mock_io.assert_not_called()


# ================================================================ Model Registry versions


def _register_op(**kw) -> RegisterModelVersionOperator:
    return RegisterModelVersionOperator(
        task_id="register_model", project_id=PROJECT, region=REGION, display_name="flowers-densenet121",
        artifact_uri="gs://test-bucket/runs/r1/cloud/model/", serving_image=SERVING, version_aliases=["run-r1"],
        version_description="dual_deployment run r1", **kw,
    )


EXPECTED_MODEL = {
    "display_name": "flowers-densenet121",
    "artifact_uri": "gs://test-bucket/runs/r1/cloud/model",
    "version_aliases": ["run-r1", "default"],
    "container_spec": {"image_uri": SERVING, "predict_route": "/predict", "health_route": "/health",
                       "ports": [{"container_port": 8080}]},
    "version_description": "dual_deployment run r1",
}
MODELS = f"projects/{PROJECT}/locations/{REGION}/models"


@pytest.fixture
def model_hook():
    """One mock for both places ModelServiceHook is used: the lookup here, the upload in the provider."""
    with mock.patch("dual_deploy.operators.vertex.ModelServiceHook") as ours, \
            mock.patch(PROVIDER_MODEL_HOOK, new=ours):
        hook = ours.return_value
        hook.extract_model_id.side_effect = ModelServiceHook.extract_model_id
        yield ours, hook


def _assert_list_models(hook):
    hook.list_models.assert_called_once_with(
        project_id=PROJECT, region=REGION, filter='display_name="flowers-densenet121"', order_by="create_time")


def test_register_first_run_creates_the_model(model_hook):
    cls, hook = model_hook
    hook.list_models.return_value = []
    hook.wait_for_operation.return_value = UploadModelResponse(model=f"{MODELS}/555", model_version_id="1")
    out = _register_op().execute(context=_context())
    cls.assert_called_with(gcp_conn_id="google_cloud_default", impersonation_chain=None)
    _assert_list_models(hook)
    hook.get_model.assert_not_called()
    hook.upload_model.assert_called_once_with(
        project_id=PROJECT, region=REGION, model=EXPECTED_MODEL, parent_model=None, retry=DEFAULT, timeout=None,
        metadata=(),
    )
    UploadModelRequest(parent=f"projects/{PROJECT}/locations/{REGION}", model=EXPECTED_MODEL)  # a valid Model
    hook.wait_for_operation.assert_called_once_with(timeout=None, operation=hook.upload_model.return_value)
    assert out.pop("duration_s") >= 0
    assert out == {
        "model_id": "555", "model_version_id": "1", "model_resource_name": f"{MODELS}/555@1",
        "version_aliases": ["run-r1", "default"], "artifact_uri": "gs://test-bucket/runs/r1/cloud/model",
        "serving_container_image_uri": SERVING, "parent_model": None,
    }


def test_register_rerun_adds_a_version_under_the_parent(model_hook):
    _, hook = model_hook
    hook.list_models.return_value = [Model(name=f"{MODELS}/555", display_name="flowers-densenet121", version_id="1")]
    hook.get_model.side_effect = NotFound("no such alias")
    hook.wait_for_operation.return_value = UploadModelResponse(model=f"{MODELS}/555", model_version_id="2")
    out = _register_op().execute(context=_context())
    _assert_list_models(hook)
    hook.get_model.assert_called_once_with(project_id=PROJECT, region=REGION, model_id="555@run-r1")
    hook.upload_model.assert_called_once_with(
        project_id=PROJECT, region=REGION, model=EXPECTED_MODEL, parent_model="555", retry=DEFAULT, timeout=None,
        metadata=(),
    )
    assert (out["model_id"], out["model_version_id"], out["model_resource_name"], out["parent_model"]) == (
        "555", "2", f"{MODELS}/555@2", "555")


def test_register_retry_reuses_the_version_it_already_uploaded(model_hook):
    _, hook = model_hook
    hook.list_models.return_value = [Model(name=f"{MODELS}/555", display_name="flowers-densenet121")]
    hook.get_model.return_value = Model(name=f"{MODELS}/555", version_id="2", version_aliases=["run-r1", "default"],
                                        artifact_uri="gs://test-bucket/runs/r1/cloud/model")
    out = _register_op().execute(context=_context())
    hook.upload_model.assert_not_called()
    assert (out["model_resource_name"], out["version_aliases"]) == (f"{MODELS}/555@2", ["run-r1", "default"])


def test_register_without_default_alias():
    assert _register_op(is_default_version=False).build_model()["version_aliases"] == ["run-r1"]


# ================================================================ canary deployment

ENDPOINTS = f"projects/{PROJECT}/locations/{REGION}/endpoints"
LABELS = ["daisy", "rose"]
TEST_FILES = [("gs://test-bucket/datasets/flowers/daisy/1.jpg", 0), ("gs://test-bucket/datasets/flowers/rose/2.jpg", 1),
              ("gs://test-bucket/datasets/flowers/rose/3.jpg", 1)]
REGISTERED = {"model_id": "555", "model_version_id": "2", "model_resource_name": f"{MODELS}/555@2"}
EXPECTED_DEPLOYED_MODEL = {
    "model": f"{MODELS}/555@2",
    "display_name": "flowers-densenet121-v2",
    "dedicated_resources": {"machine_spec": {"machine_type": "n1-standard-4"}, "min_replica_count": 1,
                            "max_replica_count": 2},
}
URL = f"https://{REGION}-aiplatform.googleapis.com/v1/{ENDPOINTS}/777:predict"


def _deploy_op(**kw) -> CanaryDeployModelOperator:
    return CanaryDeployModelOperator(
        task_id="deploy", project_id=PROJECT, region=REGION, endpoint_display_name="flowers-cloud-endpoint",
        model_display_name="flowers-densenet121", model=dict(REGISTERED), split_uri="gs://test-bucket/runs/r1/split.json",
        machine_type="n1-standard-4", min_replica_count=1, max_replica_count=2, **kw,
    )


def _answer(served_by: str, labels=("daisy", "rose"), confidence=0.8) -> PredictResponse:
    """A PredictResponse as the API returns it (JSON, as on the wire)."""
    return PredictResponse.from_json(json.dumps({
        "predictions": [{"label": lab, "confidence": confidence} for lab in labels], "deployedModelId": served_by,
    }))


def _old_endpoint() -> Endpoint:
    return Endpoint(name=f"{ENDPOINTS}/777", display_name="flowers-cloud-endpoint",
                    deployed_models=[DeployedModel(id="111", model=f"{MODELS}/555@1")], traffic_split={"111": 100})


@pytest.fixture
def vertex():
    """Patched EndpointServiceHook / PredictionServiceHook (its client) / GcsIO; long-running
    operations resolve to real response messages."""
    manifest = SplitManifest(labels=LABELS, seed=1, fractions={"train": 0.7, "val": 0.15, "test": 0.15},
                             files={"train": [], "val": [], "test": TEST_FILES})
    blobs = {"gs://test-bucket/runs/r1/split.json": manifest.to_json().encode(),
             **{u: f"jpeg-{u}".encode() for u, _ in TEST_FILES}}
    with mock.patch("dual_deploy.operators.vertex.EndpointServiceHook") as ep_cls, \
            mock.patch("dual_deploy.operators.vertex.PredictionServiceHook") as pred_cls, \
            mock.patch("dual_deploy.operators.vertex.GcsIO") as io_cls:
        io_cls.return_value.read_bytes.side_effect = blobs.__getitem__
        ep = ep_cls.return_value
        results = {
            id(ep.create_endpoint.return_value): Endpoint(name=f"{ENDPOINTS}/777", display_name="flowers-cloud-endpoint"),
            id(ep.deploy_model.return_value): DeployModelResponse(deployed_model=DeployedModel(id="222")),
            id(ep.undeploy_model.return_value): UndeployModelResponse(),
        }
        ep.wait_for_operation.side_effect = lambda operation, timeout: results[id(operation)]
        yield ep_cls, ep, pred_cls.return_value.get_prediction_service_client.return_value


def _instances() -> list[dict]:
    import base64

    return [{"b64": base64.b64encode(f"jpeg-{u}".encode()).decode()} for u, _ in TEST_FILES[:2]]


def _assert_deployed(ep, traffic_split):
    ep.deploy_model.assert_called_once_with(project_id=PROJECT, region=REGION, endpoint="777",
                                            deployed_model=EXPECTED_DEPLOYED_MODEL, traffic_split=traffic_split)
    DeployModelRequest(endpoint=f"{ENDPOINTS}/777", deployed_model=EXPECTED_DEPLOYED_MODEL, traffic_split=traffic_split)
    ep.wait_for_operation.assert_any_call(operation=ep.deploy_model.return_value, timeout=3600)


def test_first_deploy_creates_the_endpoint_and_takes_all_traffic(vertex):
    ep_cls, ep, pred = vertex
    ep.list_endpoints.return_value = []
    pred.predict.return_value = _answer("222")
    out = _deploy_op().execute(context=_context())
    ep_cls.assert_called_once_with(gcp_conn_id="google_cloud_default", impersonation_chain=None)
    ep.list_endpoints.assert_called_once_with(project_id=PROJECT, region=REGION,
                                              filter='display_name="flowers-cloud-endpoint"', order_by="create_time")
    ep.create_endpoint.assert_called_once_with(project_id=PROJECT, region=REGION,
                                               endpoint={"display_name": "flowers-cloud-endpoint"})
    _assert_deployed(ep, {"0": 100})
    pred.predict.assert_called_once_with(endpoint=f"{ENDPOINTS}/777", instances=_instances(), timeout=60)
    ep.update_endpoint.assert_not_called()
    ep.undeploy_model.assert_not_called()
    assert out.pop("duration_s") >= 0
    assert out == {
        "endpoint_id": "777", "endpoint_display_name": "flowers-cloud-endpoint", "endpoint_created": True,
        "prediction_url": URL, "deployed_model_id": "222", "model_version_id": "2",
        "smoke_test": {"url": URL, "instances": 2, "predictions": ["daisy", "rose"], "expected": ["daisy", "rose"],
                       "deployed_model_id": "222", "requests": 1, "served_by": {"222": 1}},
        "traffic_split": {"222": 100}, "canary_traffic_percent": 100, "previous_deployed_model_ids": [],
        "undeployed": [], "undeploy_errors": {},
    }


def test_canary_then_promote_reuses_the_endpoint(vertex):
    _, ep, pred = vertex
    ep.list_endpoints.return_value = [_old_endpoint()]
    # On a 90/10 split the request may hit either model: the answers say which one served.
    pred.predict.side_effect = [_answer("111"), _answer("111"), _answer("222")]
    out = _deploy_op(canary_traffic_percent=10).execute(context=_context())
    ep.create_endpoint.assert_not_called()
    _assert_deployed(ep, {"0": 10, "111": 90})
    assert pred.predict.call_count == 3
    ep.update_endpoint.assert_called_once_with(project_id=PROJECT, region=REGION, endpoint_id="777",
                                               endpoint={"traffic_split": {"222": 100}},
                                               update_mask=FieldMask(paths=["traffic_split"]))
    UpdateEndpointRequest(endpoint={"name": f"{ENDPOINTS}/777", "traffic_split": {"222": 100}},
                          update_mask=FieldMask(paths=["traffic_split"]))
    ep.undeploy_model.assert_called_once_with(project_id=PROJECT, region=REGION, endpoint="777",
                                              deployed_model_id="111")
    # Promotion happens after the smoke test and before the old model goes.
    names = [c[0] for c in ep.method_calls if c[0] in ("deploy_model", "update_endpoint", "undeploy_model")]
    assert names == ["deploy_model", "update_endpoint", "undeploy_model"]
    assert out["endpoint_created"] is False
    assert (out["deployed_model_id"], out["canary_traffic_percent"], out["undeployed"]) == ("222", 10, ["111"])
    assert out["previous_deployed_model_ids"] == ["111"]
    assert out["smoke_test"]["requests"] == 3 and out["smoke_test"]["served_by"] == {"111": 2, "222": 1}


def _assert_rolled_back(ep):
    ep.undeploy_model.assert_called_once_with(project_id=PROJECT, region=REGION, endpoint="777",
                                              deployed_model_id="222", traffic_split={"111": 100})
    ep.wait_for_operation.assert_any_call(operation=ep.undeploy_model.return_value, timeout=3600)
    ep.update_endpoint.assert_not_called()


def test_bad_canary_answer_rolls_back(vertex):
    _, ep, pred = vertex
    ep.list_endpoints.return_value = [_old_endpoint()]
    pred.predict.side_effect = [_answer("111"), _answer("222", labels=("daisy", "tulip"))]
    with pytest.raises(AirflowFailException) as failed:
        _deploy_op().execute(context=_context())
    msg = str(failed.value)
    assert "smoke test of model version 2 (deployed model 222) failed" in msg
    assert "label 'tulip' is not one of the model's labels" in msg
    assert "Rolled back" in msg and "{'111': 100}" in msg
    _assert_rolled_back(ep)


def test_failing_prediction_during_canary_rolls_back(vertex):
    _, ep, pred = vertex
    ep.list_endpoints.return_value = [_old_endpoint()]
    pred.predict.side_effect = [_answer("111"), InternalServerError("model server crashed")]
    with pytest.raises(AirflowFailException, match="prediction request 2 to endpoint 777 failed: .*model server crashed"):
        _deploy_op().execute(context=_context())
    _assert_rolled_back(ep)


def test_canary_that_never_answers_rolls_back(vertex):
    _, ep, pred = vertex
    ep.list_endpoints.return_value = [_old_endpoint()]
    pred.predict.return_value = _answer("111")
    with pytest.raises(AirflowFailException, match=r"answered none of 88 requests at 10 % of the traffic"):
        _deploy_op(canary_traffic_percent=10).execute(context=_context())
    assert pred.predict.call_count == 88
    _assert_rolled_back(ep)


def test_first_deploy_rollback_leaves_an_empty_endpoint(vertex):
    _, ep, pred = vertex
    ep.list_endpoints.return_value = []
    pred.predict.return_value = _answer("222", labels=())
    with pytest.raises(AirflowFailException, match="expected 2 predictions"):
        _deploy_op().execute(context=_context())
    ep.undeploy_model.assert_called_once_with(project_id=PROJECT, region=REGION, endpoint="777",
                                              deployed_model_id="222", traffic_split=None)


def test_smoke_request_goes_through_the_real_prediction_client(vertex):
    """The real generated PredictionServiceClient (from the hook) builds the request; only its RPC is faked.
    PredictionServiceHook.predict() itself cannot be used: proto-plus cannot build a PredictRequest
    with `instances` in the constructor (googleapis/proto-plus-python#488)."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud.aiplatform_v1 import PredictionServiceClient
    from google.cloud.aiplatform_v1.types import PredictRequest

    with pytest.raises(TypeError, match="instances is not iterable"):
        PredictRequest({"endpoint": f"{ENDPOINTS}/777", "instances": _instances(), "parameters": None})

    _, ep, _ = vertex
    ep.list_endpoints.return_value = []
    client = PredictionServiceClient(credentials=AnonymousCredentials(),
                                     client_options={"api_endpoint": f"{REGION}-aiplatform.googleapis.com:443"})
    sent = []

    def rpc(request, retry, timeout, metadata):
        sent.append((request, timeout, metadata))
        return _answer("222")

    with mock.patch("dual_deploy.operators.vertex.PredictionServiceHook") as pred_cls, \
            mock.patch.dict(client._transport._wrapped_methods, {client._transport.predict: rpc}):
        pred_cls.return_value.get_prediction_service_client.return_value = client
        out = _deploy_op().execute(context=_context())
    pred_cls.assert_called_once_with(gcp_conn_id="google_cloud_default", impersonation_chain=None)
    pred_cls.return_value.get_prediction_service_client.assert_called_once_with(REGION)
    ((request, timeout, metadata),) = sent
    assert isinstance(request, PredictRequest) and timeout == 60
    assert PredictRequest.to_dict(request)["instances"] == _instances()
    assert request.endpoint == f"{ENDPOINTS}/777"
    assert ("x-goog-request-params", f"endpoint={ENDPOINTS}/777") in metadata  # routing header
    assert out["smoke_test"]["predictions"] == ["daisy", "rose"]


class FakeEndpointService:
    """A stateful stand-in for EndpointServiceHook: endpoints, deployments and traffic splits."""

    def __init__(self):
        self.endpoints: dict[str, Endpoint] = {}
        self.next_id = 100

    def _new_id(self) -> str:
        self.next_id += 1
        return str(self.next_id)

    def list_endpoints(self, *, project_id, region, filter, order_by):
        name = filter.split('"')[1]
        return [e for e in self.endpoints.values() if e.display_name == name]

    def create_endpoint(self, *, project_id, region, endpoint):
        e = Endpoint(name=f"{ENDPOINTS}/{self._new_id()}", display_name=endpoint["display_name"])
        self.endpoints[e.name] = e
        return e

    def _get(self, endpoint_id) -> Endpoint:
        return self.endpoints[f"{ENDPOINTS}/{endpoint_id}"]

    def deploy_model(self, *, project_id, region, endpoint, deployed_model, traffic_split):
        e, new = self._get(endpoint), self._new_id()
        e.deployed_models.append(DeployedModel(id=new, model=deployed_model["model"]))
        e.traffic_split = {(new if k == "0" else k): v for k, v in traffic_split.items()}
        return DeployModelResponse(deployed_model=DeployedModel(id=new))

    def update_endpoint(self, *, project_id, region, endpoint_id, endpoint, update_mask):
        self._get(endpoint_id).traffic_split = endpoint["traffic_split"]

    def undeploy_model(self, *, project_id, region, endpoint, deployed_model_id, traffic_split=None):
        e = self._get(endpoint)
        assert not e.traffic_split.get(deployed_model_id) or traffic_split is not None, "undeploying a live model"
        e.deployed_models = [d for d in e.deployed_models if d.id != deployed_model_id]
        e.traffic_split = traffic_split or {k: v for k, v in e.traffic_split.items() if k != deployed_model_id}
        return UndeployModelResponse()

    def wait_for_operation(self, *, operation, timeout):
        return operation


def test_reruns_never_duplicate_the_endpoint_and_end_on_the_newest_version():
    fake = FakeEndpointService()
    with mock.patch("dual_deploy.operators.vertex.EndpointServiceHook") as ep_cls, \
            mock.patch("dual_deploy.operators.vertex.PredictionServiceHook") as pred_cls, \
            mock.patch.object(CanaryDeployModelOperator, "smoke_test", return_value={"predictions": ["daisy"]}):
        ep_cls.return_value = mock.MagicMock(wraps=fake)
        outs = []
        for version in ("1", "2", "3"):
            op = _deploy_op(canary_traffic_percent=25)
            op.model = {"model_version_id": version, "model_resource_name": f"{MODELS}/555@{version}"}
            outs.append(op.execute(context=_context()))
    pred_cls.assert_not_called()  # smoke_test itself is stubbed here
    assert ep_cls.return_value.create_endpoint.call_count == 1
    assert [o["endpoint_created"] for o in outs] == [True, False, False]
    assert len({o["endpoint_id"] for o in outs}) == 1 and len(fake.endpoints) == 1
    (endpoint,) = fake.endpoints.values()
    assert [d.model for d in endpoint.deployed_models] == [f"{MODELS}/555@3"]
    assert dict(endpoint.traffic_split) == {outs[-1]["deployed_model_id"]: 100}
    assert [o["canary_traffic_percent"] for o in outs] == [100, 25, 25]


# ================================================================ pure helpers


@pytest.mark.parametrize(("current", "canary", "expected"), [
    ({}, 10, {"0": 100}),
    ({"111": 100}, 10, {"0": 10, "111": 90}),
    ({"111": 100}, 100, {"0": 100}),
    ({"a": 70, "b": 30}, 10, {"0": 10, "a": 63, "b": 27}),
    ({"a": 50, "b": 50}, 15, {"0": 15, "a": 42, "b": 43}),
    ({"a": 100, "b": 0}, 20, {"0": 20, "a": 80}),
])
def test_canary_traffic_split(current, canary, expected):
    split = canary_traffic_split(current, canary)
    assert split == expected and sum(split.values()) == 100


def test_smoke_attempts():
    assert smoke_attempts(100, 1e-4, 200) == 1
    assert smoke_attempts(10, 1e-4, 200) == 88  # 0.9 ** 88 < 1e-4
    assert smoke_attempts(50, 1e-4, 200) == 14
    assert smoke_attempts(1, 1e-4, 200) == 200


# ================================================================ the DAG as Airflow parses it


_DESCRIBE = r"""
import json, os, socket, sys
attempts = []
def _blocked(*args, **kwargs):
    attempts.append(repr(args)[:200])
    raise OSError("network is disabled while parsing")
socket.socket.connect = _blocked
socket.create_connection = _blocked
from airflow.dag_processing.dagbag import DagBag
out = {}
for platform in sys.argv[2:]:  # gcp first: its parse time is measured in a fresh interpreter
    os.environ["DUAL_DEPLOY_PLATFORM"] = platform
    bag = DagBag(dag_folder=sys.argv[1])
    dag = bag.dags.get("dual_deployment")
    d = out[platform] = {"import_errors": {k: str(v)[-3000:] for k, v in bag.import_errors.items()},
                         "durations": {s.file: s.duration.total_seconds() for s in bag.dagbag_stats}}
    if dag is not None:
        d["tags"] = sorted(dag.tags)
        d["groups"] = sorted(k for k, v in dag.task_group.children.items() if hasattr(v, "children"))
        d["tasks"] = {t.task_id: {"upstream": sorted(t.upstream_task_ids), "downstream": sorted(t.downstream_task_ids),
                                  "group": t.task_group.group_id, "trigger_rule": str(t.trigger_rule),
                                  "operator": type(t).__name__,
                                  "bases": [c.__name__ for c in type(t).__mro__]} for t in dag.tasks}
    d["network"] = list(attempts)
print("DESCRIBE=" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def parsed(tmp_path_factory) -> dict[str, dict]:
    """{"gcp": ..., "local": ...}: dags/ parsed by DagBag in a fresh interpreter, gcp first, sockets blocked,
    no Google credentials."""
    tmp = tmp_path_factory.mktemp("gcp_parse")
    config = tmp / "gcp.yaml"
    config.write_text(yaml.safe_dump(gcp_raw()))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AIRFLOW", "DUAL_DEPLOY", "GOOGLE_", "CLOUDSDK", "STORAGE_EMULATOR"))}
    env.update(AIRFLOW_HOME=str(tmp / "airflow"), AIRFLOW__CORE__LOAD_EXAMPLES="False",
               AIRFLOW__CORE__DAGS_FOLDER=str(ROOT / "dags"), AIRFLOW__CORE__PLUGINS_FOLDER=str(ROOT / "plugins"),
               PYTHONPATH=os.pathsep.join([str(ROOT / "include"), str(ROOT / "plugins")]),
               DUAL_DEPLOY_CONFIG=str(config), GOOGLE_APPLICATION_CREDENTIALS=str(tmp / "no-such-credentials.json"))
    proc = subprocess.run([sys.executable, "-c", _DESCRIBE, str(ROOT / "dags"), "gcp", "local"], env=env, cwd=tmp,
                          capture_output=True, text=True, timeout=180)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("DESCRIBE=")), None)
    assert proc.returncode == 0 and line, f"parsing failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(line[len("DESCRIBE="):])


def test_gcp_dag_parses_without_credentials_or_network(parsed):
    gcp = parsed["gcp"]
    assert gcp["import_errors"] == {}
    assert gcp["network"] == []
    assert "gcp" in gcp["tags"]
    seconds = gcp["durations"]["dual_deployment.py"]
    print(f"\nDagBag parse of dual_deployment.py with platform gcp: {seconds:.1f} s "
          f"(local: {parsed['local']['durations']['dual_deployment.py']:.1f} s)")
    assert seconds < 30  # Airflow's default dagbag_import_timeout


def test_gcp_dag_has_the_local_dags_shape(parsed):
    local, gcp = parsed["local"], parsed["gcp"]
    assert gcp["groups"] == local["groups"] == ["cloud", "mobile"]
    shape = {p: {tid: {k: t[k] for k in ("upstream", "downstream", "group", "trigger_rule")}
                 for tid, t in parsed[p]["tasks"].items()} for p in ("local", "gcp")}
    assert shape["gcp"] == shape["local"]
    ops = {tid: t["operator"] for tid, t in gcp["tasks"].items()}
    assert ops["cloud.train"] == ops["mobile.train"] == "VertexCustomJobOperator"
    assert "CreateCustomJobOperator" in gcp["tasks"]["cloud.train"]["bases"]
    assert ops["cloud.register_model"] == "RegisterModelVersionOperator"
    assert "UploadModelOperator" in gcp["tasks"]["cloud.register_model"]["bases"]
    assert ops["cloud.deploy"] == "CanaryDeployModelOperator"
    assert (ops["mobile.convert_tflite"], ops["mobile.publish"]) == ("ConvertToTFLiteOperator",
                                                                    "PublishMobileModelOperator")

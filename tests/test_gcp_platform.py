"""The DAG as built for Vertex AI: the exact CustomJob, registry and endpoint specs the builders
produce from the config (rendered per run), and the DAG parsed by DagBag for both platforms in a
fresh interpreter with sockets blocked: same shape and the same operator classes for every task
(local and GCP differ only in configuration). Behaviour against the API is in
tests/test_vertex_operators.py (the local Vertex AI server, real clients).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from airflow.providers.google.cloud.operators.vertex_ai.custom_job import CreateCustomJobOperator
from airflow.providers.google.cloud.operators.vertex_ai.model_service import UploadModelOperator
from airflow.sdk import DAG
from google.cloud.aiplatform_v1.types import (
    CustomJob,
)

from dual_deploy.config import DEFAULT_CONFIG, build_config
from dual_deploy.dag_helpers import TEMPLATE_FILTERS
from dual_deploy.operators.vertex import (
    canary_traffic_split,
    smoke_attempts,
)
from dual_deploy.target_group import build_target_group

ROOT = Path(__file__).resolve().parents[1]
PROJECT, REGION = "test-project", "europe-west4"
TRAINER = "europe-west4-docker.pkg.dev/test-project/dual-deploy/trainer:abc123"
SERVING = "europe-west4-docker.pkg.dev/test-project/dual-deploy/serving:abc123"
SA = "trainer@test-project.iam.gserviceaccount.com"
RUN_URI = "gs://test-bucket/runs/{{ run_id | slug }}"
SPLIT_URI = f"{RUN_URI}/split.json"

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
        "display_name": "{{ run_id | display_name('dual-deploy-cloud-') }}",
        "labels": {"app": "dual-deploy", "dag": "{{ dag.dag_id | run_label }}", "run": "{{ run_id | run_label }}",
                   "target": "cloud"},
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
    context = {"run_id": "scheduled__2026-01-05T03:00:00+00:00", "params": {"epochs": None}, "dag": dag}
    rendered = op.render_template(op.custom_job, context, jinja_env=dag.get_template_env())
    run = "scheduled-2026-01-05t03-00-00-00-00"
    assert rendered["display_name"] == f"dual-deploy-cloud-{run}"
    # The labels a retry finds this run's job by: valid label values.
    assert rendered["labels"] == {"app": "dual-deploy", "dag": "gcp-builder-test", "run": run, "target": "cloud"}
    long_run = "manual__" + "x" * 300
    rendered = op.render_template(op.custom_job, {**context, "run_id": long_run}, jinja_env=dag.get_template_env())
    assert len(rendered["display_name"]) <= 128 and len(rendered["labels"]["run"]) <= 63
    CustomJob(rendered)  # the API's message accepts every field
    rendered = op.render_template(op.custom_job, context, jinja_env=dag.get_template_env())
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
    # Only the run's alias: "default" moves when deploy promotes the version (never before validation).
    assert register.version_aliases == ["{{ run_id | run_alias }}"]
    deploy = dag.get_task("cloud.deploy")
    assert (deploy.endpoint_display_name, deploy.machine_type, deploy.min_replica_count, deploy.max_replica_count,
            deploy.canary_traffic_percent, deploy.smoke_instances, deploy.image_size, deploy.operation_poll_max_s) == (
        "flowers-cloud-endpoint", "n1-standard-4", 1, 2, 10, 2, 224, 60)
    assert dag.get_task("mobile.convert_tflite").output_dir == f"{RUN_URI}/mobile/tflite"
    publish = dag.get_task("mobile.publish")
    assert (publish.backend, publish.firebase_conn_id, publish.firebase_project, publish.firebase_storage_bucket) == (
        "firebase_storage", "firebase_default", "test-firebase", "test-firebase.appspot.com")
    assert publish.tflite_uri.operator is dag.get_task("mobile.convert_tflite")
    assert dag.get_task("mobile.convert_tflite").model_dir.operator is dag.get_task("mobile.train")
    assert register.artifact_uri.operator is dag.get_task("cloud.train") and deploy.model.operator is register


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
               AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT="300",
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


def test_gcp_dag_has_the_local_dags_shape(parsed):
    local, gcp = parsed["local"], parsed["gcp"]
    assert gcp["groups"] == local["groups"] == ["cloud", "mobile"]
    shape = {p: {tid: {k: t[k] for k in ("upstream", "downstream", "group", "trigger_rule")}
                 for tid, t in parsed[p]["tasks"].items()} for p in ("local", "gcp")}
    assert shape["gcp"] == shape["local"]
    # One code path: every task is the same operator class on both platforms.
    assert {tid: t["operator"] for tid, t in local["tasks"].items()} == {
        tid: t["operator"] for tid, t in gcp["tasks"].items()}
    ops = {tid: t["operator"] for tid, t in gcp["tasks"].items()}
    assert ops["cloud.train"] == ops["mobile.train"] == "VertexCustomJobOperator"
    assert "CreateCustomJobOperator" in gcp["tasks"]["cloud.train"]["bases"]
    assert ops["cloud.register_model"] == "RegisterModelVersionOperator"
    assert "UploadModelOperator" in gcp["tasks"]["cloud.register_model"]["bases"]
    assert ops["cloud.deploy"] == "CanaryDeployModelOperator"
    assert (ops["mobile.convert_tflite"], ops["mobile.publish"]) == ("ConvertToTFLiteOperator",
                                                                    "PublishMobileModelOperator")

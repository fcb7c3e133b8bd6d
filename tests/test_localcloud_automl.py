"""The AutoML path against the local Vertex AI server, through the real client libraries.

The provider's operators (and our thin subclasses) drive the real ``aiplatform`` SDK and GAPIC clients
over gRPC to a private ``emulators/localcloud`` server: DatasetService (CreateDataset, ImportData from
an import file written from a staged split), PipelineService (an AutoML image classification training
pipeline), ModelService (the registered model, its evaluation, ExportModel) and a deployment on
automatic resources. The server's state is checked after each scenario, never the arguments our code
passed.

The search image is a stand-in (tests/fakes/automl_search.py: same arguments and outputs as
``python -m dualml.automl``, no TensorFlow) and one hour of Vertex wall time lasts 3.6 s here, so a
minimum budget (1,000 edge / 8,000 CLOUD milli node hours) is a 3.6 s limit; the stand-in needs 0.05 s
per training image, so 100 images exhaust it. The real search runs in tests/test_automl_search.py and
the AutoML end-to-end DAG test.
"""

from __future__ import annotations

import io
import json
import threading
import time
import uuid
from pathlib import Path

import pytest
from airflow.sdk.exceptions import AirflowException, AirflowFailException
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from dualml.dataset import SplitManifest

PROJECT, REGION = "local-project", "us-central1"
PARENT = f"projects/{PROJECT}/locations/{REGION}"
ROOT = Path(__file__).resolve().parents[1]
ANONYMOUS = '{"conn_type": "google_cloud_platform", "extra": {"is_anonymous": true, "project": "local-project"}}'
SECONDS_PER_HOUR = 3.6
SECONDS_PER_ITEM = 0.05
LABELS = ["daisy", "roses", "tulips"]


@pytest.fixture(scope="module")
def cloud(gcs_emulator, tmp_path_factory):
    import yaml

    from dual_deploy.emulator_hosts import install
    from localcloud.process import LocalCloudProcess

    tmp = tmp_path_factory.mktemp("localcloud-automl")
    cfg = yaml.safe_load((ROOT / "emulators" / "localcloud.yaml").read_text())
    cfg["root"] = str(ROOT)
    cfg["images"] += [
        {"match": "*/test/fake-automl-search:*", "entrypoint": ["{python}", "{root}/tests/fakes/automl_search.py"],
         "env": {"FAKE_SECONDS_PER_ITEM": str(SECONDS_PER_ITEM), "FAKE_MISS_EVERY": "4"}},
        {"match": "*/test/fake-automl-serving:*", "entrypoint": ["{python}", "{root}/tests/fakes/automl_serving.py"]},
    ]
    cfg["automl"] = {"search_image": "localhost/test/fake-automl-search:1",
                     "serving_image": "localhost/test/fake-automl-serving:1", "seconds_per_hour": SECONDS_PER_HOUR}
    (tmp / "localcloud.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.MonkeyPatch.context() as mp:
        server = LocalCloudProcess(tmp / "state", config=tmp / "localcloud.yaml",
                                   storage_emulator_host=gcs_emulator).start()
        try:
            for k, v in server.env().items():
                mp.setenv(k, v)
            mp.setenv("AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT", ANONYMOUS)
            install()
            yield server
        finally:
            server.stop()


class TI:
    def __init__(self):
        self.xcom = {}

    def xcom_push(self, key, value):
        self.xcom[key] = value


def run(op, run_id: str = "r") -> dict:
    return op.execute({"ti": TI(), "task": op, "run_id": run_id})


def gcs():
    return storage.Client(project=PROJECT, credentials=AnonymousCredentials())


def _png(color) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buf, format="PNG")
    return buf.getvalue()


def staged_split(per_label: dict[str, int] | int = 10, name: str | None = None) -> tuple[str, SplitManifest]:
    """A bucket with PNGs per label and a split.json (60/20/20 per label), as stage_split writes it."""
    bucket = name or f"automl-{uuid.uuid4().hex[:10]}"
    gcs().create_bucket(bucket)
    b = gcs().bucket(bucket)
    counts = per_label if isinstance(per_label, dict) else dict.fromkeys(LABELS, per_label)
    labels = sorted(counts)
    files: dict[str, list] = {"train": [], "val": [], "test": []}
    colors = ["yellow", "red", "purple", "blue", "green"]
    for index, label in enumerate(labels):
        png = _png(colors[index % len(colors)])
        n = counts[label]
        for k in range(n):
            b.blob(f"data/{label}/{k:03d}.png").upload_from_string(png)
            split = "test" if k < max(1, n // 5) else "val" if k < 2 * max(1, n // 5) else "train"
            files[split].append((f"gs://{bucket}/data/{label}/{k:03d}.png", index))
    manifest = SplitManifest(labels=labels, seed=1, fractions={"val": 0.2, "test": 0.2}, files=files)
    b.blob("split.json").upload_from_string(manifest.to_json())
    return bucket, manifest


def labels(run_id: str, target: str = "automl_cloud") -> dict:
    return {"app": "dual-deploy", "dag": "test", "run": run_id, "target": target}


def dataset_ops(bucket: str, run_id: str, target: str = "automl_cloud"):
    from dual_deploy.operators.automl import (
        IMAGE_DATASET_SCHEMA,
        SINGLE_LABEL_IMPORT_SCHEMA,
        AutoMLImportFileOperator,
        VertexCreateDatasetOperator,
        VertexImportDataOperator,
    )

    where = {"project_id": PROJECT, "region": REGION}
    import_file = AutoMLImportFileOperator(task_id="import_file", split_uri=f"gs://{bucket}/split.json",
                                           import_file_uri=f"gs://{bucket}/runs/{run_id}/{target}/automl/import.csv")
    create = VertexCreateDatasetOperator(task_id="create_dataset", dataset={
        "display_name": f"ds-{run_id}", "metadata_schema_uri": IMAGE_DATASET_SCHEMA, "labels": labels(run_id, target)},
        **where)

    def import_data(dataset_id: str):
        return VertexImportDataOperator(task_id="import_data", dataset_id=dataset_id, import_configs=[
            {"gcs_source": {"uris": [import_file.import_file_uri]}, "import_schema_uri": SINGLE_LABEL_IMPORT_SCHEMA}],
            **where)

    return import_file, create, import_data


def prepare_dataset(bucket: str, run_id: str, target: str = "automl_cloud") -> str:
    import_file, create, import_data = dataset_ops(bucket, run_id, target)
    run(import_file, run_id)
    dataset_id = run(create, run_id)["dataset_id"]
    run(import_data(dataset_id), run_id)
    return dataset_id


def train_op(bucket: str, run_id: str, dataset_id: str, model_type: str = "MOBILE_TF_VERSATILE_1",
             budget: int = 1000, target: str = "automl_mobile", model_name: str | None = None):
    from dual_deploy.operators.automl import VertexAutoMLImageTrainingOperator

    base = f"gs://{bucket}/runs/{run_id}/{target}"
    return VertexAutoMLImageTrainingOperator(
        task_id="train", project_id=PROJECT, region=REGION, display_name=f"dual-deploy-{target}-{run_id}",
        dataset_id=dataset_id, model_type=model_type, budget_milli_node_hours=budget, labels=labels(run_id, target),
        model_display_name=model_name or f"m-{run_id}", model_version_aliases=[f"run-{run_id}"],
        model_dir=f"{base}/model", split_uri=f"gs://{bucket}/split.json", base_output_dir=base, poll_interval_s=0.2)


def pipelines_of(cloud, run_id: str) -> list[dict]:
    return [p for p in cloud.state()["training_pipelines"] if p["labels"].get("run") == run_id]


def read_json(uri: str):
    bucket, _, name = uri.removeprefix("gs://").partition("/")
    return json.loads(gcs().bucket(bucket).blob(name).download_as_bytes())


def work_dir(cloud, pipeline_name: str) -> Path:
    return Path(cloud.info["state_dir"]) / "automl" / pipeline_name.rsplit("/", 1)[-1] / "output"


# ---------------------------------------------------------------------------- data


def test_import_file_and_dataset_carry_the_split(cloud):
    from airflow.providers.google.cloud.hooks.vertex_ai.dataset import DatasetHook

    bucket, manifest = staged_split(10)
    run_id = f"r{uuid.uuid4().hex[:6]}"
    import_file, create, import_data = dataset_ops(bucket, run_id)
    written = run(import_file, run_id)
    assert written["counts"] == {"training": 18, "validation": 6, "test": 6}
    first = run(create, run_id)
    assert first["reused"] is False
    imported = run(import_data(first["dataset_id"]), run_id)
    assert imported["total_data_items_imported"] == 30
    # A retry of each step: the same dataset, no duplicated items.
    again = run(create, run_id)
    assert again == {**first, "reused": True}
    assert run(import_data(first["dataset_id"]), run_id)["total_data_items_imported"] == 0

    hook = DatasetHook()
    dataset_name = f"{PARENT}/datasets/{first['dataset_id']}"
    items = list(hook.get_dataset_service_client(REGION).list_data_items(parent=dataset_name))
    assert len(items) == 30
    by_uri = {i.payload["imageGcsUri"]: i.labels["aiplatform.googleapis.com/ml_use"] for i in items}
    expected = {uri: {"train": "training", "val": "validation", "test": "test"}[split]
                for split, files in manifest.files.items() for uri, _ in files}
    assert by_uri == expected
    test_items = list(hook.get_dataset_service_client(REGION).list_data_items(request={
        "parent": dataset_name, "filter": "labels.aiplatform.googleapis.com/ml_use=test"}))
    assert sorted(i.payload["imageGcsUri"] for i in test_items) == sorted(u for u, _ in manifest.files["test"])


def test_import_reports_unusable_rows_and_refuses_an_import_of_nothing(cloud):
    from airflow.providers.google.cloud.hooks.vertex_ai.dataset import DatasetHook

    from dual_deploy.operators.automl import SINGLE_LABEL_IMPORT_SCHEMA

    bucket, _ = staged_split(10)
    run_id = f"r{uuid.uuid4().hex[:6]}"
    _, create, _ = dataset_ops(bucket, run_id)
    dataset_id = run(create, run_id)["dataset_id"]
    b = gcs().bucket(bucket)
    b.blob("mixed.csv").upload_from_string(
        f"training,gs://{bucket}/data/daisy/005.png,daisy\n"
        f"training,gs://{bucket}/data/daisy/missing.png,daisy\n"
        f"sometimes,gs://{bucket}/data/daisy/006.png,daisy\n")
    hook = DatasetHook()
    op = hook.import_data(project_id=PROJECT, region=REGION, dataset=dataset_id, import_configs=[
        {"gcs_source": {"uris": [f"gs://{bucket}/mixed.csv"]}, "import_schema_uri": SINGLE_LABEL_IMPORT_SCHEMA}])
    op.result(timeout=60)
    failures = [f.message for f in op.metadata.generic_metadata.partial_failures]
    assert any("missing.png: file not found" in f for f in failures) and any("sometimes" in f for f in failures)
    assert hook.get_dataset(project_id=PROJECT, region=REGION, dataset=dataset_id).data_item_count == 1

    b.blob("bad.csv").upload_from_string(f"training,gs://{bucket}/nothing-here.png,daisy\n")
    op = hook.import_data(project_id=PROJECT, region=REGION, dataset=dataset_id, import_configs=[
        {"gcs_source": {"uris": [f"gs://{bucket}/bad.csv"]}, "import_schema_uri": SINGLE_LABEL_IMPORT_SCHEMA}])
    with pytest.raises(Exception, match="imported nothing"):
        op.result(timeout=60)


# ---------------------------------------------------------------------------- training


def test_training_pipeline_request_trains_on_the_split_and_registers_the_model(cloud):
    bucket, manifest = staged_split(10)
    run_id = f"r{uuid.uuid4().hex[:6]}"
    dataset_id = prepare_dataset(bucket, run_id, "automl_mobile")
    op = train_op(bucket, run_id, dataset_id)
    out = run(op, run_id)

    [pipeline] = pipelines_of(cloud, run_id)
    assert pipeline["state"] == "PIPELINE_STATE_SUCCEEDED"
    assert pipeline["training_task_definition"].endswith("automl_image_classification_1.0.0.yaml")
    inputs = pipeline["training_task_inputs"]
    assert inputs["modelType"] == "MOBILE_TF_VERSATILE_1" and int(inputs["budgetMilliNodeHours"]) == 1000
    split = pipeline["input_data_config"]["filter_split"]
    assert split == {"training_filter": "labels.aiplatform.googleapis.com/ml_use=training",
                     "validation_filter": "labels.aiplatform.googleapis.com/ml_use=validation",
                     "test_filter": "labels.aiplatform.googleapis.com/ml_use=test"}
    # What the search was given: the budget as a time limit (1 node hour of an edge type = 1 h of Vertex wall
    # time = 3.6 s here) and exactly the staged split's images in their roles.
    output = work_dir(cloud, pipeline["name"])
    args = json.loads((output / "args.json").read_text())
    assert args["model_type"] == "MOBILE_TF_VERSATILE_1" and args["time_limit_s"] == pytest.approx(SECONDS_PER_HOUR)
    seen = json.loads((output / "split.json").read_text())
    for split_name, use in (("train", "training"), ("val", "validation"), ("test", "test")):
        assert sorted(u for u, _ in seen[use]) == sorted(u for u, _ in manifest.files[split_name])
    meta = pipeline["training_task_metadata"]
    assert meta["successfulStopReason"] == "MODEL_CONVERGED"
    assert 1 <= int(meta["costMilliNodeHours"]) <= 1000

    # The model version: from model_to_upload, with the run's alias; the first version is the default one.
    models = [m for m in cloud.state()["model_versions"] if m["display_name"] == f"m-{run_id}"]
    assert [m["version_id"] for m in models] == ["1"]
    assert sorted(models[0]["version_aliases"]) == ["default", f"run-{run_id}"]
    assert models[0]["training_pipeline"] == pipeline["name"]
    assert out["model"] == f"{models[0]['name']}@1" and out["method"] == "automl"
    assert out["cost_milli_node_hours"] == int(meta["costMilliNodeHours"])
    # metrics.json from the model's evaluation, in the split's class order: the fake misses every 4th test image.
    metrics = read_json(f"{out['model_dir']}/metrics.json")
    assert metrics["labels"] == manifest.labels and metrics["num_examples"] == 6
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert out["metrics"]["accuracy"] == metrics["accuracy"]


def test_a_retry_reattaches_to_the_runs_pipeline_and_a_second_run_adds_a_version(cloud):
    bucket, _ = staged_split(10)
    run_id = f"r{uuid.uuid4().hex[:6]}"
    dataset_id = prepare_dataset(bucket, run_id, "automl_mobile")
    first = run(train_op(bucket, run_id, dataset_id), run_id)
    again = run(train_op(bucket, run_id, dataset_id), run_id)
    assert again["reattached"] is True and again["model"] == first["model"]
    assert len(pipelines_of(cloud, run_id)) == 1

    run2 = f"r{uuid.uuid4().hex[:6]}"
    second = run(train_op(bucket, run2, dataset_id, model_name=f"m-{run_id}"), run2)
    assert second["model_id"] == first["model_id"] and second["model_version_id"] == "2"
    versions = {m["version_id"]: m["version_aliases"] for m in cloud.state()["model_versions"]
                if m["display_name"] == f"m-{run_id}"}
    assert "default" in versions["1"] and "default" not in versions["2"], "default moves only when promoted"


def test_budget_exhausted_fails_the_task_without_a_retry(cloud):
    bucket, _ = staged_split(130)  # 78 training images x 0.05 s > the 3.6 s of the minimum budget
    run_id = f"r{uuid.uuid4().hex[:6]}"
    dataset_id = prepare_dataset(bucket, run_id, "automl_mobile")
    with pytest.raises(AirflowFailException, match="budget exhausted") as failure:
        run(train_op(bucket, run_id, dataset_id), run_id)
    assert "not retried" in str(failure.value)
    [pipeline] = pipelines_of(cloud, run_id)
    assert pipeline["state"] == "PIPELINE_STATE_FAILED" and pipeline["error"]["code"] == 8  # RESOURCE_EXHAUSTED
    assert pipeline["training_task_metadata"]["costMilliNodeHours"] == "0", "a failed training is not billed"
    assert not [m for m in cloud.state()["model_versions"] if m["display_name"] == f"m-{run_id}"]


def test_a_failed_training_fails_the_task_without_a_retry(cloud):
    bucket, _ = staged_split(60)  # 36 training images: 1.8 s of fake training within a 14.4 s budget
    run_id = f"r{uuid.uuid4().hex[:6]}"
    dataset_id = prepare_dataset(bucket, run_id, "automl_mobile")
    op = train_op(bucket, run_id, dataset_id, budget=4000)
    errors = []
    worker = threading.Thread(target=lambda: errors.append(_raises(op, run_id)))
    worker.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not [p for p in pipelines_of(cloud, run_id)
                                                 if p["state"] == "PIPELINE_STATE_RUNNING"]:
        time.sleep(0.1)
    [pipeline] = pipelines_of(cloud, run_id)
    cloud.fail_pipeline(pipeline["name"].rsplit("/", 1)[-1], "out of memory in trial 3")
    worker.join(60)
    [error] = errors
    assert isinstance(error, AirflowFailException) and "out of memory in trial 3" in str(error)
    assert "not retried" in str(error)
    assert [p["state"] for p in pipelines_of(cloud, run_id)] == ["PIPELINE_STATE_FAILED"]


def _raises(op, run_id):
    try:
        run(op, run_id)
    except Exception as e:  # noqa: BLE001 - returned to the test
        return e
    return None


def test_bad_requests_fail_at_creation_without_a_pipeline(cloud):
    bucket, _ = staged_split(10)
    run_id = f"r{uuid.uuid4().hex[:6]}"
    dataset_id = prepare_dataset(bucket, run_id)
    with pytest.raises(AirflowFailException, match="between 8,000 and 800,000"):
        run(train_op(bucket, run_id, dataset_id, model_type="CLOUD", budget=1000), run_id)
    assert pipelines_of(cloud, run_id) == []


def test_too_few_images_per_label_fail_the_pipeline(cloud):
    bucket, _ = staged_split(5)
    run_id = f"r{uuid.uuid4().hex[:6]}"
    dataset_id = prepare_dataset(bucket, run_id)
    with pytest.raises(AirflowFailException, match="fewer than 10 images"):
        run(train_op(bucket, run_id, dataset_id), run_id)
    assert [p["state"] for p in pipelines_of(cloud, run_id)] == ["PIPELINE_STATE_FAILED"]


def test_transient_polling_errors_retry_the_task_which_reattaches(cloud):
    bucket, _ = staged_split(60)
    run_id = f"r{uuid.uuid4().hex[:6]}"
    dataset_id = prepare_dataset(bucket, run_id, "automl_mobile")
    # The SDK retries UNAVAILABLE / INTERNAL polls for 120 s; a poll that times out reaches the task.
    cloud.add_fault(method="GetTrainingPipeline", code="DEADLINE_EXCEEDED", times=1)
    try:
        with pytest.raises(AirflowException) as first:
            run(train_op(bucket, run_id, dataset_id, budget=4000), run_id)
        assert not isinstance(first.value, AirflowFailException)
    finally:
        cloud.clear_faults()
    out = run(train_op(bucket, run_id, dataset_id, budget=4000), run_id)
    assert out["reattached"] is True
    assert [p["state"] for p in pipelines_of(cloud, run_id)] == ["PIPELINE_STATE_SUCCEEDED"]


# ---------------------------------------------------------------------------- export and deployment


def test_export_writes_vertex_layout_and_a_cloud_model_cannot_be_exported(cloud):
    from dual_deploy.operators.automl import VertexExportModelOperator

    bucket, manifest = staged_split(10)
    run_id = f"r{uuid.uuid4().hex[:6]}"
    dataset_id = prepare_dataset(bucket, run_id, "automl_mobile")
    trained = run(train_op(bucket, run_id, dataset_id), run_id)
    base = f"gs://{bucket}/runs/{run_id}/automl_mobile"
    export = VertexExportModelOperator(task_id="export_model", project_id=PROJECT, region=REGION,
                                       model_id=trained["model_version"],
                                       destinations={"tf-saved-model": f"{base}/model", "tflite": f"{base}/export"})
    out = run(export, run_id)
    assert out["exports"]["tflite"].startswith(f"{base}/export/model-export-m-{run_id}-")
    assert out["saved_model_uri"].startswith(f"{base}/model/model-export-m-{run_id}-")
    names = sorted(b.name for b in gcs().list_blobs(bucket, prefix=f"runs/{run_id}/automl_mobile/"))
    tflite_dir = out["exports"]["tflite"].removeprefix(f"gs://{bucket}/")
    assert f"{tflite_dir}/model.tflite" in names and f"{tflite_dir}/dict.txt" in names
    saved_dir = out["saved_model_uri"].removeprefix(f"gs://{bucket}/")
    assert f"{saved_dir}/saved_model.pb" in names and f"{saved_dir}/annotation_specs.json" not in names
    dict_txt = gcs().bucket(bucket).blob(f"{tflite_dir}/dict.txt").download_as_text()
    assert dict_txt.split() == manifest.labels

    run2 = f"r{uuid.uuid4().hex[:6]}"
    cloud_dataset = prepare_dataset(bucket, run2)
    cloud_model = run(train_op(bucket, run2, cloud_dataset, model_type="CLOUD", budget=8000,
                               target="automl_cloud"), run2)
    refused = VertexExportModelOperator(task_id="export_model", project_id=PROJECT, region=REGION,
                                        model_id=cloud_model["model_version"], destinations={"tflite": f"{base}/x"})
    with pytest.raises(AirflowFailException, match="does not support export format 'tflite'"):
        run(refused, run2)


def test_cloud_model_deploys_on_automatic_resources_and_answers_automl_requests(cloud):
    from airflow.providers.google.cloud.hooks.vertex_ai.endpoint_service import EndpointServiceHook

    from dual_deploy.operators.automl import AutoMLModelVersionOperator
    from dual_deploy.operators.vertex import CanaryDeployModelOperator

    bucket, manifest = staged_split(10)
    run_id = f"r{uuid.uuid4().hex[:6]}"
    dataset_id = prepare_dataset(bucket, run_id)
    trained = run(train_op(bucket, run_id, dataset_id, model_type="CLOUD", budget=8000, target="automl_cloud"),
                  run_id)
    registered = run(AutoMLModelVersionOperator(task_id="register_model", project_id=PROJECT, region=REGION,
                                                model=trained["model"]), run_id)
    assert registered["model_resource_name"] == trained["model"] and registered["model_version_id"] == "1"
    endpoint = f"ep-{run_id}"
    deploy = CanaryDeployModelOperator(task_id="deploy", project_id=PROJECT, region=REGION,
                                       endpoint_display_name=endpoint, model_display_name=f"m-{run_id}",
                                       model=registered, split_uri=f"gs://{bucket}/split.json",
                                       automatic_resources=True, instance_format="automl_image", smoke_instances=2)
    out = run(deploy, run_id)
    assert out["smoke_test"]["predictions"] == [manifest.labels[0]] * 2
    [ep] = [e for e in cloud.state()["endpoints"] if e["display_name"] == endpoint]
    [dm] = ep["deployed_models"]
    assert dm["automatic_resources"]["min_replica_count"] == 1 and not dm.get("dedicated_resources")
    assert ep["traffic_split"] == {dm["id"]: 100}
    # AutoML image models take automatic resources only, as on Vertex AI.
    with pytest.raises(Exception, match="does not support dedicated_resources"):
        EndpointServiceHook().deploy_model(project_id=PROJECT, region=REGION, endpoint=ep["name"].rsplit("/", 1)[-1],
                                           deployed_model={"model": trained["model"], "dedicated_resources": {
                                               "machine_spec": {"machine_type": "n1-standard-4"},
                                               "min_replica_count": 1}})


# ---------------------------------------------------------------------------- cancel and restart


def _start_in_thread(op, run_id: str) -> tuple[threading.Thread, list]:
    errors: list = []
    worker = threading.Thread(target=lambda: errors.append(_raises(op, run_id)))
    worker.start()
    return worker, errors


def _wait_running(cloud, run_id: str) -> dict:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        running = [p for p in pipelines_of(cloud, run_id) if p["state"] == "PIPELINE_STATE_RUNNING"]
        if running:
            return running[0]
        time.sleep(0.1)
    raise AssertionError(f"no running pipeline for {run_id}: {pipelines_of(cloud, run_id)}")


def test_killing_the_task_cancels_its_pipeline_which_is_billed(cloud):
    bucket, _ = staged_split(60)  # 36 training images: 1.8 s of fake training
    run_id = f"r{uuid.uuid4().hex[:6]}"
    dataset_id = prepare_dataset(bucket, run_id, "automl_mobile")
    op = train_op(bucket, run_id, dataset_id, budget=4000)
    worker, errors = _start_in_thread(op, run_id)
    _wait_running(cloud, run_id)
    op.on_kill()  # what Airflow calls when the task is killed: the provider cancels the SDK's job
    worker.join(60)
    assert isinstance(errors[0], AirflowFailException) and "CANCELLED" in str(errors[0])
    [pipeline] = pipelines_of(cloud, run_id)
    assert pipeline["state"] == "PIPELINE_STATE_CANCELLED" and pipeline["error"]["code"] == 1
    assert int(pipeline["training_task_metadata"]["costMilliNodeHours"]) > 0, "a cancelled training is billed"


def test_a_pipeline_survives_a_crash_of_the_server(cloud):
    bucket, _ = staged_split(60)
    run_id = f"r{uuid.uuid4().hex[:6]}"
    dataset_id = prepare_dataset(bucket, run_id, "automl_mobile")
    worker, errors = _start_in_thread(train_op(bucket, run_id, dataset_id, budget=4000), run_id)
    running = _wait_running(cloud, run_id)
    cloud.kill9()  # the training process it started is stopped on restart, then trained again
    cloud.restart()
    worker.join(120)
    assert len(pipelines_of(cloud, run_id)) == 1
    if errors[0] is not None:  # the SDK's poll hit the restart: the task's retry re-attaches
        assert not isinstance(errors[0], AirflowFailException), errors[0]
        out = run(train_op(bucket, run_id, dataset_id, budget=4000), run_id)
        assert out["reattached"] is True
    [pipeline] = pipelines_of(cloud, run_id)
    assert pipeline["name"] == running["name"] and pipeline["state"] == "PIPELINE_STATE_SUCCEEDED"

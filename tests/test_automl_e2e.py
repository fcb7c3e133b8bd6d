"""End to end: the dual_deployment DAG with the all-AutoML config (dags/config/dual_deploy_automl.yaml) on the
local platform, ``airflow dags test`` against the GCS emulator and a local Vertex AI server of its own.
Slow: the real AutoML stand-in search trains tiny models.

Both targets train through the provider's AutoML operator (dataset import from the staged split,
training pipelines searched by ``python -m dualml.automl``), the CLOUD model is canary-deployed on
automatic resources and answers Vertex's AutoML request format through the endpoint's REST URL, the
edge model is exported, its .tflite validated against the exported SavedModel and published. The
server here is set for a short test: one hour of Vertex wall time lasts 45 s (so both budgets are 45 s
searches) and the search space is MobileNetV3-Small at 32 px for every model type.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
CLASSES = ("daisy", "roses", "tulips")
ANON_CONN = json.dumps({"conn_type": "google_cloud_platform", "extra": {"is_anonymous": True, "project": "local-project"}})
TINY_SPACE = "mobilenet_v3_small:32"  # every model type (dualml.automl.space.spaces)


@pytest.fixture(scope="module")
def cloud(gcs_emulator, tmp_path_factory):
    from localcloud.process import LocalCloudProcess

    tmp = tmp_path_factory.mktemp("localcloud-automl-e2e")
    cfg = yaml.safe_load((ROOT / "emulators" / "localcloud.yaml").read_text())
    cfg["root"] = str(ROOT)
    for image in cfg["images"]:
        if "automl-search" in image["match"]:
            image["env"] = {**image.get("env", {}), "DUALML_AUTOML_SPACE": TINY_SPACE}
    cfg["automl"]["seconds_per_hour"] = 45
    (tmp / "localcloud.yaml").write_text(yaml.safe_dump(cfg))
    server = LocalCloudProcess(tmp / "state", config=tmp / "localcloud.yaml", storage_emulator_host=gcs_emulator).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def automl_run(gcs_emulator, cloud, tmp_path_factory) -> dict:
    from dual_deploy.local_platform import ensure_bucket, upload_dataset
    from dualml import sample_data

    tmp = tmp_path_factory.mktemp("automl-e2e")
    bucket = f"dd-automl-{uuid.uuid4().hex[:8]}"
    state_dir = tmp / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "DUAL_DEPLOY", "AIP_"))}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", STORAGE_EMULATOR_HOST=gcs_emulator, **cloud.env(),
               GOOGLE_CLOUD_PROJECT="local-project", DUAL_DEPLOY_PLATFORM="local", AIRFLOW_HOME=str(tmp / "airflow"),
               AIRFLOW__CORE__DAGS_FOLDER=str(ROOT / "dags"), AIRFLOW__CORE__PLUGINS_FOLDER=str(ROOT / "plugins"),
               AIRFLOW__CORE__LOAD_EXAMPLES="False", AIRFLOW__CORE__UNIT_TEST_MODE="False",
               AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT="300", AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT=ANON_CONN,
               AIRFLOW_CONN_FIREBASE_DEFAULT=ANON_CONN, TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join([str(ROOT / "include"), str(ROOT / "plugins"), str(ROOT / "emulators")]))
    migrate = subprocess.run([str(VENV_BIN / "airflow"), "db", "migrate"], env=env, cwd=tmp, capture_output=True,
                             text=True, timeout=300)
    assert migrate.returncode == 0, migrate.stderr[-3000:]

    raw = yaml.safe_load((ROOT / "dags" / "config" / "dual_deploy_automl.yaml").read_text())
    local = raw["platforms"]["local"]
    local.update(artifacts_uri=f"gs://{bucket}/runs", data={"uri": f"gs://{bucket}/datasets/flowers"},
                 local={"bucket": bucket, "state_dir": str(state_dir)})
    local["triggers"].update(incoming_uri=f"gs://{bucket}/incoming", ledger_uri=f"gs://{bucket}/ledger.json")
    local["gcp"].update(firebase_storage_bucket=bucket, poll_interval_s=2)
    for t in raw["targets"]:
        t["gate"] = {"min_accuracy": 0.0, "min_macro_f1": 0.0}
        if t["kind"] == "endpoint":
            t["endpoint"].update(display_name=f"ep-{bucket}", model_display_name=f"automl-{bucket}")
        else:  # 6 test images of a model trained for seconds: one flip is 17 points
            t["tflite"] = {"min_agreement": 0.5, "max_accuracy_drop": 0.5}
            t["publish"]["display_name"] = f"m_{bucket.replace('-', '_')}"
    local["targets"]["automl_mobile"]["publish"] = {"remote_config_parameter": f"m_{bucket.replace('-', '_')}"}
    config = tmp / "dual_deploy_automl.yaml"
    config.write_text(yaml.safe_dump(raw))

    os.environ.setdefault("STORAGE_EMULATOR_HOST", gcs_emulator)
    ensure_bucket(bucket)
    data = tmp / "data"
    sample_data.generate(data, per_class=12, size=48, seed=3, classes=CLASSES)
    data_uri = f"gs://{bucket}/datasets/flowers"
    upload_dataset(str(data), data_uri)
    log = tmp / "dags-test.log"
    with open(log, "wb") as out:
        proc = subprocess.run([str(VENV_BIN / "airflow"), "dags", "test", "dual_deployment", "--conf",
                               json.dumps({"data_uri": data_uri})], env={**env, "DUAL_DEPLOY_CONFIG": str(config)},
                              cwd=tmp, stdout=out, stderr=subprocess.STDOUT, timeout=1500)
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-60:])
    summary_path = state_dir / "run_summary.json"
    assert summary_path.exists(), tail
    summary = json.loads(summary_path.read_text())
    assert summary["status"] == "success" and proc.returncode == 0, json.dumps(summary, indent=1)[:4000] + tail
    return {"summary": summary, "data": data, "bucket": bucket}


def test_both_automl_targets_train_deliver_and_are_reported(automl_run, cloud):
    summary = automl_run["summary"]
    state = cloud.state()
    pipelines = {p["labels"]["target"]: p for p in state["training_pipelines"]}
    assert {t: p["state"] for t, p in pipelines.items()} == {"automl_cloud": "PIPELINE_STATE_SUCCEEDED",
                                                             "automl_mobile": "PIPELINE_STATE_SUCCEEDED"}
    assert pipelines["automl_cloud"]["training_task_inputs"]["modelType"] == "CLOUD"
    [dataset, other] = state["datasets"]
    assert {int(dataset["data_item_count"]), int(other["data_item_count"])} == {36}
    for name in ("automl_cloud", "automl_mobile"):
        t = summary["targets"][name]
        assert t["status"] == "success" and t["training"]["method"] == "automl"
        assert 0 < t["training"]["cost_milli_node_hours"] <= t["training"]["budget_milli_node_hours"]
        assert summary["cost"]["targets"][name]["training"]["usd"] > 0
        assert t["metrics"]["labels"] == list(CLASSES) and t["metrics"]["num_examples"] == 6

    cloud_target = summary["targets"]["automl_cloud"]
    [ep] = [e for e in state["endpoints"] if e["name"].endswith("/" + cloud_target["endpoint"]["endpoint_id"])]
    [dm] = ep["deployed_models"]
    assert dm["automatic_resources"]["min_replica_count"] == 1 and ep["traffic_split"] == {dm["id"]: 100}
    image = sorted((automl_run["data"] / "roses").glob("*.jpg"))[0].read_bytes()
    body = json.dumps({"instances": [{"content": base64.b64encode(image).decode()}]}).encode()
    req = urllib.request.Request(cloud_target["endpoint"]["prediction_url"], data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        answer = json.loads(r.read())
    assert answer["deployedModelId"] == dm["id"]
    assert sorted(answer["predictions"][0]["displayNames"]) == sorted(CLASSES)

    mobile = summary["targets"]["automl_mobile"]
    assert mobile["tflite"]["source"] == "automl_export" and mobile["tflite"]["passed"] is True
    assert mobile["export"]["tflite_uri"].endswith("/model.tflite") and mobile["published"]["version"]
    # The edge model's export is under its model dir: the next run's champion gate re-evaluates it.
    assert mobile["export"]["saved_model_uri"].startswith(mobile["training"]["model_dir"] + "/")

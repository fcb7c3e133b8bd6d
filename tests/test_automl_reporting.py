"""AutoML in the run's outputs: its cost (node hours x AutoML's price), the smoke test of an AutoML
endpoint's answers, and the run summary / report putting AutoML and custom models side by side when
both were scored on the same split (this run's targets, and the runs the channels serve from).

Pure functions directly; RunSummaryOperator against the GCS emulator, as tests/test_summary.py does.
"""

from __future__ import annotations

import json
import uuid

import pytest

from dual_deploy.cost import load_prices, run_cost
from dual_deploy.hooks.gcs_io import GcsIO
from dual_deploy.operators.summary import RunSummaryOperator, method_comparison, render_text
from dual_deploy.smoke import SmokeTestFailed, build_request, check_response
from dualml.dataset import labels_text

ANON_CONN = json.dumps({"conn_type": "google_cloud_platform", "extra": {"is_anonymous": True, "project": "local-project"}})
LABELS = ["daisy", "roses", "tulips"]
SPLIT = {"labels": LABELS, "counts": {"train": 18, "val": 6, "test": 6}, "fingerprint": "split-fp-1"}


# ---------------------------------------------------------------- cost


def test_automl_training_is_priced_per_node_hour_of_its_model_type():
    inputs = {"automl_cloud": {"training": {"automl": {"model_type": "CLOUD", "budget_milli_node_hours": 8000}},
                               "endpoint": {"machine_type": "automl", "min_replica_count": 2}},
              "automl_mobile": {"training": {"automl": {"model_type": "MOBILE_TF_VERSATILE_1",
                                                        "budget_milli_node_hours": 1000}}}}
    summary = {"platform": "gcp", "steps": {"automl_cloud.train": {"duration_s": 3600.0},
                                            "automl_mobile.train": {"duration_s": 1800.0}},
               "targets": {"automl_cloud": {"training": {"method": "automl", "cost_milli_node_hours": 8000}},
                           "automl_mobile": {"training": {"method": "automl", "cost_milli_node_hours": 500}}}}
    out = run_cost(summary, inputs, region="us-central1", prices=load_prices())
    cloud, mobile = out["targets"]["automl_cloud"], out["targets"]["automl_mobile"]
    # prices.yaml: $3.465 per node hour (CLOUD), $18 (edge), $1.375 per node hour of online prediction.
    assert cloud["training"]["node_hours"] == 8.0 and cloud["training"]["usd"] == pytest.approx(8 * 3.465)
    assert mobile["training"]["usd"] == pytest.approx(0.5 * 18.0) and mobile["training"]["hours"] == 0.5
    assert cloud["serving"] == {"machine_type": "AutoML (automatic resources)", "replicas": 2, "hourly_usd": 2.75,
                                "monthly_usd": 1980.0}
    assert out["training_total_usd"] == pytest.approx(8 * 3.465 + 9.0) and out["complete"] is True


def test_automl_without_a_price_for_the_region_is_a_warning():
    inputs = {"automl_mobile": {"training": {"automl": {"model_type": "MOBILE_TF_VERSATILE_1"}}}}
    summary = {"platform": "gcp", "targets": {"automl_mobile": {"training": {"cost_milli_node_hours": 500}}}}
    out = run_cost(summary, inputs, region="europe-west4", prices=load_prices())
    assert out["complete"] is False and "no AutoML price 'image_training_edge'" in out["warnings"][0]


# ---------------------------------------------------------------- smoke test of AutoML answers


def test_smoke_requests_and_answers_in_automl_format():
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, format="PNG")
    request = build_request([buf.getvalue()], None, "automl_image")
    assert list(request["instances"][0]) == ["content"]
    assert base64.b64decode(request["instances"][0]["content"]) == buf.getvalue()
    answer = {"predictions": [{"ids": ["7", "8"], "displayNames": ["tulips", "daisy"], "confidences": [0.3, 0.7]}]}
    [p] = check_response(answer, LABELS, 1)
    assert (p["label"], p["confidence"]) == ("daisy", 0.7)
    with pytest.raises(SmokeTestFailed, match="not one of the model's labels"):
        check_response({"predictions": [{"displayNames": ["cactus"], "confidences": [0.9]}]}, LABELS, 1)
    with pytest.raises(SmokeTestFailed, match="lacks matching displayNames and confidences"):
        check_response({"predictions": [{"displayNames": ["daisy"], "confidences": []}]}, LABELS, 1)


# ---------------------------------------------------------------- comparison (pure)


def _target(kind: str, method: str, accuracy: float, **extra) -> dict:
    t = {"kind": kind, "status": "success", "metrics": {"accuracy": accuracy, "macro_f1": accuracy - 0.02},
         "training": {"method": method} if method == "automl" else {}, **extra}
    return t


def _summary(run_id: str, targets: dict, fingerprint: str = "split-fp-1", **extra) -> dict:
    return {"run_id": run_id, "split": {**SPLIT, "fingerprint": fingerprint}, "targets": targets,
            "steps": {f"{n}.train": {"duration_s": 100.0} for n in targets}, **extra}


def test_comparison_needs_both_methods_on_the_same_split():
    automl = _summary("ra", {"automl_cloud": _target("endpoint", "automl", 0.9, model_family="AutoML CLOUD")})
    custom = _summary("rc", {"cloud": _target("endpoint", "custom", 0.85, model_family="densenet121 64px")},
                      cost={"targets": {"cloud": {"training": {"usd": 0.12}}}})
    out = method_comparison(automl, [custom])
    assert out["split_fingerprint"] == "split-fp-1"
    assert [(r["target"], r["method"], r["this_run"], r["run_id"]) for r in out["rows"]] == [
        ("automl_cloud", "automl", True, "ra"), ("cloud", "custom", False, "rc")]
    assert out["rows"][1]["training_usd"] == 0.12 and out["rows"][1]["model"] == "densenet121 64px"
    # Another split (other data, other seed): nothing to compare on the same images.
    assert method_comparison(automl, [{**custom, "split": {**SPLIT, "fingerprint": "other"}}]) is None
    assert method_comparison(automl, []) is None
    # A failed custom target has no model to compare.
    failed = _summary("rc", {"cloud": {**_target("endpoint", "custom", 0.85), "status": "failed"}})
    assert method_comparison(automl, [failed]) is None


def test_one_run_with_both_methods_compares_its_own_targets():
    mixed = _summary("rm", {"cloud": _target("endpoint", "custom", 0.8),
                            "automl_mobile": _target("mobile", "automl", 0.9, tflite={
                                "size_bytes": 1_200_000, "latency_ms_p95": 0.8, "top1_agreement": 0.98})})
    out = method_comparison(mixed, [mixed])  # its own records are not counted twice
    assert sorted(r["target"] for r in out["rows"]) == ["automl_mobile", "cloud"]
    mobile = next(r for r in out["rows"] if r["target"] == "automl_mobile")
    assert (mobile["tflite_size_bytes"], mobile["tflite_latency_ms_p95"], mobile["tflite_agreement"]) == (
        1_200_000, 0.8, 0.98)


# ---------------------------------------------------------------- the operator: summary, text and report


class _TaskSDK:
    def __init__(self, run_id: str, states: dict[str, str], xcoms: dict):
        self.run_id, self.states, self.xcoms = run_id, states, xcoms

    def get_task_states(self, dag_id, task_ids=None, run_ids=None, **_):
        return {self.run_id: {t: s for t, s in self.states.items() if task_ids is None or t in task_ids}}

    def xcom_pull(self, task_ids, key="return_value"):
        return self.xcoms.get(task_ids) if key == "return_value" else None

    def xcom_push(self, key, value):
        self.xcoms[f"run_summary/{key}"] = value


@pytest.fixture
def root(gcs_emulator, monkeypatch) -> str:
    monkeypatch.setenv("AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT", ANON_CONN)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator)
    bucket = f"automl-summary-{uuid.uuid4().hex[:8]}"
    GcsIO().hook.get_conn().create_bucket(bucket)
    return f"gs://{bucket}"


def _run_summary(root: str, tmp_path, run_id: str, targets: dict[str, str], steps: dict[str, tuple], xcoms: dict,
                 cost_inputs: dict) -> dict:
    from airflow.providers.standard.operators.empty import EmptyOperator
    from airflow.sdk import DAG, TaskGroup

    io = GcsIO()
    for name in targets:
        base = f"{root}/runs/{run_id}/{name}/model"
        metrics = xcoms[f"{name}.train"]["metrics"]
        io.write_json(f"{base}/metrics.json", metrics)
        io.write_bytes(f"{base}/labels.txt", labels_text(LABELS))
    with DAG("dual_deployment", schedule=None):
        EmptyOperator(task_id="validate_dataset") >> EmptyOperator(task_id="stage_split")
        for name, group_steps in steps.items():
            with TaskGroup(name):
                for step in group_steps:
                    EmptyOperator(task_id=step)
        op = RunSummaryOperator(task_id="run_summary", targets=targets, summary_uri=f"{root}/runs/{run_id}/run_summary.json",
                                artifacts_uri=f"{root}/runs/{run_id}", platform="local",
                                local_copy_path=str(tmp_path / run_id / "run_summary.json"),
                                champions_uri=f"{root}/champions", cost_inputs=cost_inputs, region="us-central1")
    states = dict.fromkeys(["validate_dataset", "stage_split", *[f"{g}.{s}" for g, ss in steps.items() for s in ss]],
                           "success")
    op.execute({"ti": _TaskSDK(run_id, states, xcoms), "run_id": run_id})
    return io.read_json(f"{root}/runs/{run_id}/run_summary.json")


def _metrics(accuracy: float, architecture: str | None = None) -> dict:
    m = {"accuracy": accuracy, "macro_f1": accuracy - 0.01, "labels": LABELS, "num_examples": 6,
         "confusion_matrix": [[2, 0, 0], [0, 2, 0], [0, 0, 2]]}
    return {**m, "architecture": architecture, "image_size": 64} if architecture else m


def test_an_automl_run_is_compared_with_the_custom_run_the_channels_serve(root, tmp_path):
    from dual_deploy.config import load_config
    from dual_deploy.dag_helpers import cost_inputs

    common = {"validate_dataset": {"fingerprint": "data-fp"}, "stage_split": SPLIT}
    custom_xcoms = {**common,
                    "cloud.train": {"model_dir": f"{root}/runs/rc/cloud/model", "metrics": _metrics(0.8, "densenet121"),
                                    "duration_s": 240.0},
                    "cloud.champion_gate": {"promote": True, "reason": "first model"},
                    "cloud.register_model": {"model_resource_name": "projects/p/locations/l/models/1@1",
                                             "model_version_id": "1"},
                    "cloud.deploy": {"endpoint_id": "9", "prediction_url": "http://x", "model_version_id": "1"}}
    custom = _run_summary(root, tmp_path, "rc", {"cloud": "endpoint"},
                          {"cloud": ("selected", "train", "champion_gate", "register_model", "deploy")}, custom_xcoms,
                          cost_inputs(load_config(platform="local")))
    assert "comparison" not in custom  # nothing of the other method yet

    automl_train = {"model_dir": f"{root}/runs/ra/automl_cloud/model", "metrics": _metrics(0.9), "duration_s": 180.0,
                    "method": "automl", "model_type": "CLOUD", "budget_milli_node_hours": 8000,
                    "cost_milli_node_hours": 6000, "stop_reason": "MODEL_CONVERGED",
                    "training_pipeline_name": "projects/p/locations/l/trainingPipelines/6", "training_pipeline_id": "6",
                    "model": "projects/p/locations/l/models/2@1"}
    automl_xcoms = {**common, "automl_cloud.train": automl_train,
                    "automl_cloud.champion_gate": {"promote": True, "reason": "first model"},
                    "automl_cloud.register_model": {"model_resource_name": "projects/p/locations/l/models/2@1",
                                                    "model_version_id": "1"},
                    "automl_cloud.deploy": {"endpoint_id": "10", "prediction_url": "http://y", "model_version_id": "1",
                                            "instance_format": "automl_image"}}
    automl_inputs = cost_inputs(load_config("dags/config/dual_deploy_automl.yaml", "local"))
    summary = _run_summary(root, tmp_path, "ra", {"automl_cloud": "endpoint"},
                           {"automl_cloud": ("selected", "import_file", "create_dataset", "import_data", "train",
                                             "champion_gate", "register_model", "deploy")},
                           automl_xcoms, {"automl_cloud": automl_inputs["automl_cloud"]})
    assert summary["status"] == "success" and not summary["warnings"], summary["warnings"]
    assert summary["cost"]["targets"]["automl_cloud"]["training"]["usd"] == pytest.approx(6 * 3.465)
    rows = {r["target"]: r for r in summary["comparison"]["rows"]}
    assert rows["automl_cloud"]["method"] == "automl" and rows["automl_cloud"]["model"] == "AutoML CLOUD"
    assert rows["automl_cloud"]["accuracy"] == 0.9 and rows["automl_cloud"]["training_s"] == 180.0
    assert rows["cloud"]["run_id"] == "rc" and rows["cloud"]["model"] == "densenet121 64px"
    assert rows["cloud"]["accuracy"] == 0.8 and rows["cloud"]["training_usd"] is not None
    record = GcsIO().read_json(f"{root}/champions/automl_cloud.json")
    assert record["method"] == "automl" and record["summary_uri"] == f"{root}/runs/ra/run_summary.json"

    text = render_text(summary)
    assert "AutoML CLOUD: 6000 of 8000 milli node hours (MODEL_CONVERGED), pipeline 6" in text
    assert "AutoML vs custom on the same test split:" in text and "(run rc)" in text
    html = (tmp_path / "ra" / "report" / "index.html").read_text()
    assert "AutoML vs custom training (same test split)" in html and "densenet121 64px" in html
    assert "Vertex AI AutoML <b>CLOUD</b>: 6000 of 8000 milli node hours used" in html


def test_make_runs_curl_example_speaks_the_endpoints_format():
    from dual_deploy.local_platform import curl_example

    automl = curl_example("http://127.0.0.1:9011/v1/x:predict", "/data/a b.jpg", "automl_image")
    assert '{\\"instances\\": [{\\"content\\": \\"$(base64 -w0 \'/data/a b.jpg\')\\"}]}' in automl
    assert '[{\\"b64\\":' in curl_example("http://127.0.0.1:9011/v1/x:predict", "/data/a.jpg")

"""The GCS-facing operators (dataset validation, split staging, publishing errors, run summary) against a
real GCS API (gcp-storage-emulator).
Operators run through ``execute(context)`` with a minimal context; every byte goes through the
provider's GCSHook with the anonymous ``google_cloud_default`` connection, as in a DAG run.
No TensorFlow: models are stand-in files (the end-to-end run is tests/test_dag_run_local.py).
"""

from __future__ import annotations

import io
import json
import uuid

import pytest
from airflow.sdk.exceptions import AirflowFailException
from PIL import Image

from dual_deploy.hooks.gcs_io import GcsIO
from dual_deploy.operators.dataset import StageSplitOperator, ValidateDatasetOperator
from dual_deploy.operators.publish import PublishMobileModelOperator
from dual_deploy.operators.summary import RunSummaryOperator, build_summary, render_text
from dual_deploy.smoke import SmokeTestFailed, build_request, check_response
from dualml.dataset import SplitManifest

ANON_CONN = json.dumps(
    {"conn_type": "google_cloud_platform", "extra": {"is_anonymous": True, "project": "local-project"}}
)


@pytest.fixture
def gcs(gcs_emulator, monkeypatch) -> GcsIO:
    """GcsIO over GCSHook, talking to the session's emulator through the anonymous connection."""
    monkeypatch.setenv("AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT", ANON_CONN)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator)
    return GcsIO()


@pytest.fixture
def bucket(gcs) -> str:
    name = f"ops-{uuid.uuid4().hex[:12]}"
    gcs.hook.get_conn().create_bucket(name)
    return name


def _jpeg(seed: int, size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (seed * 37 % 256, seed * 11 % 256, 90)).save(buf, format="JPEG")
    return buf.getvalue()


def _upload(gcs: GcsIO, root: str, per_class: dict[str, int], corrupt: dict[str, int] | None = None) -> None:
    """``per_class`` good JPEGs per class under ``root``; ``corrupt[class]`` of them replaced by junk."""
    corrupt = corrupt or {}
    for ci, (cls, n) in enumerate(per_class.items()):
        for i in range(n):
            data = b"this is not a jpeg" if i < corrupt.get(cls, 0) else _jpeg(ci * 100 + i)
            gcs.write_bytes(f"{root}/{cls}/{cls}_{i:03d}.jpg", data, mime_type="image/jpeg")


def _validate(data_uri: str, **kwargs) -> ValidateDatasetOperator:
    kwargs.setdefault("min_images_per_class", 5)
    return ValidateDatasetOperator(task_id="validate_dataset", data_uri=data_uri, **kwargs)


# ================================================================ ValidateDatasetOperator


def test_validate_happy_path(gcs, bucket):
    root = f"gs://{bucket}/flowers"
    _upload(gcs, root, {"daisy": 6, "tulips": 7})
    gcs.write_bytes(f"{root}/README.txt", b"stray files are ignored")
    out = _validate(root + "/").execute({})
    assert out["data_uri"] == root
    assert out["classes"] == {"daisy": 6, "tulips": 7}
    assert out["num_images"] == 13
    assert out["bad_files"] == {} and out["oversized"] == {}
    # The stray file is not used, and says so (issue 15.3: nothing is left out silently).
    assert out["skipped"] == {"README.txt": "not in a class folder (expected <class>/<image>)"}
    assert len(out["warnings"]) == 1 and "README.txt" in out["warnings"][0]
    assert out["duration_s"] >= 0


def test_validate_lists_nested_folders_and_non_images_it_leaves_out(gcs, bucket):
    root = f"gs://{bucket}/flowers"
    _upload(gcs, root, {"daisy": 6, "tulips": 6})
    _upload(gcs, f"{root}/tulips/more", {"red": 3})  # tulips/more/red/*.jpg: nested, not a class
    gcs.write_bytes(f"{root}/daisy/photo.heic", b"heic")
    out = _validate(root).execute({})
    assert out["classes"] == {"daisy": 6, "tulips": 6}
    assert set(out["skipped"]) == {"daisy/photo.heic", "tulips/more/"}
    assert out["skipped"]["tulips/more/"].startswith("nested folder (3 file(s)) ignored")
    assert "tulips/more/" in out["warnings"][0]


def test_validate_missing_bucket_names_it(gcs):
    missing = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    with pytest.raises(AirflowFailException) as e:
        _validate(f"gs://{missing}/flowers").execute({})
    assert f"gs://{missing}" in str(e.value) and "does not exist" in str(e.value)


def test_validate_empty_prefix(gcs, bucket):
    _upload(gcs, f"gs://{bucket}/elsewhere", {"daisy": 6, "tulips": 6})
    with pytest.raises(AirflowFailException) as e:
        _validate(f"gs://{bucket}/flowers").execute({})
    assert f"no files under gs://{bucket}/flowers" in str(e.value)


def test_validate_only_one_class(gcs, bucket):
    root = f"gs://{bucket}/flowers"
    _upload(gcs, root, {"daisy": 8})
    with pytest.raises(AirflowFailException) as e:
        _validate(root).execute({})
    msg = str(e.value)
    assert root in msg and "found 1 class folder(s)" in msg and "daisy" in msg and "need at least 2" in msg


def test_validate_class_with_too_few_images(gcs, bucket):
    root = f"gs://{bucket}/flowers"
    _upload(gcs, root, {"daisy": 8, "roses": 2, "tulips": 8})
    with pytest.raises(AirflowFailException) as e:
        _validate(root).execute({})
    msg = str(e.value)
    assert "too few readable images" in msg and "roses (2)" in msg
    assert "daisy (" not in msg and "tulips (" not in msg


def test_validate_corrupt_images_above_tolerance_are_named(gcs, bucket):
    root = f"gs://{bucket}/flowers"
    _upload(gcs, root, {"daisy": 10, "tulips": 10}, corrupt={"daisy": 2, "tulips": 1})
    with pytest.raises(AirflowFailException) as e:
        _validate(root, max_bad_fraction=0.1).execute({})
    msg = str(e.value)
    assert "3 of 20 images are unreadable" in msg
    for name in ("daisy/daisy_000.jpg", "daisy/daisy_001.jpg", "tulips/tulips_000.jpg"):
        assert f"{root}/{name}" in msg
    assert "daisy_002.jpg" not in msg


def test_validate_corrupt_images_under_tolerance_warn(gcs, bucket, capfd):
    root = f"gs://{bucket}/flowers"
    _upload(gcs, root, {"daisy": 10, "tulips": 10}, corrupt={"tulips": 1})
    capfd.readouterr()
    out = _validate(root, max_bad_fraction=0.1).execute({})
    bad = f"{root}/tulips/tulips_000.jpg"
    assert list(out["bad_files"]) == [bad]
    assert "not a readable image" in out["bad_files"][bad]
    assert out["classes"] == {"daisy": 10, "tulips": 9}
    assert len(out["warnings"]) == 1 and bad in out["warnings"][0]
    # Airflow's task logger (structlog) writes to the console outside a task runner.
    logged = "".join(capfd.readouterr())
    assert any("warning" in line and "skipping 1 unreadable image(s)" in line and bad in line
               for line in logged.splitlines()), logged[-2000:]


# ================================================================ StageSplitOperator


def test_stage_split_writes_a_deterministic_split_without_bad_files(gcs, bucket):
    root = f"gs://{bucket}/flowers"
    _upload(gcs, root, {"daisy": 10, "roses": 10, "tulips": 10}, corrupt={"roses": 1})
    validated = _validate(root, max_bad_fraction=0.1).execute({})

    outs = []
    for k in (1, 2):
        op = StageSplitOperator(task_id="stage_split", data_uri=root, split_uri=f"gs://{bucket}/run{k}/split.json",
                                seed=42, exclude=validated["bad_files"])
        outs.append(op.execute({}))
    first, second = outs
    assert first["split_uri"] == f"gs://{bucket}/run1/split.json"
    assert first["labels"] == ["daisy", "roses", "tulips"]
    assert sum(first["counts"].values()) == 29
    assert first["fingerprint"] == second["fingerprint"]
    assert first["counts"] == second["counts"]

    manifest = SplitManifest.from_json(gcs.read_bytes(first["split_uri"]).decode())
    files = [u for split in manifest.files.values() for u, _ in split]
    assert len(files) == len(set(files)) == 29
    assert set(validated["bad_files"]).isdisjoint(files)
    assert all(manifest.files[s] for s in ("train", "val", "test"))
    assert manifest.fingerprint() == first["fingerprint"]
    assert gcs.read_bytes(first["split_uri"]) == gcs.read_bytes(second["split_uri"])

    other = StageSplitOperator(task_id="stage_split", data_uri=root, split_uri=f"gs://{bucket}/run3/split.json",
                               seed=7, exclude=validated["bad_files"]).execute({})
    assert other["fingerprint"] != first["fingerprint"]


def test_stage_split_missing_bucket_fails(gcs):
    with pytest.raises(AirflowFailException, match="does not exist"):
        StageSplitOperator(task_id="stage_split", data_uri="gs://absent-bucket-xyz/flowers",
                           split_uri="gs://absent-bucket-xyz/split.json").execute({})


# ================================================================ mobile publishing


def test_publish_unknown_backend_fails_clearly(gcs, bucket):
    gcs.write_bytes(f"gs://{bucket}/x.tflite", b"TFL3")
    op = PublishMobileModelOperator(task_id="publish", display_name="flowers_mobilenet_v3",
                                    tflite_uri=f"gs://{bucket}/x.tflite", backend="carrier_pigeon",
                                    firebase_storage_bucket=bucket)
    with pytest.raises(AirflowFailException) as e:
        op.execute({})
    assert "'carrier_pigeon'" in str(e.value) and "'firebase_storage'" in str(e.value)
    assert gcs.list_files(f"gs://{bucket}/Firebase") == []


# ================================================================ run summary

TARGETS = {"cloud": "endpoint", "mobile": "mobile"}
METRICS = {"accuracy": 0.8, "macro_f1": 0.78, "num_examples": 10, "per_class": {}, "confusion_matrix": [],
           "labels": ["daisy", "tulips"], "extra": "dropped"}


GROUP_STEPS = {"cloud": ("selected", "train", "champion_gate", "register_model", "deploy"),
               "mobile": ("selected", "train", "champion_gate", "convert_tflite", "publish")}
TASK_IDS = ["validate_dataset", "stage_split"] + [f"{g}.{s}" for g, steps in GROUP_STEPS.items() for s in steps]


def _states(**overrides) -> dict[str, str]:
    states = dict.fromkeys(TASK_IDS, "success")
    states.update({k.replace("__", "."): v for k, v in overrides.items()})
    return states


def _xcoms(states: dict[str, str]) -> dict[str, dict | None]:
    full = {
        "validate_dataset": {"classes": {"daisy": 8, "tulips": 8}, "duration_s": 1.0},
        "stage_split": {"labels": ["daisy", "tulips"], "counts": {"train": 12, "val": 2, "test": 2},
                        "duration_s": 0.5},
        "cloud.selected": True,
        "cloud.train": {"model_dir": "gs://b/r/cloud/model", "metrics": METRICS, "duration_s": 60.0},
        "cloud.champion_gate": {"promote": True, "reason": "first model", "challenger": {"accuracy": 0.8},
                                "champion": None, "duration_s": 2.0},
        "cloud.register_model": {"model_resource_name": "projects/p/locations/l/models/1@1", "duration_s": 1.0},
        "cloud.deploy": {"prediction_url": "http://127.0.0.1:1/predict", "model_version_id": "1", "duration_s": 9.0},
        "mobile.selected": True,
        "mobile.train": {"model_dir": "gs://b/r/mobile/model", "metrics": METRICS, "duration_s": 40.0},
        "mobile.champion_gate": {"promote": True, "reason": "first model", "challenger": {"accuracy": 0.8},
                                 "champion": None, "duration_s": 2.0},
        "mobile.convert_tflite": {"mode": "dynamic", "size_bytes": 1_700_000, "top1_agreement": 1.0,
                                  "tflite_accuracy": 0.8, "latency_ms_p95": 2.0, "duration_s": 5.0},
        "mobile.publish": {"display_name": "m", "model_id": "abc", "version": 1, "duration_s": 1.0},
    }
    return {tid: (x if states.get(tid) == "success" else None) for tid, x in full.items()}


def _summary(states):
    return build_summary(dag_id="dual_deployment", run_id="manual__1", platform="local", targets=TARGETS,
                         states=states, xcoms=_xcoms(states), artifacts_uri="gs://b/r")


def test_build_summary_all_success():
    s = _summary(_states())
    assert s["status"] == "success"
    cloud, mobile = s["targets"]["cloud"], s["targets"]["mobile"]
    assert cloud["status"] == mobile["status"] == "success"
    assert cloud["failed_steps"] == mobile["failed_steps"] == []
    assert cloud["metrics"]["accuracy"] == 0.8 and "extra" not in cloud["metrics"]
    assert "metrics" not in cloud["training"] and cloud["training"]["model_dir"] == "gs://b/r/cloud/model"
    assert cloud["endpoint"]["prediction_url"] == "http://127.0.0.1:1/predict"
    assert "tflite" not in cloud and "endpoint" not in mobile
    assert mobile["tflite"]["size_bytes"] == 1_700_000 and "duration_s" not in mobile["tflite"]
    assert mobile["published"]["version"] == 1
    assert s["steps"]["cloud.train"] == {"state": "success", "duration_s": 60.0}
    assert s["data"]["classes"] == {"daisy": 8, "tulips": 8}
    text = render_text(s)
    assert "SUCCESS" in text and "[cloud] success: test accuracy 80.0%" in text
    assert "endpoint http://127.0.0.1:1/predict serving version 1" in text
    assert "published m id abc version 1" in text


def test_build_summary_failed_target():
    states = _states(mobile__convert_tflite="failed", mobile__publish="upstream_failed")
    s = _summary(states)
    assert s["status"] == "failed"
    assert s["targets"]["cloud"]["status"] == "success"
    mobile = s["targets"]["mobile"]
    assert mobile["status"] == "failed"
    assert [f["task_id"] for f in mobile["failed_steps"]] == ["mobile.convert_tflite"]
    assert mobile["not_run"] == ["mobile.publish"]
    assert "tflite" not in mobile and "published" not in mobile
    assert mobile["metrics"]["accuracy"] == 0.8  # training succeeded; its metrics are kept
    text = render_text(s)
    assert "FAILED" in text and "[mobile] failed" in text
    assert "failed mobile.convert_tflite:" in text and "not run: mobile.publish" in text


def test_build_summary_not_promoted_is_not_a_failure():
    states = _states(mobile__champion_gate="skipped", mobile__convert_tflite="skipped", mobile__publish="skipped")
    xcoms = _xcoms(states)
    xcoms["mobile.champion_gate"] = {"promote": False, "reason": "challenger 0.5 < champion 0.8",
                                     "challenger": {"accuracy": 0.5}, "champion": {"accuracy": 0.8}}
    s = build_summary(dag_id="dual_deployment", run_id="r", platform="local", targets=TARGETS, states=states,
                      xcoms=xcoms, artifacts_uri="gs://b/r")
    assert s["status"] == "success"
    assert s["targets"]["mobile"]["status"] == "not_promoted"
    assert s["targets"]["mobile"]["decision"]["reason"] == "challenger 0.5 < champion 0.8"
    assert "published" not in s["targets"]["mobile"]
    assert "gate: challenger 0.5 < champion 0.8" in render_text(s)


def test_build_summary_when_data_validation_failed():
    states = dict.fromkeys(TASK_IDS, "upstream_failed")
    states["validate_dataset"] = "failed"
    s = _summary(states)
    assert s["status"] == "failed"
    assert all(t["status"] == "failed" and "metrics" not in t for t in s["targets"].values())
    assert s["targets"]["cloud"]["not_run"] == sorted(f"cloud.{x}" for x in GROUP_STEPS["cloud"])
    assert s["first_failure"]["task_id"] == "validate_dataset"
    assert "[cloud] not run: validate_dataset failed" in render_text(s)


def test_target_without_any_task_state_is_not_success():
    s = build_summary(dag_id="d", run_id="r", platform="local", targets=TARGETS, states={}, xcoms={},
                      artifacts_uri="gs://b/r")
    assert s["status"] == "failed"


class _FakeTI:
    """The two TaskInstance calls RunSummaryOperator makes, answered from fixed states/XComs."""

    def __init__(self, run_id: str, states: dict[str, str]):
        self.run_id, self.states, self.xcoms = run_id, states, _xcoms(states)
        self.state_queries, self.pushed = [], {}

    def get_task_states(self, dag_id, task_ids, run_ids):
        self.state_queries.append((dag_id, sorted(task_ids), run_ids))
        return {self.run_id: {t: s for t, s in self.states.items() if t in task_ids}}

    def xcom_pull(self, task_ids, key="return_value"):
        return self.xcoms.get(task_ids) if key == "return_value" else None

    def xcom_push(self, key, value):
        self.pushed[key] = value


def _summary_dag(bucket: str, local_copy: str):
    from airflow.providers.standard.operators.empty import EmptyOperator
    from airflow.sdk import DAG, TaskGroup

    with DAG("dual_deployment", schedule=None) as dag:
        EmptyOperator(task_id="validate_dataset") >> EmptyOperator(task_id="stage_split")
        for name, steps in GROUP_STEPS.items():
            with TaskGroup(name):
                for step in steps:
                    EmptyOperator(task_id=step)
        op = RunSummaryOperator(task_id="run_summary", targets=TARGETS,
                                summary_uri=f"gs://{bucket}/runs/r/run_summary.json",
                                artifacts_uri=f"gs://{bucket}/runs/r", platform="local", local_copy_path=local_copy)
    return dag, op


def test_run_summary_operator_writes_the_summary(gcs, bucket, tmp_path):
    local_copy = str(tmp_path / "state" / "run_summary.json")
    dag, op = _summary_dag(bucket, local_copy)
    assert op.trigger_rule == "all_done"
    ti = _FakeTI("manual__1", _states())
    out = op.execute({"ti": ti, "run_id": "manual__1"})
    assert out["status"] == "success" and out["summary_uri"] == f"gs://{bucket}/runs/r/run_summary.json"
    assert "run_summary" not in ti.state_queries[0][1] and sorted(ti.state_queries[0][1]) == sorted(TASK_IDS)
    remote = gcs.read_json(out["summary_uri"])
    with open(local_copy) as f:
        assert json.load(f) == remote
    assert remote["status"] == "success" and remote["summary_uri"] == out["summary_uri"]
    assert set(remote["targets"]) == {"cloud", "mobile"}
    # The run report's address goes to XCom, where RunReportLink finds it for the task's extra link.
    assert ti.pushed["report_uri"] == remote["report_uri"] and remote["report_uri"].startswith(f"gs://{bucket}/")


def test_run_summary_operator_fails_the_task_when_a_target_failed(gcs, bucket, tmp_path):
    local_copy = str(tmp_path / "run_summary.json")
    _, op = _summary_dag(bucket, local_copy)
    ti = _FakeTI("manual__2", _states(cloud__deploy="failed"))
    with pytest.raises(AirflowFailException) as e:
        op.execute({"ti": ti, "run_id": "manual__2"})
    assert "target(s) cloud failed" in str(e.value)
    assert f"gs://{bucket}/runs/r/run_summary.json" in str(e.value)
    # The summary is written before the task fails: the evidence stays with the run.
    remote = gcs.read_json(f"gs://{bucket}/runs/r/run_summary.json")
    assert remote["status"] == "failed"
    assert [f["task_id"] for f in remote["targets"]["cloud"]["failed_steps"]] == ["cloud.deploy"]
    assert remote["targets"]["mobile"]["status"] == "success"
    with open(local_copy) as f:
        assert json.load(f)["status"] == "failed"


# ================================================================ smoke test checks

LABELS = ["daisy", "roses", "tulips"]


def test_check_response_accepts_a_valid_answer():
    body = {"predictions": [{"label": "roses", "confidence": 0.7}, {"label": "daisy", "confidence": 1.0}]}
    assert check_response(body, LABELS, 2) == body["predictions"]


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"predictions": [{"label": "roses", "confidence": 0.5}]}, "expected 2 predictions"),
        ({"predictions": [{"label": "roses", "confidence": 0.5}] * 3}, "expected 2 predictions"),
        ({"error": "boom"}, "expected 2 predictions"),
        ({"predictions": "roses"}, "expected 2 predictions"),
        ({"predictions": [{"label": "roses", "confidence": 0.5}, {"label": "cactus", "confidence": 0.5}]},
         "'cactus' is not one of the model's labels"),
        ({"predictions": [{"label": "roses", "confidence": 0.5}, {"confidence": 0.5}]}, "label None"),
        ({"predictions": [{"label": "roses", "confidence": 1.5}, {"label": "daisy", "confidence": 0.5}]},
         "confidence 1.5 is not a probability"),
        ({"predictions": [{"label": "roses", "confidence": -0.1}, {"label": "daisy", "confidence": 0.5}]},
         "not a probability"),
        ({"predictions": [{"label": "roses"}, {"label": "daisy", "confidence": 0.5}]}, "not a probability"),
    ],
)
def test_check_response_rejects_bad_answers(body, words):
    with pytest.raises(SmokeTestFailed, match=words):
        check_response(body, LABELS, 2)


def test_build_request_is_vertex_format_and_fits_the_request_limit():
    import base64

    small = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(small, format="PNG")
    big = io.BytesIO()  # a phone photo: far above what one instance may carry
    Image.effect_noise((3000, 2000), 64).convert("RGB").save(big, format="JPEG", quality=95)
    req = build_request([small.getvalue(), big.getvalue()], image_size=64)
    assert [set(i) for i in req["instances"]] == [{"b64"}, {"b64"}]
    assert base64.b64decode(req["instances"][0]["b64"]) == small.getvalue()  # fits: sent as it is
    resized = base64.b64decode(req["instances"][1]["b64"])
    assert len(big.getvalue()) > 1_500_000 > len(json.dumps(req))
    assert max(Image.open(io.BytesIO(resized)).size) <= 1024

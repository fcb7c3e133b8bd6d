"""The run summary (issue 9 item 9, issue 15 items 2, 5, 8): record what was delivered first,
optional parts only ever become warnings, the first real failure and its message are what the
user sees, and the channels' consistency is checked.

Pure functions are tested directly; ``RunSummaryOperator`` runs against the GCS emulator with
``_TaskSDK`` standing in for what the Task SDK answers a task about its run (task states and
XComs, return values and keyed).
"""

from __future__ import annotations

import json
import uuid

import pytest
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from dual_deploy.cost import run_cost
from dual_deploy.failures import FAILURE_XCOM_KEY, MAX_MESSAGE_CHARS, failure_message, failure_record
from dual_deploy.hooks.gcs_io import GcsIO
from dual_deploy.operators.summary import (
    NO_MESSAGE,
    RunSummaryOperator,
    build_summary,
    channel_consistency,
    first_failure,
    render_text,
)
from dualml.dataset import labels_text

ANON_CONN = json.dumps({"conn_type": "google_cloud_platform", "extra": {"is_anonymous": True, "project": "local-project"}})
TARGETS = {"cloud": "endpoint", "mobile": "mobile"}
STEPS = {"cloud": ("selected", "train", "champion_gate", "register_model", "deploy"),
         "mobile": ("selected", "train", "champion_gate", "convert_tflite", "publish")}
ORDER = ["validate_dataset", "stage_split"] + [f"{g}.{s}" for g, steps in STEPS.items() for s in steps]
LABELS = ["daisy", "roses", "tulips"]
VALIDATION_ERROR = ("dataset gs://b/flowers is not usable: found 1 class folder(s) (daisy); need at least 2. "
                    "Add class folders or fix data_uri")


def _states(**overrides) -> dict[str, str]:
    states = dict.fromkeys(ORDER, "success")
    states.update({k.replace("__", "."): v for k, v in overrides.items()})
    return states


def _validation_failed() -> dict[str, str]:
    return {**dict.fromkeys(ORDER, "upstream_failed"), "validate_dataset": "failed"}


def _xcoms(root: str, states: dict[str, str], labels=LABELS) -> dict:
    metrics = {"accuracy": 0.8, "macro_f1": 0.78, "labels": labels, "confusion_matrix": [[1, 0, 0], [0, 1, 0],
                                                                                          [0, 0, 1]]}
    full = {
        "validate_dataset": {"data_uri": f"{root}/data", "fingerprint": "fp-1", "classes": dict.fromkeys(labels, 8)},
        "stage_split": {"labels": labels, "counts": {"train": 18, "val": 3, "test": 3}},
        "cloud.selected": True,
        "cloud.train": {"model_dir": f"{root}/runs/r/cloud/model", "metrics": metrics, "duration_s": 600.0,
                        "custom_job_name": "projects/p/locations/l/customJobs/1"},
        "cloud.champion_gate": {"promote": True, "reason": "first model", "challenger": {}, "champion": None},
        "cloud.register_model": {"model_resource_name": "projects/p/locations/l/models/1@2", "model_version_id": "2"},
        "cloud.deploy": {"endpoint_id": "9", "prediction_url": "http://127.0.0.1:1/predict", "model_version_id": "2",
                         "deployed_model_id": "77"},
        "mobile.selected": True,
        "mobile.train": {"model_dir": f"{root}/runs/r/mobile/model", "metrics": metrics, "duration_s": 300.0},
        "mobile.champion_gate": {"promote": True, "reason": "first model", "challenger": {}, "champion": None},
        "mobile.convert_tflite": {"mode": "dynamic", "size_bytes": 1_000_000, "tflite_uri": f"{root}/t.tflite"},
        "mobile.publish": {"backend": "firebase_storage", "model_id": "m1", "display_name": "flowers", "version": 4},
    }
    return {tid: (x if states.get(tid) == "success" else None) for tid, x in full.items()}


class _TaskSDK:
    """What the Task SDK answers a task about its own run: task states and XComs."""

    def __init__(self, run_id: str, states: dict[str, str], xcoms: dict, keyed: dict | None = None):
        self.run_id, self.states, self.xcoms, self.keyed = run_id, states, xcoms, keyed or {}
        self.pushed: dict = {}

    def get_task_states(self, dag_id, task_ids=None, run_ids=None, **_):
        return {self.run_id: {t: s for t, s in self.states.items() if task_ids is None or t in task_ids}}

    def xcom_pull(self, task_ids, key="return_value"):
        if key == "return_value":
            return self.xcoms.get(task_ids)
        return self.keyed.get((task_ids, key))

    def xcom_push(self, key, value):
        self.pushed[key] = value


# ------------------------------------------------------------------ pure: first failure, targets, text


def test_first_failure_is_the_task_that_failed_not_its_consequences():
    states = _validation_failed()
    failures = {"validate_dataset": failure_record("validate_dataset", AirflowFailException(VALIDATION_ERROR))}
    assert first_failure(states, failures, ORDER) == {"task_id": "validate_dataset", "message": VALIDATION_ERROR}
    s = build_summary(dag_id="d", run_id="r", platform="local", targets=TARGETS, states=states, xcoms={},
                      artifacts_uri="gs://b/r", failures=failures, order=ORDER)
    assert s["status"] == "failed" and s["first_failure"]["task_id"] == "validate_dataset"
    for t in s["targets"].values():
        assert t["status"] == "failed" and t["failed_steps"] == []
        assert "cloud.train" in t["not_run"] or "mobile.train" in t["not_run"]
        assert t["cause"] == s["first_failure"]


def test_first_failure_is_ordered_by_when_it_failed_then_by_dag_order():
    states = _states(cloud__deploy="failed", mobile__publish="failed")
    early = {**failure_record("mobile.publish", RuntimeError("quota")), "failed_at": "2026-01-01T00:00:01"}
    late = {**failure_record("cloud.deploy", RuntimeError("smoke")), "failed_at": "2026-01-01T00:00:09"}
    assert first_failure(states, {"mobile.publish": early, "cloud.deploy": late}, ORDER)["task_id"] == "mobile.publish"
    # No record (a killed task): DAG order decides, and the message says where to look.
    ff = first_failure(states, {}, ORDER)
    assert ff == {"task_id": "cloud.deploy", "message": NO_MESSAGE}


def test_a_failed_step_carries_its_message_and_the_rest_is_not_run():
    states = _states(cloud__train="failed", cloud__champion_gate="upstream_failed",
                     cloud__register_model="upstream_failed", cloud__deploy="upstream_failed")
    failures = {"cloud.train": failure_record("cloud.train", RuntimeError("custom job failed: exit 3: bad image"))}
    s = build_summary(dag_id="d", run_id="r", platform="gcp", targets=TARGETS, states=states,
                      xcoms=_xcoms("gs://b", states), artifacts_uri="gs://b/r", failures=failures, order=ORDER)
    cloud = s["targets"]["cloud"]
    assert cloud["failed_steps"] == [{"task_id": "cloud.train", "message": "custom job failed: exit 3: bad image"}]
    assert cloud["not_run"] == ["cloud.champion_gate", "cloud.deploy", "cloud.register_model"]
    assert s["targets"]["mobile"]["status"] == "success"
    text = render_text(s)
    assert "FAILED at cloud.train:\n    custom job failed: exit 3: bad image" in text
    assert "failed cloud.train: custom job failed: exit 3: bad image" in text


def test_text_of_a_run_rejected_at_validation_points_at_validation():
    states = _validation_failed()
    failures = {"validate_dataset": failure_record("validate_dataset", AirflowFailException(VALIDATION_ERROR))}
    s = build_summary(dag_id="d", run_id="r", platform="local", targets=TARGETS, states=states, xcoms={},
                      artifacts_uri="gs://b/r", failures=failures, order=ORDER)
    text = render_text(s)
    lines = text.splitlines()
    assert lines[0] == "run r on local: FAILED"
    assert lines[1] == "  FAILED at validate_dataset:" and lines[2] == f"    {VALIDATION_ERROR}"
    assert "  [cloud] not run: validate_dataset failed" in lines
    assert "cloud.train" not in text and "mobile.train" not in text


def test_failure_messages_are_the_exception_text_bounded():
    assert failure_message(AirflowFailException("bucket gs://x does not exist")) == "bucket gs://x does not exist"
    assert failure_message(KeyError()) == "KeyError"
    assert failure_message(None).startswith("failed without an exception")
    long = failure_message(RuntimeError("x" * 10 * MAX_MESSAGE_CHARS))
    assert len(long) <= MAX_MESSAGE_CHARS and long.endswith("(truncated)")


# ------------------------------------------------------------------ pure: channels


def test_channels_agree_when_both_serve_the_same_run():
    rec = {"run_id": "r1", "model_dir": "gs://b/r1/x", "labels": LABELS}
    report = channel_consistency({"cloud": rec, "mobile": {**rec, "model_dir": "gs://b/r1/y"}}, TARGETS)
    assert report == {"consistent": True, "warnings": [], "serving": {
        "cloud": {"run_id": "r1", "model_dir": "gs://b/r1/x", "labels": LABELS},
        "mobile": {"run_id": "r1", "model_dir": "gs://b/r1/y", "labels": LABELS}}}


def test_channels_with_different_class_sets_or_runs_are_flagged():
    cloud = {"run_id": "r1", "model_dir": "a", "labels": ["daisy", "roses"]}
    mobile = {"run_id": "r2", "model_dir": "b", "labels": ["daisy", "roses", "tulips"]}
    report = channel_consistency({"cloud": cloud, "mobile": mobile}, TARGETS)
    assert report["consistent"] is False
    assert any("class sets differ" in w and "mobile has ['tulips'] that cloud lacks" in w for w in report["warnings"])
    assert any("different runs: cloud serves run r1, mobile serves run r2" in w for w in report["warnings"])
    one_empty = channel_consistency({"cloud": None, "mobile": mobile}, TARGETS)
    assert not one_empty["consistent"] and "cloud (endpoint) serves no model yet" in one_empty["warnings"][0]
    assert channel_consistency({"cloud": None, "mobile": None}, TARGETS)["consistent"] is True


def test_cost_with_a_missing_price_is_partial_with_a_warning():
    prices = {"currency": "USD", "regions": {"r1": {"machines": {"m": {"on_demand": 1.0}}, "accelerators": {},
                                                    "prediction_machines": {}}}}
    inputs = {"cloud": {"training": dict(machine_type="m", accelerator_type="T4", accelerator_count=1,
                                         replica_count=1, spot=False),
                        "endpoint": dict(machine_type="m", min_replica_count=1)},
              "mobile": {"training": dict(machine_type="m", accelerator_type=None, accelerator_count=0,
                                          replica_count=1, spot=False)}}
    out = run_cost({"platform": "gcp", "steps": {"cloud.train": {"duration_s": 3600},
                                                 "mobile.train": {"duration_s": 3600}}}, inputs, region="r1",
                   prices=prices)
    assert out["complete"] is False and out["training_total_usd"] == 1.0
    assert any("cloud training not priced" in w and "'T4'" in w for w in out["warnings"])
    assert any("cloud serving not priced" in w for w in out["warnings"])


# ------------------------------------------------------------------ the operator on the GCS emulator


@pytest.fixture
def gcs(gcs_emulator, monkeypatch) -> GcsIO:
    monkeypatch.setenv("AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT", ANON_CONN)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator)
    return GcsIO()


@pytest.fixture
def root(gcs) -> str:
    bucket = f"summary-{uuid.uuid4().hex[:10]}"
    gcs.hook.get_conn().create_bucket(bucket)
    return f"gs://{bucket}"


def _operator(root: str, tmp_path, **kwargs) -> RunSummaryOperator:
    from airflow.providers.standard.operators.empty import EmptyOperator
    from airflow.sdk import DAG, TaskGroup

    with DAG("dual_deployment", schedule=None):
        EmptyOperator(task_id="validate_dataset") >> EmptyOperator(task_id="stage_split")
        for name, steps in STEPS.items():
            with TaskGroup(name):
                for step in steps:
                    EmptyOperator(task_id=step)
        defaults = dict(targets=TARGETS, summary_uri=f"{root}/runs/r/run_summary.json",
                        artifacts_uri=f"{root}/runs/r", platform="gcp",
                        local_copy_path=str(tmp_path / "state" / "run_summary.json"),
                        champions_uri=f"{root}/champions", ledger_uri=f"{root}/ledger.json",
                        data_uri=f"{root}/data", region="us-central1")
        return RunSummaryOperator(task_id="run_summary", **{**defaults, **kwargs})


def _cost_inputs():
    from dual_deploy.config import load_config
    from dual_deploy.dag_helpers import cost_inputs

    return cost_inputs(load_config(platform="local"))


def _write_models(gcs: GcsIO, root: str, labels=LABELS, confusion=None) -> None:
    for name in TARGETS:
        base = f"{root}/runs/r/{name}/model"
        gcs.write_json(f"{base}/metrics.json", {"accuracy": 0.8, "macro_f1": 0.78, "labels": labels,
                                                "confusion_matrix": confusion or [[1, 0, 0], [0, 1, 0], [0, 0, 1]]})
        gcs.write_bytes(f"{base}/labels.txt", labels_text(labels))


def test_a_region_without_prices_still_records_the_champions(gcs, root, tmp_path):
    """Issue 9 item 9: the cost step used to raise before the champions were recorded."""
    _write_models(gcs, root)
    op = _operator(root, tmp_path, cost_inputs=_cost_inputs(), region="mars-central1")
    states = _states()
    out = op.execute({"ti": _TaskSDK("r", states, _xcoms(root, states)), "run_id": "r"})
    assert out["status"] == "success"
    for name in TARGETS:
        champion = gcs.read_json(f"{root}/champions/{name}.json")
        assert champion["run_id"] == "r" and champion["model_dir"] == f"{root}/runs/r/{name}/model"
        assert champion["labels"] == LABELS
    assert gcs.read_json(f"{root}/champions/cloud.json")["delivery"]["model_version_id"] == "2"
    assert gcs.read_json(f"{root}/champions/mobile.json")["delivery"]["version"] == 4
    summary = gcs.read_json(f"{root}/runs/r/run_summary.json")
    assert any("no machines price" in w and "'mars-central1'" in w for w in summary["warnings"]), summary["warnings"]
    assert summary["champions"] == {n: f"{root}/runs/r/{n}/model" for n in TARGETS}
    assert summary["channels"]["consistent"] is True
    assert summary["ledger"]["note"].startswith("attempt 1 of 3 succeeded")
    assert summary["report_uri"] == f"{root}/runs/r/report/index.html" and gcs.exists(summary["report_uri"])


def test_a_report_that_crashes_is_a_warning_and_nothing_is_lost(gcs, root, tmp_path):
    _write_models(gcs, root, confusion=[[1, 0], [0, 1]])  # 2x2 for 3 labels: the report's plot raises
    op = _operator(root, tmp_path)
    states = _states()
    out = op.execute({"ti": _TaskSDK("r", states, _xcoms(root, states)), "run_id": "r"})
    assert out["status"] == "success"
    summary = json.loads((tmp_path / "state" / "run_summary.json").read_text())
    assert summary["report_uri"] is None
    assert any(w.startswith("report: IndexError") for w in summary["warnings"]), summary["warnings"]
    assert gcs.read_json(f"{root}/runs/r/run_summary.json") == summary
    assert gcs.exists(f"{root}/champions/cloud.json") and gcs.exists(f"{root}/champions/mobile.json")


def test_a_ledger_that_cannot_be_written_fails_retryably_after_recording_the_rest(gcs, root, tmp_path):
    _write_models(gcs, root)
    op = _operator(root, tmp_path, ledger_uri=f"gs://no-such-bucket-{uuid.uuid4().hex[:8]}/ledger.json")
    states = _states()
    with pytest.raises(AirflowException) as e:
        op.execute({"ti": _TaskSDK("r", states, _xcoms(root, states)), "run_id": "r"})
    assert not isinstance(e.value, AirflowFailException)  # retrying may fix it
    assert "could not record" in str(e.value) and "training ledger" in str(e.value)
    summary = gcs.read_json(f"{root}/runs/r/run_summary.json")
    assert summary["status"] == "success" and "training ledger" in summary["recording_errors"][0]
    assert gcs.exists(f"{root}/champions/cloud.json") and gcs.exists(f"{root}/champions/mobile.json")
    assert "NOT RECORDED: training ledger" in render_text(summary)


def test_a_run_rejected_at_validation_says_so_and_is_never_retried(gcs, root, tmp_path):
    gcs.write_bytes(f"{root}/data/daisy/0.jpg", b"not really a jpeg")
    op = _operator(root, tmp_path)
    states = _validation_failed()
    record = failure_record("validate_dataset", AirflowFailException(VALIDATION_ERROR))
    ti = _TaskSDK("r", states, {}, keyed={("validate_dataset", FAILURE_XCOM_KEY): record})
    with pytest.raises(AirflowFailException, match="at validate_dataset: dataset gs://b/flowers is not usable"):
        op.execute({"ti": ti, "run_id": "r"})
    summary = json.loads((tmp_path / "state" / "run_summary.json").read_text())
    assert summary["first_failure"] == {"task_id": "validate_dataset", "message": VALIDATION_ERROR}
    assert summary["data"] == {"data_uri": f"{root}/data"}
    assert "champions" in summary and summary["champions"] == {}  # nothing was delivered
    assert "rejected" in summary["ledger"]["note"] and "new batch" in summary["ledger"]["note"]
    ledger = gcs.read_json(f"{root}/ledger.json")
    (entry,) = ledger.values()
    assert entry["status"] == "failed" and entry["attempts"][0]["permanent"] is True
    assert entry["attempts"][0]["failure"]["task_id"] == "validate_dataset"
    assert render_text(summary).splitlines()[1:3] == ["  FAILED at validate_dataset:", f"    {VALIDATION_ERROR}"]


def test_a_transient_failure_is_recorded_for_a_retry(gcs, root, tmp_path):
    _write_models(gcs, root)
    op = _operator(root, tmp_path)
    states = _states(mobile__publish="failed")
    record = failure_record("mobile.publish", RuntimeError("503 Service Unavailable"))
    ti = _TaskSDK("r", states, _xcoms(root, states), keyed={("mobile.publish", FAILURE_XCOM_KEY): record})
    with pytest.raises(AirflowFailException, match="target.s. mobile failed at mobile.publish: 503"):
        op.execute({"ti": ti, "run_id": "r"})
    summary = gcs.read_json(f"{root}/runs/r/run_summary.json")
    assert summary["targets"]["mobile"]["failed_steps"] == [{"task_id": "mobile.publish",
                                                             "message": "503 Service Unavailable"}]
    assert summary["ledger"]["note"].startswith("attempt 1 of 3 failed: the new-data trigger will retry it")
    # Only the delivered target became champion; the channels now differ (mobile serves nothing).
    assert gcs.exists(f"{root}/champions/cloud.json") and not gcs.exists(f"{root}/champions/mobile.json")
    assert summary["channels"]["consistent"] is False


def test_channels_out_of_step_are_flagged_in_summary_text_and_report(gcs, root, tmp_path):
    """Issue 15 item 2: mobile (not promoted) still serves an older run with another class set."""
    old = f"{root}/runs/old/mobile/model"
    gcs.write_bytes(f"{old}/labels.txt", labels_text(["daisy", "roses"]))
    # A record from before labels were recorded: the check reads the model's labels.txt.
    gcs.write_json(f"{root}/champions/mobile.json", {"model_dir": old, "run_id": "old"})
    _write_models(gcs, root)
    states = _states(mobile__champion_gate="skipped", mobile__convert_tflite="skipped", mobile__publish="skipped")
    xcoms = _xcoms(root, states)
    xcoms["mobile.champion_gate"] = {"promote": False, "reason": "challenger 0.5 < champion 0.8"}
    out = _operator(root, tmp_path).execute({"ti": _TaskSDK("r", states, xcoms), "run_id": "r"})
    assert out["status"] == "success"
    summary = gcs.read_json(f"{root}/runs/r/run_summary.json")
    channels = summary["channels"]
    assert channels["consistent"] is False
    assert channels["serving"]["mobile"] == {"run_id": "old", "model_dir": old, "labels": ["daisy", "roses"]}
    assert any("class sets differ" in w and "mobile lacks ['tulips']" in w for w in channels["warnings"])
    assert "CHANNELS OUT OF STEP: class sets differ" in render_text(summary)
    page = (tmp_path / "state" / "report" / "index.html").read_text()
    assert "class sets differ" in page

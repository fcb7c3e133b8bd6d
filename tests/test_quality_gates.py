"""Issue 6: champion/challenger gate, cost arithmetic and the run report.

The gate runs against the GCS emulator with hand-built Keras models whose accuracy on the
test images is known exactly (solid red/green/blue images; a model that reads the dominant
channel is 100 % right, the same model with permuted weights 0 %).
"""

from __future__ import annotations

import io
import json
import os
import uuid

import numpy as np
import pytest
from airflow.sdk.exceptions import AirflowSkipException
from PIL import Image

from dual_deploy.cost import PriceError, load_prices, run_cost, serving_cost, training_cost
from dual_deploy.hooks.gcs_io import GcsIO
from dual_deploy.operators.gate import ChampionGateOperator, decide
from dual_deploy.operators.summary import build_summary
from dual_deploy.report import write_report
from dualml.dataset import SplitManifest, labels_text

LABELS = ["blue", "green", "red"]
COLORS = {"blue": (10, 20, 230), "green": (15, 220, 30), "red": (235, 25, 10)}
ANON_CONN = json.dumps({"conn_type": "google_cloud_platform", "extra": {"is_anonymous": True, "project": "local-project"}})


# ------------------------------------------------------------------ decide(): the rule itself

def test_first_run_has_no_champion_and_promotes():
    ok, reason = decide({"accuracy": 0.7, "macro_f1": 0.6}, None, tolerance=0.01, min_accuracy=0.5, min_macro_f1=0)
    assert ok and "no champion" in reason


def test_worse_challenger_is_not_promoted():
    ok, reason = decide({"accuracy": 0.80, "macro_f1": 0.8}, {"accuracy": 0.90}, tolerance=0.01,
                        min_accuracy=0.5, min_macro_f1=0)
    assert not ok and "0.800 < champion 0.900" in reason


def test_better_and_tying_challengers_are_promoted():
    assert decide({"accuracy": 0.95, "macro_f1": 0.9}, {"accuracy": 0.90}, tolerance=0.0, min_accuracy=0,
                  min_macro_f1=0)[0]
    ok, reason = decide({"accuracy": 0.895, "macro_f1": 0.9}, {"accuracy": 0.90}, tolerance=0.01, min_accuracy=0,
                        min_macro_f1=0)
    assert ok and "ties" in reason


def test_absolute_minimums_apply_even_without_champion():
    ok, reason = decide({"accuracy": 0.4, "macro_f1": 0.4}, None, tolerance=0.01, min_accuracy=0.5, min_macro_f1=0)
    assert not ok and "below the minimum 0.500" in reason
    ok, reason = decide({"accuracy": 0.9, "macro_f1": 0.3}, None, tolerance=0.01, min_accuracy=0.5, min_macro_f1=0.5)
    assert not ok and "macro F1" in reason


# ------------------------------------------------------------------ the gate operator on real storage

@pytest.fixture
def gcs(gcs_emulator, monkeypatch) -> GcsIO:
    monkeypatch.setenv("AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT", ANON_CONN)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator)
    io_ = GcsIO()
    return io_


@pytest.fixture
def run(gcs, tmp_path):
    """A bucket with a test split of solid-colour images and two saved models (right and wrong)."""
    import keras

    bucket = f"gate-{uuid.uuid4().hex[:10]}"
    gcs.hook.get_conn().create_bucket(bucket)
    root = f"gs://{bucket}"
    files = []
    for idx, name in enumerate(LABELS):
        for k in range(4):
            buf = io.BytesIO()
            Image.new("RGB", (8, 8), COLORS[name]).save(buf, format="PNG")
            uri = f"{root}/data/{name}/{k}.png"
            gcs.write_bytes(uri, buf.getvalue())
            files.append((uri, idx))
    manifest = SplitManifest(labels=LABELS, seed=1, fractions={"val": 0.2, "test": 0.2},
                             files={"train": files, "val": files, "test": files})
    gcs.write_bytes(f"{root}/run/split.json", manifest.to_json())

    def save_model(name: str, weights: np.ndarray) -> str:
        inputs = keras.Input((8, 8, 3))
        x = keras.layers.GlobalAveragePooling2D()(inputs)
        out = keras.layers.Dense(3, activation="softmax")(x)
        model = keras.Model(inputs, out)
        model.layers[-1].set_weights([weights, np.zeros(3, dtype="float32")])
        local = tmp_path / f"{name}.keras"
        model.save(local)
        model_dir = f"{root}/models/{name}"
        gcs.upload_file(str(local), f"{model_dir}/model.keras")
        gcs.write_bytes(f"{model_dir}/labels.txt", labels_text(LABELS))
        return model_dir

    # Channel order R, G, B -> classes blue(0), green(1), red(2): reading the right channel is 100 %.
    right = np.zeros((3, 3), dtype="float32")
    right[2, 0] = right[1, 1] = right[0, 2] = 0.05
    wrong = right[:, [1, 2, 0]]
    return {"root": root, "right": save_model("right", right), "wrong": save_model("wrong", wrong)}


class _TI:
    def __init__(self):
        self.pushed = {}

    def xcom_push(self, key, value):
        self.pushed[key] = value


def _gate(run, challenger_accuracy: float, champion: str | None, gcs: GcsIO) -> tuple[ChampionGateOperator, dict]:
    challenger = f"{run['root']}/challenger"
    gcs.write_json(f"{challenger}/metrics.json", {"accuracy": challenger_accuracy, "macro_f1": challenger_accuracy,
                                                  "labels": LABELS})
    champion_uri = f"{run['root']}/champions/cloud.json"
    if champion:
        gcs.write_json(champion_uri, {"model_dir": run[champion], "run_id": "earlier"})
    op = ChampionGateOperator(task_id="champion_gate", model_dir=challenger, split_uri=f"{run['root']}/run/split.json",
                              champion_uri=champion_uri, tolerance=0.01, min_accuracy=0.3)
    return op, {"ti": _TI()}


def test_gate_first_run_promotes(run, gcs):
    op, ctx = _gate(run, 0.6, None, gcs)
    out = op.execute(ctx)
    assert out["promote"] is True and out["champion"] is None


def test_gate_keeps_a_better_champion_and_says_why(run, gcs):
    op, ctx = _gate(run, 0.6, "right", gcs)  # champion re-evaluated: 100 % on this test split
    with pytest.raises(AirflowSkipException, match="not promoted: challenger accuracy 0.600 < champion 1.000"):
        op.execute(ctx)
    pushed = ctx["ti"].pushed
    assert pushed["promote"] is False and pushed["champion"]["accuracy"] == 1.0
    assert pushed["return_value"]["reason"].startswith("challenger accuracy 0.600")


def test_gate_promotes_a_challenger_better_than_the_champion(run, gcs):
    op, ctx = _gate(run, 0.6, "wrong", gcs)  # champion scores 0 % on this split
    out = op.execute(ctx)
    assert out["promote"] is True and out["champion"]["accuracy"] == 0.0 and "beats" in out["reason"]


def test_not_promoted_target_is_reported_and_its_champion_kept():
    states = {"validate_dataset": "success", "stage_split": "success", "cloud.selected": "success",
              "cloud.train": "success", "cloud.champion_gate": "skipped", "cloud.register_model": "skipped",
              "cloud.deploy": "skipped"}
    xcoms = {t: None for t in states}
    xcoms["cloud.selected"] = True
    xcoms["cloud.champion_gate"] = {"promote": False, "reason": "challenger accuracy 0.6 < champion 0.9"}
    s = build_summary(dag_id="d", run_id="r", platform="local", targets={"cloud": "endpoint"}, states=states,
                      xcoms=xcoms, artifacts_uri="gs://b/r", metrics={"cloud": {"accuracy": 0.6, "macro_f1": 0.6}})
    assert s["status"] == "success"
    assert s["targets"]["cloud"]["status"] == "not_promoted"
    assert "champion 0.9" in s["targets"]["cloud"]["decision"]["reason"]
    assert "endpoint" not in s["targets"]["cloud"]


# ------------------------------------------------------------------ a changed class set is never delivered silently

def test_decide_blocks_a_class_change_without_opt_in_and_says_how():
    from dual_deploy.operators.gate import class_change

    change = class_change(["daisy", "roses", "tulips"], ["daisy", "roses", "sunflowers"])
    assert change["added"] == ["sunflowers"] and change["removed"] == ["tulips"]
    champion = {"class_change": change, "run_id": "r7"}
    ok, reason = decide({"accuracy": 0.99, "macro_f1": 0.99}, champion, tolerance=0.01, min_accuracy=0.5,
                        min_macro_f1=0)
    assert not ok
    assert "class set changed since the champion (run r7): added sunflowers; removed tulips" in reason
    assert "Param allow_class_change=true" in reason and "gate.allow_class_change: true" in reason
    ok, reason = decide({"accuracy": 0.99, "macro_f1": 0.99}, champion, tolerance=0.01, min_accuracy=0.5,
                        min_macro_f1=0, allow_class_change=True)
    assert ok and "added sunflowers; removed tulips" in reason and "allow_class_change is set" in reason
    # Minimums still apply to an opted-in change.
    assert not decide({"accuracy": 0.2, "macro_f1": 0.2}, champion, tolerance=0.01, min_accuracy=0.5,
                      min_macro_f1=0, allow_class_change=True)[0]
    assert class_change(["a", "b"], ["a", "b"]) is None


def _champion_with_other_classes(run, gcs: GcsIO) -> None:
    old = f"{run['root']}/models/old"
    gcs.write_bytes(f"{old}/labels.txt", labels_text(["blue", "green", "purple"]))
    gcs.write_json(f"{run['root']}/champions/cloud.json", {"model_dir": old, "run_id": "earlier"})


def test_gate_does_not_deliver_a_changed_class_set_without_opt_in(run, gcs):
    op, ctx = _gate(run, 0.9, None, gcs)
    _champion_with_other_classes(run, gcs)
    with pytest.raises(AirflowSkipException) as e:
        op.execute(ctx)
    msg = str(e.value)
    assert "class set changed since the champion (run earlier): added red; removed purple" in msg
    assert "allow_class_change" in msg
    pushed = ctx["ti"].pushed
    assert pushed["promote"] is False and pushed["allow_class_change"] is False
    assert pushed["class_change"] == {"added": ["red"], "removed": ["purple"],
                                      "champion_labels": ["blue", "green", "purple"], "labels": LABELS}


@pytest.mark.parametrize("how", ["param", "config"])
def test_gate_delivers_a_changed_class_set_with_opt_in(run, gcs, how):
    op, ctx = _gate(run, 0.9, None, gcs)
    _champion_with_other_classes(run, gcs)
    if how == "param":
        ctx["params"] = {"allow_class_change": True}
    else:
        op.allow_class_change = True
    out = op.execute(ctx)
    assert out["promote"] is True and out["allow_class_change"] is True
    assert out["class_change"]["added"] == ["red"] and "allow_class_change is set" in out["reason"]


def test_class_change_opt_in_is_a_config_key_and_a_run_param():
    from pathlib import Path

    from dual_deploy.config import GateConfig, load_config
    from dual_deploy.dag_helpers import run_params

    assert GateConfig().allow_class_change is False and GateConfig(allow_class_change=True).allow_class_change
    cfg = load_config(Path(__file__).resolve().parents[1] / "dags" / "config" / "dual_deploy.yaml", platform="local")
    param = run_params(cfg)["allow_class_change"]
    assert param.value is False and param.schema["type"] == "boolean"


# ------------------------------------------------------------------ cost arithmetic

PRICES = {"currency": "USD", "regions": {"r1": {
    "machines": {"m4": {"on_demand": 0.2, "spot": 0.05}},
    "accelerators": {"T4": {"on_demand": 0.4, "spot": 0.1}},
    "prediction_machines": {"m4": {"on_demand": 0.25}}}}}


def test_training_cost_is_hours_times_replicas_times_machine_plus_accelerators():
    c = training_cost(1800, region="r1", machine_type="m4", accelerator_type="T4", accelerator_count=2,
                      replica_count=3, spot=False, prices=PRICES)
    assert c["hourly_usd"] == pytest.approx(3 * (0.2 + 2 * 0.4))
    assert c["usd"] == pytest.approx(0.5 * 3 * 1.0)
    spot = training_cost(3600, region="r1", machine_type="m4", accelerator_type="T4", accelerator_count=1,
                         replica_count=1, spot=True, prices=PRICES)
    assert spot["usd"] == pytest.approx(0.15)


def test_serving_and_run_cost():
    s = serving_cost(region="r1", machine_type="m4", min_replica_count=2, prices=PRICES)
    assert s["hourly_usd"] == pytest.approx(0.5) and s["monthly_usd"] == pytest.approx(360.0)
    summary = {"platform": "gcp", "steps": {"cloud.train": {"duration_s": 3600}, "mobile.train": {"duration_s": 1800}}}
    inputs = {"cloud": {"training": dict(machine_type="m4", accelerator_type="T4", accelerator_count=1,
                                         replica_count=1, spot=False),
                        "endpoint": dict(machine_type="m4", min_replica_count=1)},
              "mobile": {"training": dict(machine_type="m4", accelerator_type=None, accelerator_count=0,
                                          replica_count=1, spot=False)}}
    out = run_cost(summary, inputs, region="r1", prices=PRICES)
    assert out["training_total_usd"] == pytest.approx(0.6 + 0.1)
    assert out["estimate_only"] is False and out["targets"]["cloud"]["serving"]["hourly_usd"] == 0.25


def test_unknown_machine_names_the_missing_price():
    with pytest.raises(PriceError, match="'a2-megagpu' in region 'r1'"):
        training_cost(60, region="r1", machine_type="a2-megagpu", accelerator_type=None, accelerator_count=0,
                      replica_count=1, spot=False, prices=PRICES)


def test_shipped_price_table_prices_the_default_config():
    from dual_deploy.config import load_config
    from dual_deploy.dag_helpers import cost_inputs

    cfg = load_config(platform="local")
    out = run_cost({"platform": "local", "steps": {f"{t.name}.train": {"duration_s": 600} for t in cfg.targets}},
                   cost_inputs(cfg), region=cfg.gcp.region, prices=load_prices())
    assert out["training_total_usd"] > 0 and out["estimate_only"] is True
    assert out["reference"]["custom_training_two_models_usd"] == 1.28


# ------------------------------------------------------------------ the report

def test_report_has_plots_tables_and_decisions(tmp_path):
    cm = [[3, 1], [0, 4]]
    summary = {
        "run_id": "manual__x", "platform": "local", "status": "success", "artifacts_uri": "gs://b/r",
        "split": {"labels": ["a", "b"], "counts": {"test": 8}, "fingerprint": "f"},
        "targets": {
            "cloud": {"kind": "endpoint", "status": "success", "failed_steps": [],
                      "metrics": {"accuracy": 0.875, "macro_f1": 0.87, "labels": ["a", "b"], "confusion_matrix": cm},
                      "endpoint": {"prediction_url": "http://127.0.0.1:8501/predict", "model_version_id": "3"},
                      "decision": {"promote": True, "reason": "challenger accuracy 0.875 beats champion 0.800"}},
            "mobile": {"kind": "mobile", "status": "not_promoted", "failed_steps": [],
                       "metrics": {"accuracy": 0.5, "macro_f1": 0.5, "labels": ["a", "b"], "confusion_matrix": cm},
                       "tflite": {"mode": "int8", "size_bytes": 1_700_000, "keras_accuracy": 0.5, "tflite_accuracy": 0.5,
                                  "accuracy_delta": 0.0, "top1_agreement": 1.0, "latency_ms_mean": 1.2,
                                  "latency_ms_p95": 1.5},
                       "decision": {"promote": False, "reason": "accuracy 0.500 below the minimum 0.600"}}},
        "steps": {"cloud.train": {"state": "success", "duration_s": 120.0}},
        "cost": {"currency": "USD", "estimate_only": True, "training_total_usd": 0.05, "reference": {},
                 "targets": {"cloud": {"training": {"machine_type": "n1-standard-4", "accelerator": "1 x T4",
                                                    "hours": 0.03, "usd": 0.05}}}},
    }
    history = {"loss": [1.0, 0.5], "val_loss": [1.1, 0.7], "accuracy": [0.5, 0.8], "val_accuracy": [0.4, 0.7]}
    out = write_report(summary, {"cloud": history, "mobile": history}, str(tmp_path))
    assert sorted(out["images"]) == ["cloud_confusion.png", "cloud_training.png", "mobile_confusion.png",
                                     "mobile_training.png"]
    for name in out["images"]:
        with Image.open(os.path.join(tmp_path, name)) as im:
            assert im.format == "PNG" and im.width > 200
    page = open(out["html"]).read()
    for needle in ("cloud_training.png", "mobile_confusion.png", "int8", "1.70", "100.0%",
                   "below the minimum 0.600", "beats champion", "http://127.0.0.1:8501/predict", "0.0500 USD"):
        assert needle in page, needle


def test_report_survives_class_names_matplotlib_would_read_as_tex(tmp_path):
    """Issue 15.10: class folders named like TeX crashed the report (and so the summary) in mathtext."""
    labels = [r"$\undefined$", "$x^2$", "50$ off", "a_b^c", r"back\slash"]
    cm = [[int(i == j) * 3 for j in range(5)] for i in range(5)]
    summary = {
        "run_id": "manual__tex", "platform": "local", "status": "success", "artifacts_uri": "gs://b/r",
        "split": {"labels": labels, "counts": {"test": 15}, "fingerprint": "f"},
        "targets": {"cloud": {"kind": "endpoint", "status": "success", "failed_steps": [],
                              "metrics": {"accuracy": 1.0, "macro_f1": 1.0, "labels": labels,
                                          "confusion_matrix": cm}}},
        "steps": {},
    }
    out = write_report(summary, {}, str(tmp_path))
    assert out["images"] == ["cloud_confusion.png"]
    with Image.open(tmp_path / "cloud_confusion.png") as im:
        assert im.format == "PNG"

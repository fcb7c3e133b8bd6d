"""What the AutoML stand-in exports, and how the pipeline's gates read it (include/dualml/automl).

Hand-built models with a known answer (solid red/green/blue images; a model that reads the dominant
channel is 100 % right), exported in Vertex's AutoML edge formats with their classes in *another*
order than the split's: the exported SavedModel as the reference of the TFLite gate and of the
champion gate, the exported full-integer .tflite validated against it, and the AutoML prediction
server answering Vertex's AutoML request format. The search itself: tests/test_automl_search.py.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException
from PIL import Image

from dual_deploy.hooks.gcs_io import GcsIO
from dualml.dataset import SplitManifest, labels_text

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["blue", "green", "red"]  # the split's (sorted) class order
MODEL_ORDER = ["red", "green", "blue"]  # the order the exported model scores them in
COLORS = {"blue": (10, 20, 230), "green": (15, 220, 30), "red": (235, 25, 10)}
ANON_CONN = json.dumps({"conn_type": "google_cloud_platform", "extra": {"is_anonymous": True, "project": "local-project"}})
SIZE = 8


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE), color).save(buf, format="PNG")
    return buf.getvalue()


def channel_model(order: list[str]):
    """Output k = probability of class ``order[k]``, from the dominant colour channel (R, G, B)."""
    import keras

    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    out = keras.layers.Dense(3, activation="softmax")(x)
    model = keras.Model(inputs, out)
    channel = {"red": 0, "green": 1, "blue": 2}
    w = np.zeros((3, 3), dtype="float32")
    for k, name in enumerate(order):
        w[channel[name], k] = 0.05
    model.layers[-1].set_weights([w, np.zeros(3, dtype="float32")])
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """The stand-in search's output folder for the channel model: saved_model/ (+ annotation specs), tflite/."""
    from dualml.automl.export import SPECS_FILE, export_saved_model, export_tflite

    out = tmp_path_factory.mktemp("automl-export")
    model = channel_model(MODEL_ORDER)
    export_saved_model(model, MODEL_ORDER, SIZE, str(out / "saved_model"))
    (out / "saved_model" / SPECS_FILE).write_text(json.dumps([{"id": str(100 + i), "displayName": n}
                                                               for i, n in enumerate(MODEL_ORDER)]))
    calibration = np.stack([np.full((SIZE, SIZE, 3), COLORS[n], dtype=np.float32) for n in MODEL_ORDER * 10])
    export_tflite(model, MODEL_ORDER, SIZE, calibration, str(out / "tflite"))
    return out


@pytest.fixture
def gcs(gcs_emulator, monkeypatch) -> GcsIO:
    monkeypatch.setenv("AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT", ANON_CONN)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator)
    return GcsIO()


@pytest.fixture
def run(gcs, exported) -> dict:
    """A bucket with the split (solid colours) and the exports where the export step puts them."""
    root = f"gs://automl-models-{uuid.uuid4().hex[:8]}"
    gcs.hook.get_conn().create_bucket(root[5:])
    files = []
    for idx, name in enumerate(LABELS):
        for k in range(4):
            uri = f"{root}/data/{name}/{k}.png"
            gcs.write_bytes(uri, _png(COLORS[name]))
            files.append((uri, idx))
    manifest = SplitManifest(labels=LABELS, seed=1, fractions={"val": 0.2, "test": 0.2},
                             files={"train": files, "val": files, "test": files})
    gcs.write_bytes(f"{root}/run/split.json", manifest.to_json())
    model_dir = f"{root}/run/automl_mobile/model"
    saved = f"{model_dir}/model-export-m-2026-11-23T10:00:00.000Z"
    for path in (exported / "saved_model").rglob("*"):
        if path.is_file() and path.name != "annotation_specs.json":
            gcs.upload_file(str(path), f"{saved}/{path.relative_to(exported / 'saved_model').as_posix()}")
    gcs.write_json(f"{model_dir}/metrics.json", {"accuracy": 1.0, "macro_f1": 1.0, "labels": LABELS})
    gcs.write_bytes(f"{model_dir}/labels.txt", labels_text(LABELS))
    tflite = f"{root}/run/automl_mobile/export/model-export-m-2026-11-23T10:00:01.000Z"
    for name in ("model.tflite", "dict.txt", "tflite_metadata.json"):
        gcs.upload_file(str(exported / "tflite" / name), f"{tflite}/{name}")
    return {"root": root, "model_dir": model_dir, "tflite": tflite, "split_uri": f"{root}/run/split.json"}


def test_exports_are_vertex_edge_formats(exported):
    import tensorflow as tf

    from dualml.tflite.validate import infer_mode

    loaded = tf.saved_model.load(str(exported / "saved_model"))
    fn = loaded.signatures["serving_default"]
    assert sorted(fn.structured_input_signature[1]) == ["image_bytes", "key"]
    out = fn(image_bytes=tf.constant([_png(COLORS["green"])]), key=tf.constant(["k1"]))
    assert [x.decode() for x in out["labels"].numpy()[0]] == MODEL_ORDER and out["key"].numpy()[0] == b"k1"
    assert MODEL_ORDER[int(out["scores"].numpy()[0].argmax())] == "green"
    assert (exported / "tflite" / "dict.txt").read_text().split() == MODEL_ORDER
    data = (exported / "tflite" / "model.tflite").read_bytes()
    assert infer_mode(data) == "int8"  # full integer, uint8 in and out
    assert json.loads((exported / "tflite" / "tflite_metadata.json").read_text())["inputShape"] == [1, SIZE, SIZE, 3]


def test_the_exported_savedmodel_scores_in_the_callers_class_order(exported):
    from dualml.automl.edge_model import EdgeSavedModel, evaluate

    model = EdgeSavedModel(str(exported / "saved_model"), LABELS)
    images = np.stack([np.full((SIZE, SIZE, 3), COLORS[n], dtype=np.float32) for n in LABELS])
    assert model.predict(images).argmax(axis=1).tolist() == [0, 1, 2]
    files = []
    for idx, name in enumerate(LABELS):
        path = exported / f"{name}.png"
        path.write_bytes(_png(COLORS[name]))
        files.append((str(path), idx))
    assert evaluate(str(exported / "saved_model"), files, LABELS)["accuracy"] == 1.0
    with pytest.raises(ValueError, match="scores classes"):
        EdgeSavedModel(str(exported / "saved_model"), ["blue", "green", "violet"])


def test_the_exported_tflite_passes_the_tflite_gate_in_its_own_label_order(run, gcs):
    from dual_deploy.operators.tflite import ConvertToTFLiteOperator

    op = ConvertToTFLiteOperator(task_id="convert_tflite", model_dir=run["model_dir"], split_uri=run["split_uri"],
                                 output_dir=f"{run['root']}/run/automl_mobile/tflite", min_agreement=1.0,
                                 max_accuracy_drop=0.0, exported_tflite_uri=f"{run['tflite']}/model.tflite",
                                 exported_labels_uri=f"{run['tflite']}/dict.txt")
    out = op.execute({"ti": None})
    assert out["source"] == "automl_export" and out["mode"] == "int8" and out["passed"] is True
    assert out["top1_agreement"] == 1.0 and out["tflite_accuracy"] == out["keras_accuracy"] == 1.0
    assert gcs.read_bytes(out["tflite_uri"]) == gcs.read_bytes(f"{run['tflite']}/model.tflite")
    report = gcs.read_json(out["report_uri"])
    assert report["per_class"]["red"]["tflite_accuracy"] == 1.0

    # Read in the split's order instead of its dict.txt's, the same .tflite scores every class wrong but one.
    gcs.write_bytes(f"{run['tflite']}/dict.txt", labels_text(LABELS))
    with pytest.raises(AirflowFailException, match="accuracy drop"):
        op.execute({"ti": None})


class _TI:
    def __init__(self):
        self.pushed = {}

    def xcom_push(self, key, value):
        self.pushed[key] = value


def _gate(run, gcs, challenger_accuracy: float, champion_dir: str):
    from dual_deploy.operators.gate import ChampionGateOperator

    challenger = f"{run['root']}/challenger"
    gcs.write_json(f"{challenger}/metrics.json", {"accuracy": challenger_accuracy, "macro_f1": challenger_accuracy,
                                                  "labels": LABELS})
    gcs.write_json(f"{run['root']}/champions/t.json", {"model_dir": champion_dir, "run_id": "earlier",
                                                       "accuracy": 0.7, "macro_f1": 0.7})
    op = ChampionGateOperator(task_id="champion_gate", model_dir=challenger, split_uri=run["split_uri"],
                              champion_uri=f"{run['root']}/champions/t.json", tolerance=0.01, min_accuracy=0.3)
    return op, {"ti": _TI()}


def test_gate_reevaluates_an_automl_edge_champion_from_its_exported_savedmodel(run, gcs):
    op, ctx = _gate(run, gcs, 0.9, run["model_dir"])
    with pytest.raises(AirflowSkipException):
        op.execute(ctx)
    champion = ctx["ti"].pushed["champion"]
    assert champion["accuracy"] == 1.0 and "re_evaluated" not in champion  # scored on this split, not 0.7


def test_gate_compares_an_unexportable_cloud_champion_by_its_recorded_accuracy(run, gcs):
    cloud_dir = f"{run['root']}/earlier/automl_cloud/model"
    gcs.write_json(f"{cloud_dir}/metrics.json", {"accuracy": 0.7, "macro_f1": 0.7, "labels": LABELS})
    gcs.write_bytes(f"{cloud_dir}/labels.txt", labels_text(LABELS))
    op, ctx = _gate(run, gcs, 0.9, cloud_dir)
    out = op.execute(ctx)
    assert out["promote"] is True and out["champion"]["re_evaluated"] is False
    assert "beats champion 0.700" in out["reason"] and "not re-evaluated" in out["reason"]


def test_the_automl_server_answers_automl_requests(exported):
    port = _free_port()
    env = {**os.environ, "AIP_HTTP_PORT": str(port), "AIP_PREDICT_ROUTE": "/predict", "AIP_HEALTH_ROUTE": "/health",
           "AIP_STORAGE_URI": str(exported / "saved_model"), "PYTHONPATH": str(ROOT / "include"),
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.Popen([sys.executable, "-m", "dualml.automl.serve"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.3)
        content = base64.b64encode(_png(COLORS["red"])).decode()
        answer = _post(f"{base}/predict", {"instances": [{"content": content}], "parameters": {"maxPredictions": 2}})
        [p] = answer["predictions"]
        assert p["displayNames"][0] == "red" and p["ids"][0] == "100" and len(p["confidences"]) == 2
        assert p["confidences"] == sorted(p["confidences"], reverse=True)
        none = _post(f"{base}/predict", {"instances": [{"content": content}], "parameters": {"confidenceThreshold": 1}})
        assert none["predictions"] == [{"ids": [], "displayNames": [], "confidences": []}]
        with pytest.raises(urllib.error.HTTPError) as bad:
            _post(f"{base}/predict", {"instances": [{"b64": content}]})
        assert bad.value.code == 400 and "content" in json.loads(bad.value.read())["error"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())

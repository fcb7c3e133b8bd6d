"""The AutoML stand-in's search (``python -m dualml.automl``) for real, on a tiny dataset: it stays within
its time limit, keeps the best candidate, evaluates it on the test items and exports it; a limit too
short to finish one epoch is an exhausted budget. Slow: trains tiny models (the search space is cut to
32 px MobileNetV3-Small candidates for the test).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")]

COLORS = {"red": (220, 30, 20), "green": (20, 200, 40), "blue": (30, 40, 220)}
SPECS = [{"id": "31", "displayName": "red"}, {"id": "12", "displayName": "green"}, {"id": "7", "displayName": "blue"}]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    """12 noisy solid-colour images per class: 8 training, 2 validation, 2 test."""
    root = tmp_path_factory.mktemp("automl-data")
    rng = np.random.default_rng(0)
    items = []
    for spec in SPECS:
        for k in range(12):
            pixels = np.clip(np.array(COLORS[spec["displayName"]]) + rng.normal(0, 25, (24, 24, 3)), 0, 255)
            path = root / f"{spec['displayName']}_{k}.png"
            Image.fromarray(pixels.astype("uint8")).save(path)
            use = "training" if k < 8 else "validation" if k < 10 else "test"
            items.append({"uri": str(path), "annotationSpecId": spec["id"], "mlUse": use})
    random.Random(1).shuffle(items)
    path = root / "data.json"
    path.write_text(json.dumps({"annotationSpecs": SPECS, "items": items}))
    return path


@pytest.fixture
def tiny_space(monkeypatch):
    from dualml.automl import space

    monkeypatch.setitem(space.SPACES, "MOBILE_TF_LOW_LATENCY_1", [("mobilenet_v3_small", (32,))])


def test_search_trains_within_its_limit_evaluates_and_exports(data_file, tiny_space, tmp_path):
    from dualml.automl.__main__ import main
    from dualml.automl.edge_model import EdgeSavedModel

    out = tmp_path / "out"
    limit = 60.0
    t0 = time.monotonic()
    code = main(["--data", str(data_file), "--model-type", "MOBILE_TF_LOW_LATENCY_1", "--time-limit-s", str(limit),
                 "--output-dir", str(out)])
    elapsed = time.monotonic() - t0
    assert code == 0
    result = json.loads((out / "result.json").read_text())
    search = json.loads((out / "search.json").read_text())
    assert result["state"] == "SUCCEEDED" and result["stopReason"] in ("BUDGET_REACHED", "MODEL_CONVERGED")
    # The search stops at the limit (one batch late at most); evaluation and export follow it.
    assert result["searchSeconds"] <= limit + 5 and elapsed < limit + 120
    assert {t["key"] for t in search["trials"]} <= {"mobilenet_v3_small@32px lr=0.001", "mobilenet_v3_small@32px lr=0.003"}
    finished = [t for t in search["trials"] if t["epochs"] > 0]
    assert search["best"]["val_accuracy"] == max(t["val_accuracy"] for t in finished)

    evaluation = json.loads((out / "evaluation.json").read_text())
    matrix = evaluation["metrics"]["confusionMatrix"]
    assert [s["id"] for s in matrix["annotationSpecs"]] == ["31", "12", "7"]
    assert int(np.array(matrix["rows"]).sum()) == evaluation["numExamples"] == 6
    assert evaluation["metrics"]["confidenceMetrics"][0]["confidenceThreshold"] == 0.0

    model = EdgeSavedModel(str(out / "saved_model"), ["blue", "green", "red"])
    scores = model.predict(np.stack([np.full((32, 32, 3), COLORS[c], dtype=np.float32) for c in ("blue", "red")]))
    assert scores.shape == (2, 3) and np.allclose(scores.sum(axis=1), 1.0, atol=1e-4)
    assert (out / "tflite" / "dict.txt").read_text().split() == ["red", "green", "blue"]
    assert (out / "tflite" / "model.tflite").read_bytes()[4:8] == b"TFL3"
    assert json.loads((out / "saved_model" / "annotation_specs.json").read_text()) == SPECS


def test_a_limit_too_short_for_one_epoch_is_an_exhausted_budget(data_file, tiny_space, tmp_path):
    from dualml.automl.__main__ import EXIT_BUDGET_EXHAUSTED, main

    out = tmp_path / "out"
    assert main(["--data", str(data_file), "--model-type", "MOBILE_TF_LOW_LATENCY_1", "--time-limit-s", "0.5",
                 "--output-dir", str(out)]) == EXIT_BUDGET_EXHAUSTED
    result = json.loads((out / "result.json").read_text())
    assert result["state"] == "FAILED" and result["code"] == "RESOURCE_EXHAUSTED"
    assert "exhausted before a model was trained" in result["message"]
    assert not (out / "saved_model").exists()


def test_unusable_input_is_refused_before_training(tmp_path):
    from dualml.automl.__main__ import EXIT_BAD_INPUT, main

    data = tmp_path / "data.json"
    data.write_text(json.dumps({"annotationSpecs": SPECS, "items": [
        {"uri": "/x.png", "annotationSpecId": "31", "mlUse": "training"}]}))
    assert main(["--data", str(data), "--model-type", "CLOUD", "--time-limit-s", "10", "--output-dir",
                 str(tmp_path / "out")]) == EXIT_BAD_INPUT
    assert "no validation / test items" in json.loads((tmp_path / "out" / "result.json").read_text())["message"]

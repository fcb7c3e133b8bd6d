"""TFLite conversion and validation on a tiny trained MobileNetV3Small (weights=None).

The model is trained once per module on synthetic solid-colour images so its outputs are
confident and non-trivial; each mode is converted once and shared between tests.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from dualml.tflite import (
    MODES,
    REPORT_FIELDS,
    TFLiteValidationError,
    Thresholds,
    check_thresholds,
    convert,
    convert_file,
    infer_mode,
    is_tflite_flatbuffer,
    representative_images_from_manifest,
    validate,
    validate_on_split,
)

# Keras 3.15 on numpy 2 warns from inside fit()/save(); not ours to fix, and it buries real warnings.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

SIZE = 32  # smallest input MobileNetV3 accepts
COLOURS = np.array([[220, 40, 40], [40, 200, 60], [50, 60, 220]], dtype=np.float32)


def make_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noisy solid-colour images in [0, 255], one colour per class, balanced labels."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(COLOURS)
    noise = rng.normal(0.0, 25.0, (n, SIZE, SIZE, 3))
    images = np.clip(COLOURS[labels][:, None, None, :] + noise, 0, 255).astype(np.float32)
    return images, labels


@pytest.fixture(scope="module")
def data():
    x_train, y_train = make_images(96, seed=1)
    x_test, y_test = make_images(30, seed=2)
    return x_train, y_train, x_test, y_test


@pytest.fixture(scope="module")
def model(data):
    import keras

    from dualml.trainer.models import build_classifier

    keras.utils.set_random_seed(0)
    x_train, y_train, x_test, y_test = data
    m, _ = build_classifier("mobilenet_v3_small", 3, SIZE, weights=None, dropout=0.0, bn_momentum=0.5)
    m.compile(
        optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    m.fit(x_train, y_train, batch_size=32, epochs=8, verbose=0)
    acc = m.evaluate(x_test, y_test, verbose=0)[1]
    assert acc > 0.9, f"tiny model did not learn the colours (test accuracy {acc})"
    return m


@pytest.fixture(scope="module")
def converted(model, data):
    """mode -> tflite bytes, converted on first use and shared across tests."""
    cache: dict[str, bytes] = {}
    x_train = data[0]

    def get(mode: str) -> bytes:
        if mode not in cache:
            reps = x_train if mode == "int8" else None
            cache[mode] = convert(model, mode, representative_images=reps, num_calibration=48)
        return cache[mode]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_convert_and_validate(mode, model, data, converted):
    from ai_edge_litert.interpreter import Interpreter

    _, _, x_test, y_test = data
    tfl = converted(mode)
    assert is_tflite_flatbuffer(tfl)
    interpreter = Interpreter(model_content=tfl)
    interpreter.allocate_tensors()
    in_d, out_d = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    expected_dtype = np.uint8 if mode == "int8" else np.float32
    assert in_d["dtype"] == expected_dtype and out_d["dtype"] == expected_dtype
    assert list(in_d["shape"][1:]) == [SIZE, SIZE, 3]
    assert infer_mode(tfl) == mode

    report = validate(
        tfl,
        model,
        x_test,
        y_test,
        thresholds=Thresholds(min_agreement=0.0, max_accuracy_drop=1.0),
        latency_runs=10,
        class_names=["red", "green", "blue"],
    )
    assert set(REPORT_FIELDS) <= set(report)
    json.dumps(report)  # the report is written as JSON
    assert report["mode"] == mode
    assert report["size_bytes"] == len(tfl)
    assert report["num_examples"] == len(x_test)
    assert report["passed"] is True and report["failures"] == []
    for key in ("keras_accuracy", "tflite_accuracy", "top1_agreement"):
        assert 0.0 <= report[key] <= 1.0, key
    assert report["accuracy_delta"] == pytest.approx(report["tflite_accuracy"] - report["keras_accuracy"])
    assert report["keras_accuracy"] > 0.9
    assert report["latency_ms_mean"] > 0 and report["latency_ms_p95"] > 0
    assert report["input_dtype"] == np.dtype(expected_dtype).name
    assert set(report["per_class"]) == {"red", "green", "blue"}
    assert sum(c["num_examples"] for c in report["per_class"].values()) == len(x_test)
    if mode == "float32":
        assert report["top1_agreement"] == 1.0
        assert abs(report["accuracy_delta"]) < 1e-9
        assert report["max_abs_probability_diff"] < 1e-3
    elif mode in ("dynamic", "float16"):
        assert report["top1_agreement"] >= 0.9
    print(
        f"\n{mode}: {report['size_bytes']} B, agreement {report['top1_agreement']:.3f}, "
        f"delta {report['accuracy_delta']:+.3f}, max|dp| {report['max_abs_probability_diff']:.4f}, "
        f"latency {report['latency_ms_mean']:.3f} ms mean / {report['latency_ms_p95']:.3f} p95"
    )


@pytest.mark.slow
def test_sizes_ordered(converted):
    sizes = {mode: len(converted(mode)) for mode in MODES}
    assert sizes["float16"] < sizes["float32"]
    assert sizes["dynamic"] < sizes["float16"]
    assert sizes["int8"] < sizes["float16"]


@pytest.mark.slow
def test_unmeetable_threshold_raises_naming_the_figure(model, data, converted):
    _, _, x_test, y_test = data
    tfl = converted("float32")
    with pytest.raises(TFLiteValidationError, match=r"size_bytes \d+ > max_size_bytes 10") as exc:
        validate(tfl, model, x_test, y_test, thresholds={"max_size_bytes": 10}, latency_runs=1)
    assert exc.value.report["passed"] is False
    assert exc.value.report["size_bytes"] == len(tfl)
    # Without raising, the same verdict is in the report.
    report = validate(
        tfl,
        model,
        x_test,
        y_test,
        thresholds=Thresholds(max_size_bytes=10),
        latency_runs=1,
        raise_on_failure=False,
    )
    assert report["passed"] is False and len(report["failures"]) == 1


def test_check_thresholds_messages():
    report = {
        "top1_agreement": 0.95,
        "keras_accuracy": 0.90,
        "tflite_accuracy": 0.87,
        "accuracy_delta": -0.03,
    }
    report["size_bytes"] = 2_000_000
    failures = check_thresholds(report, Thresholds(max_size_bytes=1_000_000))
    assert failures[0] == "top1_agreement 0.950 < min_agreement 0.990"
    assert failures[1].startswith("accuracy drop 0.030 > max_accuracy_drop 0.010")
    assert failures[2] == "size_bytes 2000000 > max_size_bytes 1000000"
    # Values that would print equal at 3 decimals get more digits.
    near = dict(report, top1_agreement=0.9899, tflite_accuracy=0.89, accuracy_delta=-0.01)
    assert check_thresholds(near, {"max_size_bytes": None}) == [
        "top1_agreement 0.9899 < min_agreement 0.9900"
    ]
    # A drop of exactly the limit passes despite float rounding (0.93 - 0.92 > 0.01 in floats).
    exact = dict(report, top1_agreement=1.0, keras_accuracy=0.93, tflite_accuracy=0.92)
    assert check_thresholds(exact, Thresholds()) == []


def test_threshold_config_errors():
    with pytest.raises(ValueError, match="min_agreement"):
        Thresholds(min_agreement=1.5)
    with pytest.raises(ValueError, match="max_accuracy_drop"):
        Thresholds(max_accuracy_drop=-0.1)
    with pytest.raises(ValueError, match="unknown threshold"):
        Thresholds.from_dict({"min_agreemnt": 0.9})


def test_int8_without_representative_images():
    # Checked before the model is even loaded: a misconfigured task fails in milliseconds.
    with pytest.raises(ValueError, match="representative_images"):
        convert("unused/model.keras", "int8")


def test_bad_mode():
    with pytest.raises(ValueError, match="float32, dynamic, float16, int8"):
        convert("unused/model.keras", "int4")


@pytest.mark.slow
def test_representative_images_wrong_shape(model):
    with pytest.raises(ValueError, match=r"representative image 0 has shape \(16, 16, 3\)"):
        convert(model, "int8", representative_images=np.zeros((4, 16, 16, 3), np.float32))


@pytest.mark.slow
def test_files_manifest_and_report(tmp_path, model, data, converted):
    """File-level path the Airflow operator uses: model.keras + split.json -> .tflite + report."""
    import keras
    from PIL import Image

    from dualml.dataset import SplitManifest

    x_train, y_train, x_test, y_test = data
    labels = ["red", "green", "blue"]
    files: dict[str, list[tuple[str, int]]] = {"train": [], "val": [], "test": []}
    for split, xs, ys in (("train", x_train[:12], y_train[:12]), ("test", x_test[:12], y_test[:12])):
        for i, (img, y) in enumerate(zip(xs, ys, strict=True)):
            path = tmp_path / "data" / labels[y] / f"{split}{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.round().astype(np.uint8)).save(path)
            files[split].append((str(path), int(y)))
    manifest = SplitManifest(labels=labels, seed=0, fractions={"val": 0.15, "test": 0.15}, files=files)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    keras.saving.save_model(model, model_dir / "model.keras")
    (model_dir / "split.json").write_text(manifest.to_json())

    reps = representative_images_from_manifest(str(model_dir / "split.json"), SIZE, num=5, seed=3)
    assert reps.shape == (5, SIZE, SIZE, 3) and reps.dtype == np.float32 and reps.max() > 1.0
    again = representative_images_from_manifest(manifest, SIZE, num=5, seed=3)
    np.testing.assert_array_equal(reps, again)

    out = tmp_path / "out" / "model_int8.tflite"
    # int8 calibrated on a seeded sample of the manifest's train split (12 files < num_calibration).
    result = convert_file(str(model_dir), str(out), "int8", manifest=str(model_dir / "split.json"))
    assert out.read_bytes()[4:8] == b"TFL3"
    assert result.size_bytes == out.stat().st_size and result.mode == "int8"
    assert result.num_calibration_images == 12

    report_uri = tmp_path / "out" / "report.json"
    report = validate_on_split(
        str(out),
        str(model_dir),
        str(model_dir / "split.json"),
        report_uri=str(report_uri),
        thresholds={"min_agreement": 0.8, "max_accuracy_drop": 0.2},
        latency_runs=3,
    )
    written = json.loads(report_uri.read_text())
    assert written == report
    assert report["split"] == "test" and report["num_examples"] == 12
    assert report["manifest_fingerprint"] == manifest.fingerprint()
    assert report["tflite_uri"] == str(out) and report["mode"] == "int8"
    assert set(report["per_class"]) == set(labels)

    with pytest.raises(TFLiteValidationError, match="max_size_bytes 10"):
        validate_on_split(
            str(out),
            model,
            manifest,
            report_uri=str(report_uri),
            thresholds={"max_size_bytes": 10},
            latency_runs=1,
        )
    assert json.loads(report_uri.read_text())["passed"] is False  # written before raising

"""Validate a TFLite model against the Keras model it came from, before it ships.

The TFLite model runs in the LiteRT interpreter (``ai_edge_litert``, the runtime that
replaces the deprecated ``tf.lite.Interpreter``) one image at a time, as on a phone; the
Keras model runs on the same preprocessed images. The report answers: does the phone model
predict what the cloud-validated model predicts (top-1 agreement), how much accuracy did
conversion cost, how big and how fast is it. ``Thresholds`` turns that into pass/fail.

Accuracy figures are fractions in [0, 1] (0.01 = one percentage point), never points.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from dualml import storage
from dualml.dataset import SplitManifest
from dualml.tflite.convert import MODES, is_tflite_flatbuffer, load_keras_model

log = logging.getLogger(__name__)

# Every report has these keys (validate_on_split adds split, manifest_fingerprint, tflite_uri).
REPORT_FIELDS = (
    "mode",
    "size_bytes",
    "num_examples",
    "keras_accuracy",
    "tflite_accuracy",
    "accuracy_delta",
    "top1_agreement",
    "max_abs_probability_diff",
    "latency_ms_mean",
    "latency_ms_p95",
    "latency_runs",
    "num_threads",
    "input_dtype",
    "output_dtype",
    "per_class",
    "thresholds",
    "passed",
    "failures",
)


@dataclass(frozen=True)
class Thresholds:
    """Pass/fail limits. Accuracy values are fractions (0.01 = one percentage point).

    - ``min_agreement``: minimum fraction of images where TFLite top-1 == Keras top-1. Agreement
      is the main gate: it measures conversion damage independently of how good the model is.
    - ``max_accuracy_drop``: keras_accuracy - tflite_accuracy may be at most this.
    - ``max_size_bytes``: optional cap on the .tflite size (app download / bundle budget).
    """

    min_agreement: float = 0.99
    max_accuracy_drop: float = 0.01
    max_size_bytes: int | None = None

    def __post_init__(self):
        if not 0.0 <= self.min_agreement <= 1.0:
            raise ValueError(f"min_agreement must be in [0, 1] (a fraction), got {self.min_agreement}")
        if not 0.0 <= self.max_accuracy_drop <= 1.0:
            raise ValueError(
                f"max_accuracy_drop must be in [0, 1] (a fraction: 0.01 = 1 point), got {self.max_accuracy_drop}"
            )
        if self.max_size_bytes is not None and self.max_size_bytes < 1:
            raise ValueError(f"max_size_bytes must be positive or None, got {self.max_size_bytes}")

    @classmethod
    def from_dict(cls, d: dict | Thresholds | None) -> Thresholds:
        """Build from a dict (e.g. an Airflow param); unknown keys are an error, not ignored."""
        if d is None:
            return cls()
        if isinstance(d, Thresholds):
            return d
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown threshold(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


class TFLiteValidationError(Exception):
    """The TFLite model missed a threshold. ``failures`` names each figure; ``report`` has all."""

    def __init__(self, failures: list[str], report: dict | None = None):
        self.failures = list(failures)
        self.report = report
        super().__init__("TFLite model failed validation: " + "; ".join(self.failures))


# Slack for float comparisons: 0.93 - 0.92 is 0.010000000000000009, which must not fail a
# 0.01 limit. Far below the resolution of any real test set.
_EPS = 1e-9


def _fmt_pair(value: float, limit: float) -> tuple[str, str]:
    """Format two numbers with 3 decimals, or more when 3 would make them look equal."""
    for digits in range(3, 8):
        a, b = f"{value:.{digits}f}", f"{limit:.{digits}f}"
        if a != b:
            return a, b
    return repr(value), repr(limit)


def check_thresholds(report: dict, thresholds: Thresholds | dict | None = None) -> list[str]:
    """Return one message per missed threshold (empty list = passed).

    ``thresholds`` defaults to the ones recorded in the report, else ``Thresholds()``.
    """
    if thresholds is None:
        thresholds = report.get("thresholds")
    t = Thresholds.from_dict(thresholds)
    failures = []
    agreement = report["top1_agreement"]
    if agreement < t.min_agreement - _EPS:
        a, b = _fmt_pair(agreement, t.min_agreement)
        failures.append(f"top1_agreement {a} < min_agreement {b}")
    drop = report["keras_accuracy"] - report["tflite_accuracy"]
    if drop > t.max_accuracy_drop + _EPS:
        a, b = _fmt_pair(drop, t.max_accuracy_drop)
        failures.append(
            f"accuracy drop {a} > max_accuracy_drop {b} (keras_accuracy {report['keras_accuracy']:.3f}, "
            f"tflite_accuracy {report['tflite_accuracy']:.3f}, accuracy_delta {report['accuracy_delta']:+.3f})"
        )
    if t.max_size_bytes is not None and report["size_bytes"] > t.max_size_bytes:
        failures.append(f"size_bytes {report['size_bytes']} > max_size_bytes {t.max_size_bytes}")
    return failures


def raise_for_failures(report: dict) -> None:
    """Raise TFLiteValidationError if the report recorded failures."""
    if report.get("failures"):
        raise TFLiteValidationError(report["failures"], report)


def _interpreter(data: bytes, num_threads: int | None):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=data, num_threads=num_threads)
    interpreter.allocate_tensors()
    return interpreter


def infer_mode(tflite: bytes | Any) -> str:
    """Guess the conversion mode from tensor types (bytes or a LiteRT Interpreter).

    Integer input -> int8; any float16 tensor -> float16; int8 weights with float input ->
    dynamic; otherwise float32. Lets a report name the mode of a file nobody labelled.
    """
    interpreter = _interpreter(tflite, 1) if isinstance(tflite, bytes | bytearray) else tflite
    if np.dtype(interpreter.get_input_details()[0]["dtype"]).kind in "iu":
        return "int8"
    dtypes = {np.dtype(d["dtype"]) for d in interpreter.get_tensor_details()}
    if np.dtype(np.float16) in dtypes:
        return "float16"
    if np.dtype(np.int8) in dtypes:
        return "dynamic"
    return "float32"


def _quantize(x: np.ndarray, detail: dict) -> np.ndarray:
    """Float input -> the tensor's dtype using its (scale, zero_point); floats pass through."""
    dtype = np.dtype(detail["dtype"])
    if dtype.kind == "f":
        return x.astype(dtype)
    scale, zero_point = detail["quantization"]
    if scale == 0:  # integer tensor without quantisation parameters: feed raw values
        q = np.round(x)
    else:
        q = np.round(x / scale + zero_point)
    info = np.iinfo(dtype)
    return np.clip(q, info.min, info.max).astype(dtype)


def _dequantize(y: np.ndarray, detail: dict) -> np.ndarray:
    if np.dtype(detail["dtype"]).kind == "f":
        return y.astype(np.float32)
    scale, zero_point = detail["quantization"]
    if scale == 0:
        return y.astype(np.float32)
    return (y.astype(np.float32) - zero_point) * scale


def _read_tflite(tflite) -> bytes:
    data = bytes(tflite) if isinstance(tflite, bytes | bytearray) else storage.read_bytes(str(tflite))
    if not is_tflite_flatbuffer(data):
        raise ValueError(f"not a TFLite flatbuffer ({len(data)} bytes, identifier {data[4:8]!r})")
    return data


def _keras_probabilities(keras_model, images: np.ndarray, batch_size: int) -> np.ndarray:
    """The Keras model's outputs in batches through one ``tf.function`` traced once for any batch
    size (``model.predict`` traces again for the last, partial batch)."""
    import tensorflow as tf

    if not callable(keras_model):  # a reference with only predict(), e.g. an exported SavedModel (dualml.automl)
        return np.asarray(keras_model.predict(images, batch_size=batch_size, verbose=0), dtype=np.float32)
    fn = tf.function(lambda x: keras_model(x, training=False), autograph=False,
                     input_signature=[tf.TensorSpec((None, *images.shape[1:]), tf.float32)])
    return np.concatenate([np.asarray(fn(images[i:i + batch_size]), dtype=np.float32)
                           for i in range(0, len(images), batch_size)])


def validate(
    tflite,
    keras_model,
    images,
    labels: Sequence[int],
    *,
    thresholds: Thresholds | dict | None = None,
    mode: str | None = None,
    num_threads: int | None = 1,
    latency_runs: int = 50,
    warmup_runs: int = 5,
    batch_size: int = 32,
    class_names: Sequence[str] | None = None,
    raise_on_failure: bool = True,
    output_labels: Sequence[str] | None = None,
) -> dict:
    """Compare a TFLite model (bytes, path or gs:// URI) with its Keras model; return a report.

    ``images``: float32 [N, s, s, 3] in [0, 255] from ``preprocess.load_image`` (held-out data);
    ``labels``: their class indices. The TFLite model is run one image at a time (batch 1,
    as on device), quantising input and dequantising output with the tensors' scale and
    zero point, so uint8/int8 models are compared on the same probability scale.

    Latency: ``latency_runs`` single-image ``invoke()`` calls after ``warmup_runs``, on
    ``num_threads`` threads (default 1: stable on shared CI and closer to a phone's budget
    than all host cores). It is the host's CPU time, a relative figure between modes, not a
    phone benchmark.

    ``accuracy_delta`` = tflite_accuracy - keras_accuracy as a fraction (negative = TFLite worse).
    With ``raise_on_failure`` a missed threshold raises TFLiteValidationError (carrying the
    report); otherwise ``passed``/``failures`` say so.

    ``keras_model`` may be any object with ``predict(images, batch_size=..., verbose=...)`` (e.g. an
    exported AutoML SavedModel, ``dualml.automl.edge_model``). ``output_labels``: the class of each
    TFLite output (a ``dict.txt``, when the model was not converted here): its scores are reordered
    to ``class_names``, the order of ``labels`` and of the reference model's scores.
    """
    t = Thresholds.from_dict(thresholds)
    if mode is not None and mode not in MODES:
        raise ValueError(f"unknown TFLite mode {mode!r}; choose one of {', '.join(MODES)}")
    if latency_runs < 1 or warmup_runs < 0:
        raise ValueError(f"latency_runs must be >= 1 and warmup_runs >= 0, got {latency_runs}, {warmup_runs}")
    images = np.asarray(images, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"images must be a non-empty float32 [N, s, s, 3] array, got shape {images.shape}")
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")

    data = _read_tflite(tflite)
    keras_model = load_keras_model(keras_model)
    interpreter = _interpreter(data, num_threads)
    inputs, outputs = interpreter.get_input_details(), interpreter.get_output_details()
    if len(inputs) != 1 or len(outputs) != 1:
        raise ValueError(
            f"expected a single-input single-output classifier, got {len(inputs)} in / {len(outputs)} out"
        )
    in_d, out_d = inputs[0], outputs[0]
    expected = tuple(int(d) for d in in_d["shape"][1:])
    if images.shape[1:] != expected:
        raise ValueError(f"images have shape {images.shape[1:]}; the TFLite model takes {expected}")
    if in_d["shape"][0] != 1:
        interpreter.resize_tensor_input(in_d["index"], [1, *expected])
        interpreter.allocate_tensors()

    tflite_probs = []
    for img in images:
        interpreter.set_tensor(in_d["index"], _quantize(img[np.newaxis], in_d))
        interpreter.invoke()
        tflite_probs.append(_dequantize(interpreter.get_tensor(out_d["index"]), out_d)[0])
    tflite_probs = np.stack(tflite_probs)
    if output_labels is not None:
        if class_names is None or sorted(output_labels) != sorted(class_names):
            raise ValueError(f"the TFLite model's labels {list(output_labels)} are not the classes {class_names}")
        tflite_probs = tflite_probs[:, [list(output_labels).index(c) for c in class_names]]
    keras_probs = _keras_probabilities(keras_model, images, batch_size)
    if keras_probs.shape != tflite_probs.shape:
        raise ValueError(f"Keras output {keras_probs.shape} and TFLite output {tflite_probs.shape} differ")

    # Latency: same input each run, so only invoke() is timed.
    interpreter.set_tensor(in_d["index"], _quantize(images[:1], in_d))
    for _ in range(warmup_runs):
        interpreter.invoke()
    times_ms = []
    for _ in range(latency_runs):
        start = time.perf_counter()
        interpreter.invoke()
        times_ms.append((time.perf_counter() - start) * 1000.0)

    keras_top1 = keras_probs.argmax(axis=1)
    tflite_top1 = tflite_probs.argmax(axis=1)
    keras_correct, tflite_correct = keras_top1 == labels, tflite_top1 == labels
    agree = keras_top1 == tflite_top1
    per_class = {}
    for c in np.unique(labels):
        m = labels == c
        name = class_names[int(c)] if class_names is not None else str(int(c))
        per_class[name] = {
            "num_examples": int(m.sum()),
            "keras_accuracy": float(keras_correct[m].mean()),
            "tflite_accuracy": float(tflite_correct[m].mean()),
            "top1_agreement": float(agree[m].mean()),
        }
    keras_acc, tflite_acc = float(keras_correct.mean()), float(tflite_correct.mean())
    report = {
        "mode": mode or infer_mode(interpreter),
        "size_bytes": len(data),
        "num_examples": int(len(images)),
        "keras_accuracy": keras_acc,
        "tflite_accuracy": tflite_acc,
        "accuracy_delta": tflite_acc - keras_acc,
        "top1_agreement": float(agree.mean()),
        "max_abs_probability_diff": float(np.abs(keras_probs - tflite_probs).max()),
        "latency_ms_mean": float(np.mean(times_ms)),
        "latency_ms_p95": float(np.percentile(times_ms, 95)),
        "latency_runs": latency_runs,
        "num_threads": num_threads,
        "input_dtype": np.dtype(in_d["dtype"]).name,
        "output_dtype": np.dtype(out_d["dtype"]).name,
        "per_class": per_class,
        "thresholds": t.to_dict(),
    }
    report["failures"] = check_thresholds(report, t)
    report["passed"] = not report["failures"]
    log.info(
        "TFLite %s: %d bytes, agreement %.4f, accuracy %.4f (Keras %.4f), %.2f ms mean, %s",
        report["mode"],
        report["size_bytes"],
        report["top1_agreement"],
        tflite_acc,
        keras_acc,
        report["latency_ms_mean"],
        "passed" if report["passed"] else "FAILED: " + "; ".join(report["failures"]),
    )
    if raise_on_failure:
        raise_for_failures(report)
    return report


def validate_on_split(
    tflite,
    keras_model,
    manifest: SplitManifest | str,
    *,
    split: str = "test",
    image_size: int | None = None,
    report_uri: str | None = None,
    max_examples: int | None = None,
    seed: int = 0,
    raise_on_failure: bool = True,
    **validate_kwargs,
) -> dict:
    """Validate on a split of the trainers' manifest (default test) and write the JSON report.

    Uses the same test split both trainers were evaluated on, loaded with
    ``preprocess.load_image``. ``max_examples`` takes a seeded sample (the manifest is sorted
    by path, i.e. by class, so a prefix would be one class). The report is written to
    ``report_uri`` (local or gs://) *before* raising, so a failed gate leaves its evidence.
    ``validate_kwargs`` go to :func:`validate` (thresholds, mode, num_threads, latency_runs...).
    """
    from dualml.preprocess import load_image

    if isinstance(manifest, str):
        manifest = SplitManifest.from_json(storage.read_text(manifest))
    files = list(manifest.files.get(split) or [])
    if not files:
        raise ValueError(f"split {split!r} of the manifest has no files to validate on")
    if max_examples is not None and max_examples < len(files):
        files = sorted(random.Random(seed).sample(files, max_examples))
    keras_model = load_keras_model(keras_model)
    if image_size is None:
        image_size = int(keras_model.inputs[0].shape[1])
    images = np.stack([load_image(uri, image_size) for uri, _ in files])
    labels = [idx for _, idx in files]
    report = validate(
        tflite,
        keras_model,
        images,
        labels,
        class_names=manifest.labels,
        raise_on_failure=False,
        **validate_kwargs,
    )
    report["split"] = split
    report["manifest_fingerprint"] = manifest.fingerprint()
    if not isinstance(tflite, bytes | bytearray):
        report["tflite_uri"] = str(tflite)
    if report_uri:
        storage.write_bytes(
            report_uri, json.dumps(report, indent=2).encode(), content_type="application/json"
        )
        log.info("wrote TFLite validation report to %s", report_uri)
    if raise_on_failure:
        raise_for_failures(report)
    return report

"""Convert the mobile model to TFLite and gate it on validation thresholds."""

from __future__ import annotations

import os
import random
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from airflow.sdk.exceptions import AirflowFailException

from dual_deploy.hooks.gcs_io import GcsIO
from dual_deploy.operators.base import DictOutputOperator
from dualml.dataset import SplitManifest


def localize_manifest(io: GcsIO, manifest: SplitManifest, folder: str, splits: dict[str, int | None],
                      seed: int = 0) -> SplitManifest:
    """Copy (a seeded sample of) the named splits to ``folder``; return a manifest of local paths."""
    files: dict[str, list[tuple[str, int]]] = {s: [] for s in manifest.files}
    todo: list[tuple[str, str]] = []
    for split, limit in splits.items():
        chosen = list(manifest.files[split])
        if limit is not None and limit < len(chosen):
            chosen = sorted(random.Random(seed).sample(chosen, limit))
        for k, (uri, label) in enumerate(chosen):
            local = os.path.join(folder, split, f"{k:06d}_{os.path.basename(uri)}")
            todo.append((uri, local))
            files[split].append((local, label))
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda pair: io.download(*pair), todo))
    return SplitManifest(labels=manifest.labels, seed=manifest.seed, fractions=manifest.fractions, files=files,
                         data_root=manifest.data_root)


class ConvertToTFLiteOperator(DictOutputOperator):
    """Convert ``<model_dir>/model.keras`` to ``<output_dir>/model.tflite`` and validate it.

    Validation runs the .tflite in the LiteRT interpreter beside the Keras model on the
    run's held-out test split; if top-1 agreement, accuracy drop or size misses its
    threshold the task fails, naming the figure, and nothing downstream is published.
    int8 calibrates on a seeded sample of the training split.

    XCom: ``{"tflite_uri", "report_uri", "mode", "size_bytes", "sha256", "top1_agreement",
    "keras_accuracy", "tflite_accuracy", "accuracy_delta", "latency_ms_mean", "latency_ms_p95",
    "passed", "duration_s"}``.
    """

    template_fields: Sequence[str] = ("model_dir", "split_uri", "output_dir", "mode")
    ui_color = "#d7f5dd"

    def __init__(self, *, model_dir: str, split_uri: str, output_dir: str, mode: str = "dynamic",
                 min_agreement: float = 0.99, max_accuracy_drop: float = 0.01, max_size_mb: float | None = None,
                 num_calibration_images: int = 100, max_validation_examples: int | None = None,
                 gcp_conn_id: str = "google_cloud_default", **kwargs):
        super().__init__(**kwargs)
        self.model_dir = model_dir
        self.split_uri = split_uri
        self.output_dir = output_dir
        self.mode = mode
        self.thresholds = {
            "min_agreement": min_agreement,
            "max_accuracy_drop": max_accuracy_drop,
            "max_size_bytes": int(max_size_mb * 1e6) if max_size_mb else None,
        }
        self.num_calibration_images = num_calibration_images
        self.max_validation_examples = max_validation_examples
        self.gcp_conn_id = gcp_conn_id

    def execute(self, context) -> dict:
        from dualml.tflite import MODES, Thresholds, convert_file, validate_on_split

        t0 = time.monotonic()
        if self.mode not in MODES:
            raise AirflowFailException(f"TFLite mode {self.mode!r} is not one of {', '.join(MODES)}")
        thresholds = Thresholds.from_dict(self.thresholds)
        io = GcsIO(self.gcp_conn_id)
        out = self.output_dir.rstrip("/")
        with tempfile.TemporaryDirectory() as tmp:
            model_path = io.download(f"{self.model_dir.rstrip('/')}/model.keras", os.path.join(tmp, "model.keras"))
            manifest = SplitManifest.from_json(io.read_bytes(self.split_uri).decode())
            wanted = {"test": self.max_validation_examples}
            if self.mode == "int8":
                wanted["train"] = self.num_calibration_images
            local = localize_manifest(io, manifest, os.path.join(tmp, "data"), wanted)
            tflite_path = os.path.join(tmp, "model.tflite")
            result = convert_file(model_path, tflite_path, self.mode, manifest=local,
                                  num_calibration=self.num_calibration_images)
            report_path = os.path.join(tmp, "validation.json")
            report = validate_on_split(tflite_path, model_path, local, report_uri=report_path, mode=self.mode,
                                       thresholds=thresholds, raise_on_failure=False)
            # The report is kept either way: a failed gate leaves its evidence with the run.
            report_uri = io.upload_file(report_path, f"{out}/validation.json", "application/json")
            tflite_uri = io.upload_file(tflite_path, f"{out}/model.tflite")
        if not report["passed"]:
            raise AirflowFailException(
                f"TFLite ({self.mode}) failed validation, not publishing: {'; '.join(report['failures'])}. "
                f"Report: {report_uri}"
            )
        self.log.info("TFLite %s: %d bytes, agreement %.4f, accuracy %.4f (keras %.4f), p95 %.2f ms",
                      self.mode, report["size_bytes"], report["top1_agreement"], report["tflite_accuracy"],
                      report["keras_accuracy"], report["latency_ms_p95"])
        keys = ("size_bytes", "top1_agreement", "keras_accuracy", "tflite_accuracy", "accuracy_delta",
                "latency_ms_mean", "latency_ms_p95", "passed", "num_examples")
        return {
            "tflite_uri": tflite_uri,
            "report_uri": report_uri,
            "mode": self.mode,
            "sha256": result.sha256,
            **{k: report.get(k) for k in keys},
            "duration_s": round(time.monotonic() - t0, 2),
        }

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

REPORT_KEYS = ("size_bytes", "top1_agreement", "keras_accuracy", "tflite_accuracy", "accuracy_delta",
               "latency_ms_mean", "latency_ms_p95", "passed", "num_examples")


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

    An AutoML mobile model arrives already converted (Vertex AI exports it): with
    ``exported_tflite_uri`` (and its ``dict.txt``, ``exported_labels_uri``) that .tflite is validated
    as it is, against the exported SavedModel under ``model_dir`` (``dualml.automl.edge_model``) in
    place of the Keras model, with the same thresholds; ``mode`` is then what its tensors show.

    XCom: ``{"tflite_uri", "report_uri", "mode", "size_bytes", "sha256", "top1_agreement",
    "keras_accuracy", "tflite_accuracy", "accuracy_delta", "latency_ms_mean", "latency_ms_p95",
    "passed", "duration_s"}`` (+ ``"source": "automl_export"`` for an exported model).
    """

    template_fields: Sequence[str] = ("model_dir", "split_uri", "output_dir", "mode", "exported_tflite_uri",
                                      "exported_labels_uri")
    ui_color = "#d7f5dd"

    def __init__(self, *, model_dir: str, split_uri: str, output_dir: str, mode: str = "dynamic",
                 min_agreement: float = 0.99, max_accuracy_drop: float = 0.01, max_size_mb: float | None = None,
                 num_calibration_images: int = 100, max_validation_examples: int | None = None,
                 gcp_conn_id: str = "google_cloud_default", exported_tflite_uri: str | None = None,
                 exported_labels_uri: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.exported_tflite_uri = exported_tflite_uri
        self.exported_labels_uri = exported_labels_uri
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
        from dualml.quiet_tf import import_tensorflow
        from dualml.tflite import MODES, Thresholds, convert_file, validate_on_split

        import_tensorflow()  # without the CUDA-probe errors a worker with no GPU prints

        t0 = time.monotonic()
        if self.exported_tflite_uri:
            return self._validate_export(t0)
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
        return {
            "tflite_uri": tflite_uri,
            "report_uri": report_uri,
            "mode": self.mode,
            "sha256": result.sha256,
            **{k: report.get(k) for k in REPORT_KEYS},
            "duration_s": round(time.monotonic() - t0, 2),
        }

    def _validate_export(self, t0: float) -> dict:
        """Validate an exported (AutoML) .tflite against the exported SavedModel under ``model_dir``."""
        import hashlib

        from ai_edge_litert.interpreter import Interpreter

        from dualml.automl.edge_model import EdgeSavedModel
        from dualml.dataset import parse_labels
        from dualml.tflite import Thresholds, validate_on_split

        io = GcsIO(self.gcp_conn_id)
        out = self.output_dir.rstrip("/")
        model_dir = self.model_dir.rstrip("/")
        roots = sorted({f.rpartition("/")[0] for f in io.list_files(model_dir) if f.endswith("/saved_model.pb")})
        if len(roots) != 1:
            raise AirflowFailException(f"expected the exported SavedModel (one saved_model.pb) under {model_dir}, found "
                                       f"{roots or 'none'}: it is the reference the .tflite is validated against")
        with tempfile.TemporaryDirectory() as tmp:
            tflite_path = io.download(self.exported_tflite_uri, os.path.join(tmp, "model.tflite"))
            output_labels = parse_labels(io.read_bytes(self.exported_labels_uri).decode())
            io.download_dir(roots[0], os.path.join(tmp, "saved_model"))
            manifest = SplitManifest.from_json(io.read_bytes(self.split_uri).decode())
            local = localize_manifest(io, manifest, os.path.join(tmp, "data"), {"test": self.max_validation_examples})
            interpreter = Interpreter(model_path=tflite_path)
            image_size = int(interpreter.get_input_details()[0]["shape"][1])
            reference = EdgeSavedModel(os.path.join(tmp, "saved_model"), manifest.labels)
            report_path = os.path.join(tmp, "validation.json")
            report = validate_on_split(tflite_path, reference, local, image_size=image_size, report_uri=report_path,
                                       thresholds=Thresholds.from_dict(self.thresholds), raise_on_failure=False,
                                       output_labels=output_labels)
            report_uri = io.upload_file(report_path, f"{out}/validation.json", "application/json")
            tflite_uri = io.upload_file(tflite_path, f"{out}/model.tflite")
            sha256 = hashlib.sha256(open(tflite_path, "rb").read()).hexdigest()
        if not report["passed"]:
            raise AirflowFailException(
                f"exported TFLite ({report['mode']}) failed validation against the exported SavedModel, not "
                f"publishing: {'; '.join(report['failures'])}. Report: {report_uri}")
        self.log.info("exported TFLite %s: %d bytes, agreement %.4f with the SavedModel, accuracy %.4f (SavedModel "
                      "%.4f), p95 %.2f ms", report["mode"], report["size_bytes"], report["top1_agreement"],
                      report["tflite_accuracy"], report["keras_accuracy"], report["latency_ms_p95"])
        return {"tflite_uri": tflite_uri, "report_uri": report_uri, "mode": report["mode"], "sha256": sha256,
                "source": "automl_export", "exported_tflite_uri": self.exported_tflite_uri,
                **{k: report.get(k) for k in REPORT_KEYS}, "duration_s": round(time.monotonic() - t0, 2)}

"""The Vertex AI AutoML steps of a target with ``training.method: automl``, on the Google provider's
operators (subclassed only for what a production run needs: idempotent retries, failures that do
not spend the budget again, and the XCom contract of custom training).

- AutoMLImportFileOperator (``import_file``): the run's staged split as Vertex's image classification
  import file, ``ml_use,gs://...,label`` per image: AutoML trains, validates and tests on exactly the
  images the custom models use.
- VertexCreateDatasetOperator (``create_dataset``): CreateDatasetOperator, get-or-create by labels.
- VertexImportDataOperator (``import_data``): ImportDataOperator with templated import configs.
- VertexAutoMLImageTrainingOperator (``train``): CreateAutoMLImageTrainingJobOperator with the split's
  ``ml_use`` filters, re-attaching to the run's pipeline on a retry; writes ``metrics.json`` /
  ``labels.txt`` from the model's evaluation, so the champion gate, summary and report read an AutoML
  model like a custom one.
- VertexExportModelOperator (``export_model``, mobile): ExportModelOperator for ``tf-saved-model``
  and ``tflite``, returning where Vertex wrote them.
- AutoMLModelVersionOperator (``register_model``, endpoint): the version the pipeline registered
  (AutoML uploads its model itself), as RegisterModelVersionOperator reports one.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from airflow.providers.google.cloud.hooks.vertex_ai.auto_ml import AutoMLHook
from airflow.providers.google.cloud.hooks.vertex_ai.dataset import DatasetHook
from airflow.providers.google.cloud.hooks.vertex_ai.model_service import ModelServiceHook
from airflow.providers.google.cloud.links.vertex_ai import VertexAIModelExportLink, VertexAITrainingLink
from airflow.providers.google.cloud.operators.vertex_ai.auto_ml import CreateAutoMLImageTrainingJobOperator
from airflow.providers.google.cloud.operators.vertex_ai.dataset import (
    CreateDatasetOperator,
    ImportDataOperator,
)
from airflow.providers.google.cloud.operators.vertex_ai.model_service import ExportModelOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException
from google.api_core import exceptions as gexc
from google.protobuf import json_format

from dual_deploy.hooks.gcs_io import GcsIO
from dual_deploy.operators.base import DictOutputOperator
from dualml.dataset import SplitManifest, labels_text

IMAGE_DATASET_SCHEMA = "gs://google-cloud-aiplatform/schema/dataset/metadata/image_1.0.0.yaml"
SINGLE_LABEL_IMPORT_SCHEMA = ("gs://google-cloud-aiplatform/schema/dataset/ioformat/"
                              "image_classification_single_label_io_format_1.0.0.yaml")
ML_USE = {"train": "training", "val": "validation", "test": "test"}  # split.json name -> Vertex ML_USE
ML_USE_FILTER = "labels.aiplatform.googleapis.com/ml_use={}"
LIVE_PIPELINE_STATES = ("PIPELINE_STATE_QUEUED", "PIPELINE_STATE_PENDING", "PIPELINE_STATE_RUNNING",
                        "PIPELINE_STATE_SUCCEEDED")
TERMINAL_PIPELINE_STATES = ("PIPELINE_STATE_SUCCEEDED", "PIPELINE_STATE_FAILED", "PIPELINE_STATE_CANCELLED")
# Errors of a request that cannot succeed by repeating it (bad budget, missing dataset, no permission).
PERMANENT = (gexc.InvalidArgument, gexc.FailedPrecondition, gexc.NotFound, gexc.PermissionDenied,
             gexc.MethodNotImplemented, gexc.AlreadyExists)


def _resource_id(name: str) -> str:
    return str(name).rstrip("/").rpartition("/")[-1].split("@")[0]


def labels_filter(labels: dict[str, str]) -> str:
    return " AND ".join(f'labels.{k}="{v}"' for k, v in sorted(labels.items()))


def _require_labels(labels: dict | None, what: str) -> dict:
    labels = dict(labels or {})
    missing = [k for k in ("app", "run", "target") if not labels.get(k)]
    if missing:
        raise AirflowFailException(f"{what} labels lack {missing}: they identify this run's resource so a retry "
                                   "can find it instead of creating (and paying for) another")
    return labels


# ============================================================================ data


def import_file_lines(manifest: SplitManifest) -> list[str]:
    """``ml_use,gs://...,label`` for every image of the split (Vertex's single-label CSV import format)."""
    lines = []
    for split, use in ML_USE.items():
        for uri, index in manifest.files.get(split, []):
            if "," in uri or "\n" in uri:
                raise AirflowFailException(f"{uri}: a comma or line break in an image path cannot be written to "
                                           "Vertex AI's CSV import file; rename the file")
            lines.append(f"{use},{uri},{manifest.labels[index]}")
    return lines


class AutoMLImportFileOperator(DictOutputOperator):
    """Write the split as Vertex AI's import file. XCom: ``{"import_file_uri", "counts", "duration_s"}``."""

    template_fields: Sequence[str] = ("split_uri", "import_file_uri")

    def __init__(self, *, split_uri: str, import_file_uri: str, gcp_conn_id: str = "google_cloud_default", **kwargs):
        super().__init__(**kwargs)
        self.split_uri = split_uri
        self.import_file_uri = import_file_uri
        self.gcp_conn_id = gcp_conn_id

    def execute(self, context) -> dict:
        t0 = time.monotonic()
        io = GcsIO(self.gcp_conn_id)
        manifest = SplitManifest.from_json(io.read_bytes(self.split_uri).decode())
        lines = import_file_lines(manifest)
        io.write_bytes(self.import_file_uri, ("\n".join(lines) + "\n").encode(), "text/csv")
        counts = {ML_USE[s]: len(manifest.files.get(s, [])) for s in ML_USE}
        self.log.info("wrote %d rows to %s: %s", len(lines), self.import_file_uri, counts)
        return {"import_file_uri": self.import_file_uri, "counts": counts, "duration_s": round(time.monotonic() - t0, 2)}


class VertexCreateDatasetOperator(CreateDatasetOperator):
    """CreateDatasetOperator that reuses the dataset an earlier attempt of this run created (found by
    its labels ``app``/``run``/``target``). XCom: ``{"dataset_id", "name", "display_name", "reused"}``."""

    template_fields: Sequence[str] = (*CreateDatasetOperator.template_fields, "dataset")

    def __init__(self, **kwargs):
        kwargs.setdefault("multiple_outputs", True)
        super().__init__(**kwargs)

    def execute(self, context) -> dict:
        labels = _require_labels(self.dataset.get("labels"), "dataset")
        hook = DatasetHook(gcp_conn_id=self.gcp_conn_id, impersonation_chain=self.impersonation_chain)
        found = list(hook.list_datasets(project_id=self.project_id, region=self.region, filter=labels_filter(labels)))
        if found:
            dataset = min(found, key=lambda d: d.create_time)
            dataset_id = _resource_id(dataset.name)
            self.log.info("reusing dataset %s created by an earlier attempt of this run", dataset.name)
            context["ti"].xcom_push(key="dataset_id", value=dataset_id)
            return {"dataset_id": dataset_id, "name": dataset.name, "display_name": dataset.display_name,
                    "reused": True}
        created = super().execute(context)
        return {"dataset_id": _resource_id(created["name"]), "name": created["name"],
                "display_name": created.get("display_name"), "reused": False}


class VertexImportDataOperator(ImportDataOperator):
    """ImportDataOperator whose ``import_configs`` are templated (the import file is per run). Importing
    the same file again is harmless: Vertex keeps one data item per image."""

    template_fields: Sequence[str] = (*ImportDataOperator.template_fields, "import_configs")


# ============================================================================ training


def metrics_from_evaluation(evaluation: dict, labels: list[str]) -> dict:
    """``metrics.json`` (the trainer's format, classes in ``labels`` order) from an AutoML classification
    ModelEvaluation's metrics: the confusion matrix of its test items, re-ordered by class name."""
    import numpy as np

    from dualml.trainer.evaluate import classification_metrics

    cm = evaluation.get("confusionMatrix") or {}
    names = [s.get("displayName") for s in cm.get("annotationSpecs") or []]
    rows = np.array(cm.get("rows") or [], dtype=float).astype(int)
    if sorted(names) != sorted(labels) or rows.shape != (len(labels), len(labels)):
        raise AirflowFailException(f"the model's evaluation covers classes {names}, not the split's {labels}")
    order = [names.index(label) for label in labels]
    rows = rows[np.ix_(order, order)]
    y_true = np.repeat(np.repeat(np.arange(len(labels)), len(labels)), rows.ravel())
    y_pred = np.repeat(np.tile(np.arange(len(labels)), len(labels)), rows.ravel())
    out = classification_metrics(y_true, y_pred, labels)
    out.update(auPrc=evaluation.get("auPrc"), logLoss=evaluation.get("logLoss"), source="vertex_ai_model_evaluation")
    return out


def _seconds_between(start, end) -> float | None:
    try:
        a, b = (datetime.fromisoformat(str(x).replace("Z", "+00:00")) for x in (start, end))
    except (TypeError, ValueError):
        return None
    return round((b - a).total_seconds(), 2)


class VertexAutoMLImageTrainingOperator(CreateAutoMLImageTrainingJobOperator):
    """The provider's CreateAutoMLImageTrainingJobOperator, idempotent per run and target, failing for good
    when the training does.

    ``labels`` must identify the run and target (``app``, ``run``, ``target``): before starting a training
    pipeline the pipelines with those labels are listed, and one that is queued, running or succeeded
    (an earlier attempt's) is re-attached to, never started twice. A pipeline that FAILED (training
    failed, or the budget was exhausted before a model was trained) or was CANCELLED fails the task
    without retries (another pipeline would spend the budget again; fix the cause, then clear the task);
    a polling error retries and re-attaches. The model becomes a version of the model named
    ``model_display_name`` (found by name; the first run creates it) with the run's alias; ``default``
    moves when the deploy step promotes it.

    The provider's hook passes its connection's credentials to the training job but not to the SDK objects
    it makes around it (the dataset, the trained model), which then look for Application Default
    Credentials; the SDK is initialised with the connection's project, region and credentials first.

    XCom (the custom-training contract, plus AutoML's figures): ``{"model_dir", "base_output_dir", "metrics",
    "duration_s", "method": "automl", "model_type", "budget_milli_node_hours", "cost_milli_node_hours",
    "stop_reason", "training_pipeline_name", "training_pipeline_id", "model", "model_version" (<id>@<version>),
    "model_id", "model_version_id",
    "dataset_id", "reattached"}``; ``model_dir`` holds ``metrics.json`` and ``labels.txt``.
    """

    template_fields: Sequence[str] = (
        *CreateAutoMLImageTrainingJobOperator.template_fields, "project_id", "display_name", "labels",
        "model_display_name", "model_version_aliases", "model_version_description", "model_dir", "split_uri",
        "base_output_dir",
    )
    ui_color = "#fce8b2"

    def __init__(self, *, model_dir: str, split_uri: str, base_output_dir: str, poll_interval_s: float = 60,
                 **kwargs):
        kwargs.setdefault("multiple_outputs", True)
        kwargs.setdefault("is_default_version", False)
        for which, use in (("training", "training"), ("validation", "validation"), ("test", "test")):
            kwargs.setdefault(f"{which}_filter_split", ML_USE_FILTER.format(use))
        super().__init__(**kwargs)
        self.model_dir = model_dir
        self.split_uri = split_uri
        self.base_output_dir = base_output_dir
        self.poll_interval_s = poll_interval_s

    def _init_sdk(self, hook: AutoMLHook) -> None:
        from google.cloud import aiplatform

        aiplatform.init(project=self.project_id, location=self.region, credentials=hook.get_credentials())

    def find_existing(self, hook: AutoMLHook) -> Any | None:
        """The newest training pipeline of this run and target that is live or succeeded, if any."""
        found = list(hook.list_training_pipelines(project_id=self.project_id, region=self.region,
                                                  filter=labels_filter(_require_labels(self.labels, "training"))))
        live = [p for p in found if p.state.name in LIVE_PIPELINE_STATES]
        if not live and found:
            self.log.info("earlier training pipelines of this run ended %s: starting a new one",
                          sorted({p.state.name for p in found}))
        return max(live, key=lambda p: p.create_time) if live else None

    def find_parent_model(self) -> str | None:
        hook = ModelServiceHook(gcp_conn_id=self.gcp_conn_id, impersonation_chain=self.impersonation_chain)
        models = list(hook.list_models(project_id=self.project_id, region=self.region,
                                       filter=f'display_name="{self.model_display_name}"', order_by="create_time"))
        return models[0].name if models else None

    def execute(self, context) -> dict:
        hook = AutoMLHook(gcp_conn_id=self.gcp_conn_id, impersonation_chain=self.impersonation_chain)
        self._init_sdk(hook)
        try:
            existing = self.find_existing(hook)
            if existing is None:
                self.parent_model = self.parent_model or self.find_parent_model()
                self.log.info("training %s (budget %s milli node hours) as %s", self.model_type,
                              self.budget_milli_node_hours, f"a new version of {self.parent_model}"
                              if self.parent_model else f"new model {self.model_display_name!r}")
                try:
                    super().execute(context)  # creates the pipeline and blocks until it ends
                    failure = None
                except RuntimeError as e:  # the SDK's "Training failed with: ..." (FAILED or CANCELLED)
                    failure = str(e)
                job = getattr(self.hook, "_job", None)
                name = getattr(job, "_gca_resource", None) and job.resource_name
                if not name:  # the SDK failed before the pipeline existed
                    raise self._failed(None, failure or "the training pipeline was not created")
                pipeline, reattached = self._get(hook, _resource_id(name)), False
                if failure and pipeline.state.name != "PIPELINE_STATE_SUCCEEDED":
                    raise self._failed(pipeline, failure)
            else:
                pipeline_id = _resource_id(existing.name)
                self.log.info("re-attaching to training pipeline %s (%s) started by an earlier attempt of this run",
                              existing.name, existing.state.name)
                context["ti"].xcom_push(key="training_id", value=pipeline_id)
                VertexAITrainingLink.persist(context=context, training_id=pipeline_id)
                pipeline, reattached = self._wait(hook, pipeline_id), True
        except PERMANENT as e:
            raise AirflowFailException(f"Vertex AI refused the AutoML training for {self.base_output_dir}: {e} "
                                       "(not retried: the request itself is wrong)") from None
        except (gexc.GoogleAPICallError, gexc.RetryError) as e:
            raise AirflowException(f"{type(e).__name__}: {e} (the task retries and re-attaches to this run's "
                                   "training pipeline)") from e
        if pipeline.state.name != "PIPELINE_STATE_SUCCEEDED":
            raise self._failed(pipeline)
        return self._result(pipeline, reattached)

    def _get(self, hook: AutoMLHook, pipeline_id: str):
        return hook.get_training_pipeline(project_id=self.project_id, region=self.region,
                                          training_pipeline=pipeline_id)

    def _wait(self, hook: AutoMLHook, pipeline_id: str):
        while True:
            pipeline = self._get(hook, pipeline_id)
            if pipeline.state.name in TERMINAL_PIPELINE_STATES:
                return pipeline
            self.log.info("training pipeline %s: %s", pipeline_id, pipeline.state.name)
            time.sleep(self.poll_interval_s)

    def _failed(self, pipeline, message: str = "") -> AirflowFailException:
        if pipeline is not None:
            error = pipeline.error.message or message
            state = pipeline.state.name
            budget = "budget exhausted: " if pipeline.error.code == gexc.ResourceExhausted.grpc_status_code.value[0] \
                else ""
            return AirflowFailException(
                f"Vertex AI AutoML training pipeline {pipeline.name} ended {state}: {budget}{error} (not retried: "
                "another pipeline would spend the training budget again; fix the cause, then clear the task to "
                "start a new one)")
        return AirflowFailException(f"AutoML training failed: {message} (not retried)")

    def _result(self, pipeline, reattached: bool) -> dict:
        uploaded = pipeline.model_to_upload
        version = f"{uploaded.name}@{uploaded.version_id}"
        io = GcsIO(self.gcp_conn_id, impersonation_chain=self.impersonation_chain)
        manifest = SplitManifest.from_json(io.read_bytes(self.split_uri).decode())
        client = ModelServiceHook(gcp_conn_id=self.gcp_conn_id, impersonation_chain=self.impersonation_chain
                                  ).get_model_service_client(self.region)
        evaluations = list(client.list_model_evaluations(parent=version))
        if not evaluations:
            raise AirflowFailException(f"model {version} trained by {pipeline.name} has no evaluation")
        evaluation = json_format.MessageToDict(type(evaluations[0]).pb(evaluations[0]).metrics)
        metrics = metrics_from_evaluation(evaluation, manifest.labels)
        metrics.update(split_fingerprint=manifest.fingerprint(), model_type=self.model_type)
        model_dir = self.model_dir.rstrip("/")
        io.write_json(f"{model_dir}/metrics.json", metrics)
        io.write_bytes(f"{model_dir}/labels.txt", labels_text(manifest.labels).encode(), "text/plain")
        meta = json_format.MessageToDict(type(pipeline).pb(pipeline).training_task_metadata) or {}
        job = type(pipeline).to_dict(pipeline)
        self.log.info("AutoML %s: test accuracy %.4f (macro F1 %.4f), %s of %s milli node hours (%s)", self.model_type,
                      metrics["accuracy"], metrics["macro_f1"], meta.get("costMilliNodeHours"),
                      self.budget_milli_node_hours, meta.get("successfulStopReason"))
        return {
            "model_dir": model_dir,
            "base_output_dir": self.base_output_dir.rstrip("/"),
            "metrics": metrics,
            "duration_s": _seconds_between(job.get("start_time"), job.get("end_time")),
            "method": "automl",
            "model_type": self.model_type,
            "budget_milli_node_hours": self.budget_milli_node_hours,
            "cost_milli_node_hours": int(meta["costMilliNodeHours"]) if meta.get("costMilliNodeHours") else None,
            "stop_reason": meta.get("successfulStopReason"),
            "training_pipeline_name": pipeline.name,
            "training_pipeline_id": _resource_id(pipeline.name),
            "model": version,
            "model_version": f"{_resource_id(uploaded.name)}@{uploaded.version_id}",
            "model_id": _resource_id(uploaded.name),
            "model_version_id": str(uploaded.version_id),
            "dataset_id": str(self.dataset_id),
            "reattached": reattached,
        }


# ============================================================================ model


class VertexExportModelOperator(ExportModelOperator):
    """ExportModelOperator for several formats, each to its own destination, failing loudly.

    The provider's operator exports one format and logs a missing model instead of failing; a
    delivery step must fail then. ``destinations``: export format id -> ``gs://`` folder; Vertex writes
    each export into a new ``model-export-<name>-<time>/`` folder under it (the operation's metadata
    names it). XCom: ``{"exports": {format: folder}, "tflite_uri", "labels_uri", "saved_model_uri",
    "duration_s"}`` (the keys of the formats exported).
    """

    template_fields: Sequence[str] = (*ExportModelOperator.template_fields, "destinations")

    def __init__(self, *, destinations: dict[str, str], operation_timeout_s: float = 3600, **kwargs):
        kwargs.setdefault("multiple_outputs", True)
        super().__init__(output_config={}, **kwargs)
        self.destinations = destinations
        self.operation_timeout_s = operation_timeout_s

    def execute(self, context) -> dict:
        t0 = time.monotonic()
        hook = ModelServiceHook(gcp_conn_id=self.gcp_conn_id, impersonation_chain=self.impersonation_chain)
        exports = {}
        for fmt, dest in self.destinations.items():
            self.output_config = {"export_format_id": fmt, "artifact_destination": {"output_uri_prefix": dest}}
            try:
                operation = hook.export_model(project_id=self.project_id, region=self.region, model=self.model_id,
                                              output_config=self.output_config, retry=self.retry,
                                              timeout=self.timeout, metadata=self.metadata)
                hook.wait_for_operation(operation=operation, timeout=self.operation_timeout_s)
            except PERMANENT as e:
                raise AirflowFailException(f"exporting model {self.model_id} as {fmt} failed: {e} (not retried)") from None
            except AirflowException as e:  # the operation itself failed (wait_for_operation)
                raise AirflowFailException(f"exporting model {self.model_id} as {fmt} failed: {e}") from None
            exports[fmt] = operation.metadata.output_info.artifact_output_uri.rstrip("/")
            self.log.info("exported %s as %s to %s", self.model_id, fmt, exports[fmt])
        VertexAIModelExportLink.persist(context=context, output_config=self.output_config, model_id=self.model_id,
                                        project_id=self.project_id)
        out: dict = {"exports": exports, "duration_s": round(time.monotonic() - t0, 2)}
        if "tflite" in exports:
            out.update(tflite_uri=f"{exports['tflite']}/model.tflite", labels_uri=f"{exports['tflite']}/dict.txt")
        if "tf-saved-model" in exports:
            out["saved_model_uri"] = exports["tf-saved-model"]
        return out


class AutoMLModelVersionOperator(DictOutputOperator):
    """The model version an AutoML training pipeline registered (``model``: ``.../models/<id>@<version>``),
    reported as RegisterModelVersionOperator reports an upload (the same XCom keys)."""

    template_fields: Sequence[str] = ("model",)

    def __init__(self, *, project_id: str, region: str, model: str, gcp_conn_id: str = "google_cloud_default",
                 impersonation_chain: str | Sequence[str] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.project_id = project_id
        self.region = region
        self.model = model
        self.gcp_conn_id = gcp_conn_id
        self.impersonation_chain = impersonation_chain

    def execute(self, context) -> dict:
        t0 = time.monotonic()
        hook = ModelServiceHook(gcp_conn_id=self.gcp_conn_id, impersonation_chain=self.impersonation_chain)
        name, _, version_id = str(self.model).partition("@")
        version = hook.get_model(project_id=self.project_id, region=self.region,
                                 model_id=f"{_resource_id(name)}@{version_id}")
        self.log.info("AutoML model %s version %s aliases=%s", version.name, version.version_id,
                      list(version.version_aliases))
        return {
            "model_id": _resource_id(version.name),
            "model_version_id": str(version.version_id),
            "model_resource_name": f"{version.name}@{version.version_id}",
            "version_aliases": list(version.version_aliases),
            "artifact_uri": version.artifact_uri,
            "serving_container_image_uri": None,
            "parent_model": version.name,
            "training_pipeline": version.training_pipeline,
            "reused": True,
            "duration_s": round(time.monotonic() - t0, 2),
        }

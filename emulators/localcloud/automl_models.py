"""What the Model Registry does for AutoML models beyond UploadModel and friends (models.py):

- ModelService.ExportModel: an exportable model's artifacts to ``artifact_destination``, into
  ``model-export-<model display name>-<timestamp>/`` (Vertex's layout; the operation's metadata
  names it in ``output_info.artifact_output_uri``). Edge models export ``tflite`` (model.tflite,
  dict.txt, tflite_metadata.json) and ``tf-saved-model`` here; CLOUD models and custom-trained
  ones list no export format, so exporting them fails with FAILED_PRECONDITION, as on Vertex.
- ModelService.ListModelEvaluations / GetModelEvaluation: the evaluation a training pipeline
  attached to the version (classification metrics on its test items).
- Online prediction of a deployed AutoML model: Vertex serves those itself (they have no
  container); here ``AutoMLServingRuntime`` runs the configured ``automl.serving_image`` for them
  with the model's SavedModel as ``AIP_STORAGE_URI``.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import grpc
from google.cloud.aiplatform_v1 import types
from google.longrunning import operations_pb2

from localcloud import rules
from localcloud.errors import RpcError, failed_precondition, not_found
from localcloud.gcs import Gcs
from localcloud.lro import Operations, now
from localcloud.models import ModelService
from localcloud.pipelines import AUTOML_MODEL, EVALUATION, LOCAL_EXPORT_FORMATS, AutoMLSettings
from localcloud.rpc import paginate, service_handler
from localcloud.serving import ServingRuntime
from localcloud.store import Store

log = logging.getLogger("localcloud.automl")
SERVICE = "google.cloud.aiplatform.v1.ModelService"


def automl_artifacts(store: Store, version: types.Model) -> dict | None:
    """Where this server keeps an AutoML model version's artifacts, or None for other models."""
    return store.get_value(f"{AUTOML_MODEL}{version.name}@{version.version_id}")


class AutoMLModelService:
    """The ModelService methods models.py does not serve (gRPC tries its handler first, then this one)."""

    def __init__(self, store: Store, operations: Operations, faults, models: ModelService, gcs: Gcs):
        self.store = store
        self.operations = operations
        self.faults = faults
        self.models = models
        self.gcs = gcs

    def export_model(self, request: types.ExportModelRequest) -> operations_pb2.Operation:
        version = self.models.resolve(request.name)
        fmt = request.output_config.export_format_id
        supported = [f.id for f in version.supported_export_formats]
        if fmt not in supported:
            formats = supported or "none (CLOUD AutoML models and models without exportable artifacts cannot be exported)"
            raise failed_precondition(f"Model {version.name}@{version.version_id} does not support export format "
                                      f"'{fmt}'; its supported_export_formats are {formats}")
        if fmt not in LOCAL_EXPORT_FORMATS:
            raise RpcError(grpc.StatusCode.UNIMPLEMENTED, f"export format '{fmt}' is not produced by the local "
                                                          f"Vertex AI server (it exports {sorted(LOCAL_EXPORT_FORMATS)})")
        dest = request.output_config.artifact_destination.output_uri_prefix
        if not dest:
            raise rules.invalid(f"output_config.artifact_destination is required for export format '{fmt}'")
        rules.gcs_uri(dest, "output_config.artifact_destination.output_uri_prefix")
        artifacts = automl_artifacts(self.store, version)
        source = Path(artifacts["dir"]) / LOCAL_EXPORT_FORMATS[fmt] if artifacts else None
        if source is None or not source.is_dir():
            raise failed_precondition(f"the artifacts of {version.name}@{version.version_id} are gone from this "
                                      f"server's storage ({source}); train the model again")
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        out = f"{dest.rstrip('/')}/model-export-{version.display_name}-{stamp}"
        metadata = types.ExportModelOperationMetadata(
            generic_metadata=types.GenericOperationMetadata(create_time=now(), update_time=now()),
            output_info=types.ExportModelOperationMetadata.OutputInfo(artifact_output_uri=out))

        def work():
            with tempfile.TemporaryDirectory() as tmp:  # only the export format's files, as Vertex writes them
                staged = Path(tmp) / "export"
                shutil.copytree(source, staged, ignore=shutil.ignore_patterns("annotation_specs.json"))
                written = self.gcs.upload_dir(staged, out)
            log.info("exported %s@%s as %s: %d files to %s", version.name, version.version_id, fmt, len(written), out)
            return types.ExportModelResponse()

        return self.operations.start(f"{version.name}@{version.version_id}", "ExportModel", metadata, work)

    def _evaluations(self, model: str) -> list[types.ModelEvaluation]:
        version = self.models.resolve(model)
        return self.store.list(EVALUATION, types.ModelEvaluation, parent=f"{version.name}@{version.version_id}")

    def list_model_evaluations(self, request: types.ListModelEvaluationsRequest) -> types.ListModelEvaluationsResponse:
        found = self._evaluations(request.parent)
        page, token = paginate(found, request.page_size, request.page_token)
        return types.ListModelEvaluationsResponse(model_evaluations=page, next_page_token=token)

    def get_model_evaluation(self, request: types.GetModelEvaluationRequest) -> types.ModelEvaluation:
        found = self.store.get(EVALUATION, request.name, types.ModelEvaluation)
        if found is None:
            raise not_found("ModelEvaluation", request.name)
        return found

    def handler(self) -> grpc.GenericRpcHandler:
        return service_handler(SERVICE, {
            "ExportModel": (types.ExportModelRequest, operations_pb2.Operation, self.export_model),
            "ListModelEvaluations": (types.ListModelEvaluationsRequest, types.ListModelEvaluationsResponse,
                                     self.list_model_evaluations),
            "GetModelEvaluation": (types.GetModelEvaluationRequest, types.ModelEvaluation, self.get_model_evaluation),
        }, self.faults)


class AutoMLServingRuntime(ServingRuntime):
    """Serves deployed AutoML models with the configured AutoML serving image; other models as before."""

    SERVING_ROUTES = {"predict_route": "/predict", "health_route": "/health"}

    def start(self, endpoint: str, deployed_model: types.DeployedModel, model: types.Model, wait: bool = True):
        artifacts = None if model.container_spec.image_uri else automl_artifacts(self.store, model)
        if artifacts:
            image = AutoMLSettings(getattr(self.cfg, "automl", None)).serving_image
            if not image:
                raise failed_precondition("the local Vertex AI server has no automl.serving_image in its config: it "
                                          "cannot serve AutoML models")
            model = types.Model(model)  # what runs: never stored, the registry keeps Vertex's view
            model.container_spec = types.ModelContainerSpec(image_uri=image, **self.SERVING_ROUTES)
            model.artifact_uri = str(Path(artifacts["dir"]) / LOCAL_EXPORT_FORMATS["tf-saved-model"])
        return super().start(endpoint, deployed_model, model, wait)

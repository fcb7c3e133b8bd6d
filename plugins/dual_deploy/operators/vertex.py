"""The GCP platform's Vertex AI steps, built on the Google provider's operators and hooks.

Same inputs and XCom outputs as the local platform's operators (``local_vertex.py``):

- VertexCustomJobOperator: the provider's CreateCustomJobOperator (deferrable) returning
  ``{"model_dir", "base_output_dir", "metrics", ...}`` like the local trainer.
- RegisterModelVersionOperator: the provider's UploadModelOperator that first looks the
  parent model up by display name, so every run adds a version (the first run creates it).
- CanaryDeployModelOperator: get-or-create the endpoint by display name, deploy the new
  version beside the old one with a canary share of the traffic, smoke-test the canary,
  then promote it to 100 % and undeploy the old one(s) - or roll back.

Nothing here talks to Google Cloud except through the provider's hooks (and GcsIO), so
tests patch them where they are used: ``dual_deploy.operators.vertex.<Hook>``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from airflow.providers.google.cloud.hooks.vertex_ai.endpoint_service import EndpointServiceHook
from airflow.providers.google.cloud.hooks.vertex_ai.model_service import ModelServiceHook
from airflow.providers.google.cloud.hooks.vertex_ai.prediction_service import PredictionServiceHook
from airflow.providers.google.cloud.operators.vertex_ai.custom_job import CreateCustomJobOperator
from airflow.providers.google.cloud.operators.vertex_ai.model_service import UploadModelOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from dual_deploy.hooks.gcs_io import GcsIO
from dual_deploy.operators.base import DictOutputOperator
from dual_deploy.smoke import SmokeTestFailed, build_request, check_response
from dualml.dataset import SplitManifest

SERVING_PORT = 8080
PREDICT_ROUTE = "/predict"
HEALTH_ROUTE = "/health"


def _resource_id(name: str) -> str:
    """``projects/p/locations/r/models/123`` -> ``123``."""
    return str(name).rstrip("/").rpartition("/")[-1]


def prediction_url(project_id: str, region: str, endpoint_id: str) -> str:
    return (f"https://{region}-aiplatform.googleapis.com/v1/projects/{project_id}/locations/{region}"
            f"/endpoints/{endpoint_id}:predict")


# ============================================================================ training


class VertexCustomJobOperator(CreateCustomJobOperator):
    """The provider's CreateCustomJobOperator with the local trainer's XCom contract.

    ``custom_job`` is the CustomJob resource (worker pools, base output directory, service
    account, scheduling); Vertex AI sets AIP_MODEL_DIR=<base_output_dir>/model/ for the
    trainer, which writes the model and ``metrics.json`` there. After the job (deferred
    on the provider's CustomJobTrigger when ``deferrable``) the result is
    ``{"model_dir", "base_output_dir", "metrics", "custom_job_name", "duration_s"}``.
    """

    template_fields: Sequence[str] = (*CreateCustomJobOperator.template_fields, "base_output_dir")
    ui_color = "#fce8b2"

    def __init__(self, *, base_output_dir: str, **kwargs):
        kwargs.setdefault("multiple_outputs", True)
        super().__init__(**kwargs)
        self.base_output_dir = base_output_dir

    def execute(self, context) -> dict:
        job = super().execute(context)  # defers (raises TaskDeferred) when deferrable
        return self._result(job)

    def execute_complete(self, context, event: dict[str, Any]) -> dict:
        try:
            job = super().execute_complete(context, event)
        except RuntimeError as e:  # the provider's way of reporting an "error" event
            raise AirflowException(f"Vertex AI custom job for {self.base_output_dir} failed: {e}") from None
        return self._result(job)

    def _result(self, job: dict) -> dict:
        base = self.base_output_dir.rstrip("/")
        model_dir = f"{base}/model"
        io = GcsIO(self.gcp_conn_id, impersonation_chain=self.impersonation_chain)
        try:
            metrics = io.read_json(f"{model_dir}/metrics.json")
        except Exception as e:
            raise AirflowFailException(
                f"custom job {job.get('name')} succeeded but {model_dir}/metrics.json is unreadable: {e}"
            ) from None
        self.log.info("test accuracy %.4f (macro F1 %.4f)", metrics["accuracy"], metrics["macro_f1"])
        return {
            "model_dir": model_dir,
            "base_output_dir": base,
            "metrics": metrics,
            "custom_job_name": job.get("name"),
            "duration_s": _job_duration(job),
        }


def _job_duration(job: dict) -> float | None:
    """Seconds between the job's start_time and end_time (RFC 3339 strings in CustomJob.to_dict)."""
    try:
        start, end = (datetime.fromisoformat(str(job[k]).replace("Z", "+00:00")) for k in ("start_time", "end_time"))
    except (KeyError, ValueError):
        return None
    return round((end - start).total_seconds(), 2)


# ============================================================================ model registry


class RegisterModelVersionOperator(UploadModelOperator):
    """Upload ``artifact_uri`` as a new version of the Model Registry model ``display_name``.

    Before uploading, the parent model is looked up by display name
    (``ModelServiceHook.list_models(filter='display_name="..."')``): found, the upload
    becomes a new version of it (``parent_model``); not found (first run), it creates the
    model. The serving container is ``serving_image`` with ``/predict`` and ``/health``
    routes on port 8080 (AIP_HTTP_PORT). ``is_default_version`` adds the ``default`` alias,
    as the Vertex AI SDK does. A retry after a version with the same run alias was
    already uploaded reuses that version instead of failing on the duplicate alias.

    XCom: ``{"model_id", "model_version_id", "model_resource_name", "version_aliases",
    "artifact_uri", "serving_container_image_uri", "parent_model", "duration_s"}``.
    """

    template_fields: Sequence[str] = (
        *UploadModelOperator.template_fields, "display_name", "artifact_uri", "version_aliases",
        "version_description",
    )

    def __init__(self, *, project_id: str, region: str, display_name: str, artifact_uri: str, serving_image: str,
                 version_aliases: list[str] | None = None, is_default_version: bool = True,
                 version_description: str | None = None, labels: dict[str, str] | None = None, **kwargs):
        kwargs.setdefault("multiple_outputs", True)
        # ``model`` is assembled in execute(), once artifact_uri (an upstream XCom) is rendered.
        super().__init__(project_id=project_id, region=region, model={}, parent_model=None, **kwargs)
        self.display_name = display_name
        self.artifact_uri = artifact_uri
        self.serving_image = serving_image
        self.version_aliases = list(version_aliases or [])
        self.is_default_version = is_default_version
        self.version_description = version_description
        self.labels = dict(labels or {})

    def _hook(self) -> ModelServiceHook:
        return ModelServiceHook(gcp_conn_id=self.gcp_conn_id, impersonation_chain=self.impersonation_chain)

    def build_model(self) -> dict:
        aliases = list(self.version_aliases)
        if self.is_default_version and "default" not in aliases:
            aliases.append("default")
        model = {
            "display_name": self.display_name,
            "artifact_uri": str(self.artifact_uri).rstrip("/"),
            "version_aliases": aliases,
            "container_spec": {
                "image_uri": self.serving_image,
                "predict_route": PREDICT_ROUTE,
                "health_route": HEALTH_ROUTE,
                "ports": [{"container_port": SERVING_PORT}],
            },
        }
        if self.version_description:
            model["version_description"] = self.version_description
        if self.labels:
            model["labels"] = self.labels
        return model

    def find_parent_model(self, hook: ModelServiceHook) -> str | None:
        """The ID of the model named ``display_name`` (the oldest if several), or None."""
        models = list(hook.list_models(
            project_id=self.project_id,
            region=self.region,
            filter=f'display_name="{self.display_name}"',
            order_by="create_time",
        ))
        if not models:
            return None
        if len(models) > 1:
            self.log.warning("%d models are named %r; adding the version under the oldest, %s",
                             len(models), self.display_name, models[0].name)
        return _resource_id(models[0].name)

    def _existing_version(self, hook: ModelServiceHook, parent_id: str) -> Any | None:
        """The version of ``parent_id`` that already carries this run's first alias (a retry), if any."""
        if not self.version_aliases:
            return None
        from google.api_core.exceptions import NotFound

        try:
            return hook.get_model(project_id=self.project_id, region=self.region,
                                  model_id=f"{parent_id}@{self.version_aliases[0]}")
        except NotFound:
            return None

    def execute(self, context) -> dict:
        t0 = time.monotonic()
        hook = self._hook()
        self.model = self.build_model()
        parent_id = self.find_parent_model(hook)
        existing = self._existing_version(hook, parent_id) if parent_id else None
        if existing is not None:
            self.log.info("version %s of model %s already has alias %s (a retry): reusing it",
                          existing.version_id, parent_id, self.version_aliases[0])
            model_name, version_id = existing.name, str(existing.version_id)
            aliases, artifact_uri = list(existing.version_aliases), existing.artifact_uri
        else:
            self.parent_model = parent_id
            self.log.info("uploading %s as %s", self.model["artifact_uri"],
                          f"a new version of model {parent_id}" if parent_id else f"new model {self.display_name!r}")
            response = super().execute(context)  # {"model": "projects/.../models/<id>", "model_version_id": "<n>"}
            model_name, version_id = response["model"], str(response["model_version_id"])
            aliases, artifact_uri = self.model["version_aliases"], self.model["artifact_uri"]
        model_name = model_name.split("@")[0]
        self.log.info("registered %s version %s aliases=%s", model_name, version_id, aliases)
        return {
            "model_id": _resource_id(model_name),
            "model_version_id": version_id,
            "model_resource_name": f"{model_name}@{version_id}",
            "version_aliases": aliases,
            "artifact_uri": artifact_uri,
            "serving_container_image_uri": self.serving_image,
            "parent_model": parent_id,
            "duration_s": round(time.monotonic() - t0, 2),
        }


# ============================================================================ endpoint


def canary_traffic_split(current: dict[str, int], canary_percent: int) -> dict[str, int]:
    """The DeployModel traffic_split giving the new model ("0") ``canary_percent`` and the live
    deployed models the rest in their current proportions; 100 % when nothing is live."""
    live = {k: int(v) for k, v in (current or {}).items() if int(v) > 0}
    if not live or canary_percent >= 100:
        return {"0": 100}
    remaining = 100 - canary_percent
    total = sum(live.values())
    split = {k: v * remaining // total for k, v in live.items()}
    biggest = max(live, key=lambda k: (live[k], k))
    split[biggest] += remaining - sum(split.values())
    return {"0": canary_percent, **split}


def smoke_attempts(share_percent: int, miss_probability: float, max_requests: int) -> int:
    """How many requests make it near-certain (1 - miss_probability) that a deployed model with
    ``share_percent`` of the traffic answers at least one: ceil(log(p_miss) / log(1 - share))."""
    if share_percent >= 100:
        return 1
    n = math.ceil(math.log(miss_probability) / math.log(1 - share_percent / 100))
    return max(1, min(n, max_requests))


class CanaryDeployModelOperator(DictOutputOperator):
    """Canary-deploy the registered version to the endpoint ``endpoint_display_name``.

    1. Get-or-create the endpoint by display name (``list_endpoints`` with a display_name
       filter; ``create_endpoint`` only when none exists, so a re-run never duplicates it).
    2. ``deploy_model`` the version on dedicated resources with traffic_split
       ``{"0": canary %, <live deployed models>: the rest}`` (first deployment: 100 %).
    3. Smoke-test the new deployed model with ``smoke_instances`` test-split images in Vertex's
       request format (PredictionService.Predict through the client of the provider's
       PredictionServiceHook). Online predict on a shared endpoint cannot be addressed to one deployed
       model, but every PredictResponse names the ``deployed_model_id`` that served it: the
       request is repeated until the new deployed model has answered (enough tries that missing
       it at the canary share has probability <= ``smoke_miss_probability``, at most
       ``max_smoke_requests``); its answer must pass ``smoke.check_response``. Answers from the
       previous model are ignored; any failed request counts against the canary (the previous
       model was serving all traffic before).
    4. Pass: ``update_endpoint`` traffic to 100 % new, then undeploy the previous deployed
       model(s). Fail: undeploy the new deployed model with the previous traffic split (traffic
       stays on the old model) and raise AirflowFailException naming the smoke failure.

    XCom: ``{"endpoint_id", "endpoint_display_name", "endpoint_created", "prediction_url",
    "deployed_model_id", "model_version_id", "smoke_test", "traffic_split",
    "canary_traffic_percent", "previous_deployed_model_ids", "undeployed", "undeploy_errors",
    "duration_s"}``.
    """

    template_fields: Sequence[str] = ("project_id", "region", "endpoint_display_name", "model", "split_uri")
    ui_color = "#c6e2ff"

    def __init__(self, *, project_id: str, region: str, endpoint_display_name: str, model_display_name: str,
                 model: dict, split_uri: str, machine_type: str = "n1-standard-4", min_replica_count: int = 1,
                 max_replica_count: int = 1, canary_traffic_percent: int = 10, smoke_instances: int = 2,
                 smoke_miss_probability: float = 1e-4, max_smoke_requests: int = 200, smoke_timeout_s: float = 60,
                 operation_timeout_s: int = 3600, gcp_conn_id: str = "google_cloud_default",
                 impersonation_chain: str | Sequence[str] | None = None, **kwargs):
        super().__init__(**kwargs)
        if not 1 <= canary_traffic_percent <= 100:
            raise ValueError(f"canary_traffic_percent must be 1..100, got {canary_traffic_percent}")
        self.project_id = project_id
        self.region = region
        self.endpoint_display_name = endpoint_display_name
        self.model_display_name = model_display_name
        self.model = model
        self.split_uri = split_uri
        self.machine_type = machine_type
        self.min_replica_count = min_replica_count
        self.max_replica_count = max_replica_count
        self.canary_traffic_percent = canary_traffic_percent
        self.smoke_instances = smoke_instances
        self.smoke_miss_probability = smoke_miss_probability
        self.max_smoke_requests = max_smoke_requests
        self.smoke_timeout_s = smoke_timeout_s
        self.operation_timeout_s = operation_timeout_s
        self.gcp_conn_id = gcp_conn_id
        self.impersonation_chain = impersonation_chain

    # ---------------------------------------------------------------- steps

    def _where(self) -> dict:
        return {"project_id": self.project_id, "region": self.region}

    def get_or_create_endpoint(self, hook: EndpointServiceHook):
        """(Endpoint, created). The oldest endpoint with the display name wins if several exist."""
        found = list(hook.list_endpoints(
            **self._where(), filter=f'display_name="{self.endpoint_display_name}"', order_by="create_time",
        ))
        if found:
            if len(found) > 1:
                self.log.warning("%d endpoints are named %r; using the oldest, %s",
                                 len(found), self.endpoint_display_name, found[0].name)
            return found[0], False
        operation = hook.create_endpoint(**self._where(), endpoint={"display_name": self.endpoint_display_name})
        return hook.wait_for_operation(operation=operation, timeout=self.operation_timeout_s), True

    def deployed_model_spec(self) -> dict:
        return {
            "model": self.model["model_resource_name"],
            "display_name": f"{self.model_display_name}-v{self.model['model_version_id']}",
            "dedicated_resources": {
                "machine_spec": {"machine_type": self.machine_type},
                "min_replica_count": self.min_replica_count,
                "max_replica_count": self.max_replica_count,
            },
        }

    def smoke_test(self, endpoint_id: str, deployed_model_id: str, share_percent: int) -> dict:
        """Predict until ``deployed_model_id`` answers; check its answer. Raises SmokeTestFailed."""
        io = GcsIO(self.gcp_conn_id, impersonation_chain=self.impersonation_chain)
        manifest = SplitManifest.from_json(io.read_bytes(self.split_uri).decode())
        samples = manifest.files.get("test", [])[: self.smoke_instances]
        if not samples:
            raise SmokeTestFailed(f"the test split of {self.split_uri} is empty")
        instances = build_request([io.read_bytes(uri) for uri, _ in samples])["instances"]
        attempts = smoke_attempts(share_percent, self.smoke_miss_probability, self.max_smoke_requests)
        hook = PredictionServiceHook(gcp_conn_id=self.gcp_conn_id, impersonation_chain=self.impersonation_chain)
        # The hook's client (regional endpoint {region}-aiplatform.googleapis.com, the hook's credentials),
        # called with flattened arguments: PredictionServiceHook.predict() builds the request as a dict,
        # and proto-plus cannot construct a PredictRequest whose repeated Value field `instances` is
        # given in the constructor (googleapis/proto-plus-python#488: "... instances is not iterable"
        # for any list); the client's flattened path appends them with `instances.extend()`, which works.
        client = hook.get_prediction_service_client(self.region)
        endpoint_name = f"projects/{self.project_id}/locations/{self.region}/endpoints/{endpoint_id}"
        served: dict[str, int] = {}
        for attempt in range(1, attempts + 1):
            try:
                response = client.predict(endpoint=endpoint_name, instances=instances,
                                          timeout=self.smoke_timeout_s)
            except Exception as e:
                raise SmokeTestFailed(f"prediction request {attempt} to endpoint {endpoint_id} failed: {e}") from None
            body = type(response).to_dict(response)
            by = str(body.get("deployed_model_id") or "")
            served[by] = served.get(by, 0) + 1
            if by != deployed_model_id:
                continue
            predictions = check_response(body, manifest.labels, len(samples))
            return {
                "url": prediction_url(self.project_id, self.region, endpoint_id),
                "instances": len(samples),
                "predictions": [p["label"] for p in predictions],
                "expected": [manifest.labels[i] for _, i in samples],
                "deployed_model_id": deployed_model_id,
                "requests": attempt,
                "served_by": served,
            }
        raise SmokeTestFailed(
            f"the new deployed model {deployed_model_id} answered none of {attempts} requests at "
            f"{share_percent} % of the traffic (answered by: {served})"
        )

    def rollback(self, hook: EndpointServiceHook, endpoint_id: str, deployed_model_id: str,
                 previous_split: dict[str, int]) -> None:
        """Undeploy the new deployed model, putting the traffic back as it was."""
        restore = {k: v for k, v in previous_split.items() if v > 0} or None
        operation = hook.undeploy_model(**self._where(), endpoint=endpoint_id, deployed_model_id=deployed_model_id,
                                        traffic_split=restore)
        hook.wait_for_operation(operation=operation, timeout=self.operation_timeout_s)

    def promote(self, hook: EndpointServiceHook, endpoint_id: str, deployed_model_id: str, deploy_split: dict,
                previous_ids: list[str]) -> tuple[list[str], dict[str, str]]:
        """100 % to the new deployed model, then undeploy the previous ones. (undeployed, errors)."""
        from google.protobuf.field_mask_pb2 import FieldMask

        if deploy_split != {"0": 100}:
            hook.update_endpoint(**self._where(), endpoint_id=endpoint_id,
                                 endpoint={"traffic_split": {deployed_model_id: 100}},
                                 update_mask=FieldMask(paths=["traffic_split"]))
        undeployed, errors = [], {}
        for old in previous_ids:
            try:
                operation = hook.undeploy_model(**self._where(), endpoint=endpoint_id, deployed_model_id=old)
                hook.wait_for_operation(operation=operation, timeout=self.operation_timeout_s)
                undeployed.append(old)
            except Exception as e:
                # The new version already serves 100 %: report, don't fail (the next run undeploys leftovers).
                self.log.error("could not undeploy previous deployed model %s: %s", old, e)
                errors[old] = str(e)[:300]
        return undeployed, errors

    # ---------------------------------------------------------------- execute

    def execute(self, context) -> dict:
        t0 = time.monotonic()
        version = str(self.model["model_version_id"])
        hook = EndpointServiceHook(gcp_conn_id=self.gcp_conn_id, impersonation_chain=self.impersonation_chain)
        endpoint, created = self.get_or_create_endpoint(hook)
        endpoint_id = _resource_id(endpoint.name)
        self.log.info("%s endpoint %s", "created" if created else "reusing", endpoint.name)
        previous_split = {str(k): int(v) for k, v in dict(endpoint.traffic_split).items()}
        previous_ids = [str(dm.id) for dm in endpoint.deployed_models]

        split = canary_traffic_split(previous_split, self.canary_traffic_percent)
        self.log.info("deploying %s with traffic split %s", self.model["model_resource_name"], split)
        operation = hook.deploy_model(**self._where(), endpoint=endpoint_id, deployed_model=self.deployed_model_spec(),
                                      traffic_split=split)
        response = hook.wait_for_operation(operation=operation, timeout=self.operation_timeout_s)
        new_id = str(response.deployed_model.id)
        share = split["0"]
        self.log.info("deployed model %s (version %s) takes %d %% of the traffic", new_id, version, share)

        try:
            smoke = self.smoke_test(endpoint_id, new_id, share)
        except SmokeTestFailed as e:
            self.log.error("smoke test failed, rolling back: %s", e)
            try:
                self.rollback(hook, endpoint_id, new_id, previous_split)
            except Exception as undeploy_error:
                raise AirflowException(
                    f"smoke test of model version {version} (deployed model {new_id}) failed: {e}; and undeploying "
                    f"it from endpoint {endpoint_id} failed too: {undeploy_error}"
                ) from None
            raise AirflowFailException(
                f"smoke test of model version {version} (deployed model {new_id}) failed: {e}. Rolled back: "
                f"undeployed it; endpoint {endpoint_id} traffic stays {previous_split or 'empty (no previous model)'}"
            ) from None
        self.log.info("smoke test passed on deployed model %s: %s", new_id, smoke["predictions"])

        undeployed, errors = self.promote(hook, endpoint_id, new_id, split, previous_ids)
        self.log.info("endpoint %s now serves version %s (deployed model %s) at 100 %%; undeployed %s",
                      endpoint_id, version, new_id, undeployed or "nothing")
        return {
            "endpoint_id": endpoint_id,
            "endpoint_display_name": self.endpoint_display_name,
            "endpoint_created": created,
            "prediction_url": prediction_url(self.project_id, self.region, endpoint_id),
            "deployed_model_id": new_id,
            "model_version_id": version,
            "smoke_test": smoke,
            "traffic_split": {new_id: 100},
            "canary_traffic_percent": share,
            "previous_deployed_model_ids": previous_ids,
            "undeployed": undeployed,
            "undeploy_errors": errors,
            "duration_s": round(time.monotonic() - t0, 2),
        }

"""The Vertex AI steps, built on the Google provider's operators and hooks.

- VertexCustomJobOperator: the provider's CreateCustomJobOperator (deferrable). Each job carries
  the labels ``app``, ``dag``, ``run`` and ``target``, so a retry re-attaches to the job an earlier
  attempt started instead of paying for a second one. A job that FAILED or was CANCELLED fails the
  task without retries (the cause is in the job, e.g. bad data); a polling error retries.
- RegisterModelVersionOperator: the provider's UploadModelOperator, adding the version under the
  model found by display name (first run: a new model). The ``default`` alias does not move here.
- CanaryDeployModelOperator: get-or-create the endpoint, remove what earlier attempts of this run
  left deployed, deploy the version beside the serving one at a canary share, smoke-test it, then
  promote it (traffic 100 %, ``default`` alias, undeploy the old) - or roll back on any failure
  after DeployModel, so no untested canary keeps serving.

Nothing here talks to Google Cloud except through the provider's hooks (and GcsIO); locally the
same hooks reach the local Vertex AI server through ``VERTEX_AI_EMULATOR_HOST``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from airflow.providers.google.cloud.hooks.vertex_ai.custom_job import CustomJobHook
from airflow.providers.google.cloud.hooks.vertex_ai.endpoint_service import EndpointServiceHook
from airflow.providers.google.cloud.hooks.vertex_ai.model_service import ModelServiceHook
from airflow.providers.google.cloud.hooks.vertex_ai.prediction_service import PredictionServiceHook
from airflow.providers.google.cloud.links.vertex_ai import (
    VertexAICustomJobLink,
    VertexAIEndpointLink,
    VertexAIModelLink,
)
from airflow.providers.google.cloud.operators.vertex_ai.custom_job import CreateCustomJobOperator
from airflow.providers.google.cloud.operators.vertex_ai.model_service import UploadModelOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException
from google.api_core import exceptions as gexc

from dual_deploy.emulator_hosts import vertex_rest_base_url
from dual_deploy.hooks.gcs_io import GcsIO
from dual_deploy.operators.base import DictOutputOperator
from dual_deploy.smoke import SmokeTestFailed, build_request, check_response
from dual_deploy.triggers import TRANSIENT, CustomJobRunTrigger
from dualml.dataset import SplitManifest

SERVING_PORT = 8080
PREDICT_ROUTE = "/predict"
HEALTH_ROUTE = "/health"
LIVE_JOB_STATES = ("JOB_STATE_QUEUED", "JOB_STATE_PENDING", "JOB_STATE_RUNNING", "JOB_STATE_SUCCEEDED")


def _resource_id(name: str) -> str:
    """``projects/p/locations/r/models/123`` -> ``123``."""
    return str(name).rstrip("/").rpartition("/")[-1].split("@")[0]


def prediction_url(project_id: str, region: str, endpoint_id: str) -> str:
    return (f"{vertex_rest_base_url(region)}/v1/projects/{project_id}/locations/{region}"
            f"/endpoints/{endpoint_id}:predict")


# ============================================================================ training


class VertexCustomJobOperator(CreateCustomJobOperator):
    """The provider's CreateCustomJobOperator, idempotent per run and target.

    ``custom_job`` is the CustomJob resource; its ``labels`` must identify the run and target
    (``platforms.custom_job`` sets ``app``, ``dag``, ``run``, ``target``). Before creating a job,
    the jobs with those labels are listed: a queued, running or succeeded one (an earlier attempt's)
    is re-attached to, never duplicated. After the job (deferred on ``CustomJobRunTrigger``) the
    result is ``{"model_dir", "base_output_dir", "metrics", "custom_job_name", "custom_job_id",
    "reattached", "duration_s"}``: Vertex AI sets AIP_MODEL_DIR=<base_output_dir>/model/ and the
    trainer writes the model and ``metrics.json`` there.
    """

    template_fields: Sequence[str] = (*CreateCustomJobOperator.template_fields, "base_output_dir")
    ui_color = "#fce8b2"

    def __init__(self, *, base_output_dir: str, poll_retry_timeout_s: float = 120.0, **kwargs):
        kwargs.setdefault("multiple_outputs", True)
        super().__init__(**kwargs)
        self.base_output_dir = base_output_dir
        self.poll_retry_timeout_s = poll_retry_timeout_s

    def _job_filter(self) -> str:
        labels = dict(self.custom_job.get("labels") or {})
        missing = [k for k in ("app", "run", "target") if not labels.get(k)]
        if missing:
            raise AirflowFailException(f"custom_job.labels lacks {missing}: they identify this run's job so a "
                                       "retry can re-attach to it")
        return " AND ".join(f'labels.{k}="{v}"' for k, v in sorted(labels.items()))

    def find_existing_job(self, hook: CustomJobHook) -> Any | None:
        """The newest job of this run and target that is live or succeeded, if any."""
        jobs = list(hook.list_custom_jobs(project_id=self.project_id, region=self.region, page_size=100,
                                          page_token=None, filter=self._job_filter(), read_mask=None))
        live = [j for j in jobs if j.state.name in LIVE_JOB_STATES]
        if not live:
            if jobs:
                self.log.info("earlier jobs of this run ended %s: starting a new one",
                              sorted({j.state.name for j in jobs}))
            return None
        return max(live, key=lambda j: j.create_time)

    def execute(self, context) -> dict:
        existing = self.find_existing_job(self.hook)
        if existing is None:
            job = super().execute(context)  # creates the job; deferrable: defers (raises TaskDeferred)
            return self._result(job, reattached=False)
        self.custom_job_id = CustomJobHook.extract_custom_job_id(existing.name)
        self.log.info("re-attaching to custom job %s (%s) started by an earlier attempt of this run",
                      self.custom_job_id, existing.state.name)
        context["ti"].xcom_push(key="custom_job_id", value=self.custom_job_id)
        VertexAICustomJobLink.persist(context=context, custom_job_id=self.custom_job_id)
        if existing.state.name == "JOB_STATE_SUCCEEDED":
            return self._result(type(existing).to_dict(existing), reattached=True)
        self.defer(trigger=self._trigger(), method_name="execute_complete", kwargs={"reattached": True})

    def _trigger(self) -> CustomJobRunTrigger:
        return CustomJobRunTrigger(gcp_conn_id=self.gcp_conn_id, project_id=self.project_id, location=self.region,
                                   custom_job_id=self.custom_job_id, poll_interval=self.poll_interval,
                                   impersonation_chain=self.impersonation_chain,
                                   poll_retry_timeout_s=self.poll_retry_timeout_s)

    def defer(self, *, trigger, method_name, kwargs=None, timeout=None):
        # The provider defers on its own CustomJobTrigger; ours tells failures from polling errors
        # and cancels the job when the task is cleared.
        if not isinstance(trigger, CustomJobRunTrigger):
            trigger = self._trigger()
        super().defer(trigger=trigger, method_name=method_name, kwargs=kwargs, timeout=timeout)

    def execute_complete(self, context, event: dict[str, Any], reattached: bool = False) -> dict:
        job_id = event.get("custom_job_id") or self.custom_job_id
        if event.get("status") == "error":
            if event.get("job_failed"):
                raise AirflowFailException(
                    f"Vertex AI custom job {job_id} for {self.base_output_dir} did not succeed: {event['message']} "
                    "(not retried: the job itself failed; fix the cause, then clear the task to start a new job)"
                )
            raise AirflowException(f"{event['message']} (the task retries and re-attaches to job {job_id})")
        return self._result(event["custom_job"], reattached=reattached)

    def _result(self, job: dict, reattached: bool) -> dict:
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
            "custom_job_id": _resource_id(job.get("name", "")),
            "reattached": reattached,
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

    The parent model is looked up by display name (``list_models`` with a display_name filter):
    found, the upload becomes a new version of it (``parent_model``); not found (first run), it
    creates the model, whose first version Vertex AI makes the ``default`` one. Later versions get
    only ``version_aliases`` (the run's alias): ``default`` moves when the deploy step promotes the
    version, so it always names the version the endpoint serves. A retry after the upload reuses
    the version carrying the run's alias instead of adding another.

    XCom: ``{"model_id", "model_version_id", "model_resource_name", "version_aliases",
    "artifact_uri", "serving_container_image_uri", "parent_model", "reused", "duration_s"}``.
    """

    template_fields: Sequence[str] = (
        *UploadModelOperator.template_fields, "display_name", "artifact_uri", "version_aliases",
        "version_description",
    )

    def __init__(self, *, project_id: str, region: str, display_name: str, artifact_uri: str, serving_image: str,
                 version_aliases: list[str] | None = None, version_description: str | None = None,
                 labels: dict[str, str] | None = None, **kwargs):
        kwargs.setdefault("multiple_outputs", True)
        # ``model`` is assembled in execute(), once artifact_uri (an upstream XCom) is rendered.
        super().__init__(project_id=project_id, region=region, model={}, parent_model=None, **kwargs)
        self.display_name = display_name
        self.artifact_uri = artifact_uri
        self.serving_image = serving_image
        self.version_aliases = list(version_aliases or [])
        self.version_description = version_description
        self.labels = dict(labels or {})

    def _hook(self) -> ModelServiceHook:
        return ModelServiceHook(gcp_conn_id=self.gcp_conn_id, impersonation_chain=self.impersonation_chain)

    def build_model(self) -> dict:
        model = {
            "display_name": self.display_name,
            "artifact_uri": str(self.artifact_uri).rstrip("/"),
            "version_aliases": [a for a in self.version_aliases if a != "default"],
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
            project_id=self.project_id, region=self.region, filter=f'display_name="{self.display_name}"',
            order_by="create_time",
        ))
        if not models:
            return None
        if len(models) > 1:
            self.log.warning("%d models are named %r; adding the version under the oldest, %s",
                             len(models), self.display_name, models[0].name)
        return _resource_id(models[0].name)

    def _existing_version(self, hook: ModelServiceHook, parent_id: str) -> Any | None:
        """The version of ``parent_id`` that already carries this run's alias (a retry), if any."""
        if not self.version_aliases:
            return None
        try:
            return hook.get_model(project_id=self.project_id, region=self.region,
                                  model_id=f"{parent_id}@{self.version_aliases[0]}")
        except gexc.NotFound:
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
            VertexAIModelLink.persist(context=context, model_id=_resource_id(model_name))
        else:
            self.parent_model = parent_id
            self.log.info("uploading %s as %s", self.model["artifact_uri"],
                          f"a new version of model {parent_id}" if parent_id else f"new model {self.display_name!r}")
            response = super().execute(context)  # {"model": "projects/.../models/<id>", "model_version_id": "<n>"}
            model_name, version_id = response["model"], str(response["model_version_id"])
        model_name = model_name.split("@")[0]
        version = hook.get_model(project_id=self.project_id, region=self.region,
                                 model_id=f"{_resource_id(model_name)}@{version_id}")
        self.log.info("registered %s version %s aliases=%s", model_name, version_id, list(version.version_aliases))
        return {
            "model_id": _resource_id(model_name),
            "model_version_id": version_id,
            "model_resource_name": f"{model_name}@{version_id}",
            "version_aliases": list(version.version_aliases),
            "artifact_uri": version.artifact_uri,
            "serving_container_image_uri": self.serving_image,
            "parent_model": parent_id,
            "reused": existing is not None,
            "duration_s": round(time.monotonic() - t0, 2),
        }


# ============================================================================ endpoint


def canary_traffic_split(current: dict[str, int], canary_percent: int) -> dict[str, int]:
    """The DeployModel traffic_split giving the new model ("0") ``canary_percent`` and the live
    deployed models the rest in their current proportions; 100 % when nothing is live."""
    live = {k: int(v) for k, v in (current or {}).items() if int(v) > 0}
    if not live or canary_percent >= 100:
        return {"0": 100}
    return {"0": canary_percent, **rescale(live, 100 - canary_percent)}


def rescale(split: dict[str, int], total: int = 100) -> dict[str, int]:
    """``split`` scaled to sum to ``total`` (integer shares, remainder to the biggest)."""
    live = {k: int(v) for k, v in split.items() if int(v) > 0}
    if not live:
        return {}
    scaled = {k: v * total // sum(live.values()) for k, v in live.items()}
    biggest = max(live, key=lambda k: (live[k], k))
    scaled[biggest] += total - sum(scaled.values())
    return scaled


def smoke_attempts(share_percent: int, miss_probability: float, max_requests: int) -> int:
    """How many requests make it near-certain (1 - miss_probability) that a deployed model with
    ``share_percent`` of the traffic answers at least one: ceil(log(p_miss) / log(1 - share))."""
    if share_percent >= 100:
        return 1
    n = math.ceil(math.log(miss_probability) / math.log(1 - share_percent / 100))
    return max(1, min(n, max_requests))


class CanaryDeployModelOperator(DictOutputOperator):
    """Canary-deploy the registered version to the endpoint ``endpoint_display_name``.

    1. Get-or-create the endpoint by display name (oldest wins; a re-run never duplicates it).
    2. Clean up earlier attempts of this run: a deployed model of this version that a crashed
       attempt left at a canary share is undeployed (its traffic goes back to the others); if an
       earlier attempt already gave this version 100 %, only promotion's remaining steps run.
    3. ``deploy_model`` on dedicated resources (``automatic_resources=True``: automatic ones, as AutoML
       models deploy) with traffic_split ``{"0": canary %, live: the rest}`` (first deployment: 100 %).
    4. Smoke-test the canary with ``smoke_instances`` test-split images (prepared to fit the 1.5 MB
       request limit) through PredictionService.Predict: requests repeat until the new deployed
       model has answered (each response names its ``deployed_model_id``), enough that missing it
       at the canary share has probability <= ``smoke_miss_probability``; transient errors (most
       likely answered by the old model) are retried up to ``smoke_transient_retries`` times.
    5. Promote: traffic 100 % to the new deployed model, then the ``default`` alias to its version,
       then undeploy the previous deployed models.
    Any failure between DeployModel and the traffic switch (smoke test, a GCS read, a timeout, a
    kill) undeploys the canary and restores the previous split; a failed smoke test then fails the
    task without retries, anything else retries.

    XCom: ``{"endpoint_id", "endpoint_display_name", "endpoint_created", "prediction_url",
    "deployed_model_id", "model_version_id", "smoke_test", "traffic_split", "canary_traffic_percent",
    "previous_deployed_model_ids", "undeployed", "leftovers_removed", "default_alias", "instance_format",
    "duration_s"}``.
    """

    template_fields: Sequence[str] = ("project_id", "region", "endpoint_display_name", "model", "split_uri")
    operator_extra_links = (VertexAIEndpointLink(), VertexAIModelLink())
    ui_color = "#c6e2ff"

    def __init__(self, *, project_id: str, region: str, endpoint_display_name: str, model_display_name: str,
                 model: dict, split_uri: str, machine_type: str = "n1-standard-4", min_replica_count: int = 1,
                 max_replica_count: int = 1, canary_traffic_percent: int = 10, smoke_instances: int = 2,
                 image_size: int | None = None, smoke_miss_probability: float = 1e-4, max_smoke_requests: int = 200,
                 smoke_timeout_s: float = 60, smoke_transient_retries: int = 3, operation_timeout_s: int = 3600,
                 operation_poll_max_s: float = 20, gcp_conn_id: str = "google_cloud_default",
                 impersonation_chain: str | Sequence[str] | None = None,
                 automatic_resources: bool = False, instance_format: str = "b64", **kwargs):
        super().__init__(**kwargs)
        if not 1 <= canary_traffic_percent <= 100:
            raise ValueError(f"canary_traffic_percent must be 1..100, got {canary_traffic_percent}")
        # AutoML models deploy on automatic resources (Vertex picks the machines; only the replica range is
        # ours) and take AutoML's request format ("automl_image": {"content": ...}).
        self.automatic_resources = automatic_resources
        self.instance_format = instance_format
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
        self.image_size = image_size
        self.smoke_miss_probability = smoke_miss_probability
        self.max_smoke_requests = max_smoke_requests
        self.smoke_timeout_s = smoke_timeout_s
        self.smoke_transient_retries = smoke_transient_retries
        self.operation_timeout_s = operation_timeout_s
        # The longest gap between two polls of a long-running operation (api_core backs off 1 s x1.5 up
        # to this; its own cap, 20 s, made a 13 s local deployment wait ~7 s more before it was seen).
        self.operation_poll_max_s = operation_poll_max_s
        self.gcp_conn_id = gcp_conn_id
        self.impersonation_chain = impersonation_chain
        self._canary: tuple[str, str, dict[str, int]] | None = None  # (endpoint id, deployed id, split before)

    @property
    def extra_links_params(self) -> dict[str, Any]:
        return {"region": self.region, "project_id": self.project_id}

    # ---------------------------------------------------------------- steps

    def _where(self) -> dict:
        return {"project_id": self.project_id, "region": self.region}

    def _hook(self) -> EndpointServiceHook:
        return EndpointServiceHook(gcp_conn_id=self.gcp_conn_id, impersonation_chain=self.impersonation_chain)

    def _wait(self, hook: EndpointServiceHook, operation):
        from google.api_core.future.polling import DEFAULT_POLLING

        polling = DEFAULT_POLLING.with_delay(maximum=self.operation_poll_max_s)
        return hook.wait_for_operation_result(operation=operation, timeout=self.operation_timeout_s, polling=polling)

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
        return self._wait(hook, operation), True

    def get_endpoint(self, hook: EndpointServiceHook, endpoint_id: str):
        return hook.get_endpoint(**self._where(), endpoint=endpoint_id)

    def deployed_model_spec(self) -> dict:
        replicas = {"min_replica_count": self.min_replica_count, "max_replica_count": self.max_replica_count}
        spec = {"model": self.model["model_resource_name"],
                "display_name": f"{self.model_display_name}-v{self.model['model_version_id']}"}
        if self.automatic_resources:
            return {**spec, "automatic_resources": replicas}
        return {**spec, "dedicated_resources": {"machine_spec": {"machine_type": self.machine_type}, **replicas}}

    def _ours(self, dm) -> bool:
        """Is deployed model ``dm`` this run's version?"""
        model_name = str(self.model["model_resource_name"]).split("@")[0]
        return dm.model == model_name and str(dm.model_version_id) == str(self.model["model_version_id"])

    def remove_leftovers(self, hook: EndpointServiceHook, endpoint) -> tuple[Any, list[str], str | None]:
        """Undo what earlier attempts of this run left: a canary of this version below 100 % is
        undeployed (traffic rescaled over the others). Returns (endpoint now, removed ids, the id of
        this version's deployed model if an earlier attempt already gave it 100 %)."""
        endpoint_id = _resource_id(endpoint.name)
        removed, promoted = [], None
        split = {str(k): int(v) for k, v in dict(endpoint.traffic_split).items()}
        for dm in list(endpoint.deployed_models):
            if not self._ours(dm):
                continue
            if split.get(str(dm.id), 0) >= 100:
                promoted = str(dm.id)
                continue
            rest = rescale({k: v for k, v in split.items() if k != str(dm.id)})
            self.log.warning("removing deployed model %s (version %s) left at %s %% by an earlier attempt of this run",
                             dm.id, dm.model_version_id, split.get(str(dm.id), 0))
            self._wait(hook, hook.undeploy_model(**self._where(), endpoint=endpoint_id, deployed_model_id=str(dm.id),
                                                 traffic_split=rest or None))
            removed.append(str(dm.id))
            split = rest
        return (self.get_endpoint(hook, endpoint_id) if removed else endpoint), removed, promoted

    def smoke_test(self, endpoint_id: str, deployed_model_id: str, share_percent: int) -> dict:
        """Predict until ``deployed_model_id`` answers; check its answer. Raises SmokeTestFailed."""
        io = GcsIO(self.gcp_conn_id, impersonation_chain=self.impersonation_chain)
        manifest = SplitManifest.from_json(io.read_bytes(self.split_uri).decode())
        samples = manifest.files.get("test", [])[: self.smoke_instances]
        if not samples:
            raise SmokeTestFailed(f"the test split of {self.split_uri} is empty")
        instances = build_request([io.read_bytes(uri) for uri, _ in samples], self.image_size,
                                  self.instance_format)["instances"]
        attempts = smoke_attempts(share_percent, self.smoke_miss_probability, self.max_smoke_requests)
        hook = PredictionServiceHook(gcp_conn_id=self.gcp_conn_id, impersonation_chain=self.impersonation_chain)
        # The hook's client, called with flattened arguments: PredictionServiceHook.predict() builds the
        # request as a dict, and proto-plus cannot construct a PredictRequest whose repeated Value field
        # `instances` is given in the constructor (googleapis/proto-plus-python#488); the client's
        # flattened path appends them with `instances.extend()`, which works.
        client = hook.get_prediction_service_client(self.region)
        endpoint_name = f"projects/{self.project_id}/locations/{self.region}/endpoints/{endpoint_id}"
        served: dict[str, int] = {}
        transient: list[str] = []
        attempt = 0
        while attempt < attempts:
            attempt += 1
            try:
                response = client.predict(endpoint=endpoint_name, instances=instances, timeout=self.smoke_timeout_s)
            except TRANSIENT as e:
                transient.append(f"{type(e).__name__}: {str(e)[:200]}")
                if len(transient) > self.smoke_transient_retries:
                    raise SmokeTestFailed(f"{len(transient)} transient errors predicting on endpoint {endpoint_id}, "
                                          f"last: {transient[-1]}") from None
                self.log.warning("smoke request %d: transient error (retrying): %s", attempt, transient[-1])
                attempt -= 1
                time.sleep(min(2 ** len(transient), 10))
                continue
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
                "transient_errors": transient,
            }
        raise SmokeTestFailed(
            f"the new deployed model {deployed_model_id} answered none of {attempts} requests at "
            f"{share_percent} % of the traffic (answered by: {served})"
        )

    def rollback(self, hook: EndpointServiceHook, endpoint_id: str, deployed_model_id: str,
                 previous_split: dict[str, int]) -> None:
        """Undeploy the new deployed model, putting the traffic back as it was."""
        restore = {k: v for k, v in previous_split.items() if v > 0} or None
        self._wait(hook, hook.undeploy_model(**self._where(), endpoint=endpoint_id, deployed_model_id=deployed_model_id,
                                             traffic_split=restore))

    def move_default_alias(self) -> list[str]:
        """``default`` -> the promoted version (MergeVersionAliases moves it off the previous one)."""
        hook = ModelServiceHook(gcp_conn_id=self.gcp_conn_id, impersonation_chain=self.impersonation_chain)
        version = hook.set_version_as_default(
            **self._where(), model_id=f"{self.model['model_id']}@{self.model['model_version_id']}",
        )
        return list(version.version_aliases)

    def finish_promotion(self, hook: EndpointServiceHook, endpoint_id: str, new_id: str) -> dict:
        """After the new deployed model has 100 %: move ``default``, undeploy the others. Idempotent;
        a failure raises (the retry's cleanup finishes it)."""
        aliases = self.move_default_alias()
        undeployed = []
        for dm in self.get_endpoint(hook, endpoint_id).deployed_models:
            if str(dm.id) != new_id:
                self._wait(hook, hook.undeploy_model(**self._where(), endpoint=endpoint_id, deployed_model_id=str(dm.id)))
                undeployed.append(str(dm.id))
        return {"version_aliases": aliases, "undeployed": undeployed}

    def on_kill(self) -> None:
        """The task was killed between DeployModel and promotion: take the canary back out."""
        if self._canary:
            endpoint_id, new_id, previous = self._canary
            self.log.warning("task killed with canary %s deployed: rolling it back", new_id)
            self.rollback(self._hook(), endpoint_id, new_id, previous)
            self._canary = None

    # ---------------------------------------------------------------- execute

    def execute(self, context) -> dict:
        t0 = time.monotonic()
        version = str(self.model["model_version_id"])
        hook = self._hook()
        endpoint, created = self.get_or_create_endpoint(hook)
        endpoint_id = _resource_id(endpoint.name)
        VertexAIEndpointLink.persist(context=context, endpoint_id=endpoint_id)
        VertexAIModelLink.persist(context=context, model_id=self.model["model_id"])
        self.log.info("%s endpoint %s", "created" if created else "reusing", endpoint.name)
        endpoint, leftovers, promoted = self.remove_leftovers(hook, endpoint)
        previous_split = {str(k): int(v) for k, v in dict(endpoint.traffic_split).items()}
        previous_ids = [str(dm.id) for dm in endpoint.deployed_models if str(dm.id) != promoted]
        smoke: dict = {}
        share = 100

        if promoted:
            self.log.info("an earlier attempt already promoted version %s (deployed model %s): finishing", version,
                          promoted)
            new_id = promoted
        else:
            split = canary_traffic_split(previous_split, self.canary_traffic_percent)
            self.log.info("deploying %s with traffic split %s", self.model["model_resource_name"], split)
            response = self._wait(hook, hook.deploy_model(**self._where(), endpoint=endpoint_id,
                                                          deployed_model=self.deployed_model_spec(), traffic_split=split))
            new_id = str(response.deployed_model.id)
            share = split["0"]
            self._canary = (endpoint_id, new_id, previous_split)
            self.log.info("deployed model %s (version %s) takes %d %% of the traffic", new_id, version, share)
            try:
                smoke = self.smoke_test(endpoint_id, new_id, share)
                self.log.info("smoke test passed on deployed model %s: %s", new_id, smoke["predictions"])
                if share < 100:
                    from google.protobuf.field_mask_pb2 import FieldMask

                    hook.update_endpoint(**self._where(), endpoint_id=endpoint_id,
                                         endpoint={"traffic_split": {new_id: 100}},
                                         update_mask=FieldMask(paths=["traffic_split"]))
            except BaseException as e:
                self._rollback_after(hook, e, endpoint_id, new_id, version, previous_split)
            self._canary = None

        finished = self.finish_promotion(hook, endpoint_id, new_id)
        self.log.info("endpoint %s now serves version %s (deployed model %s) at 100 %%; undeployed %s",
                      endpoint_id, version, new_id, finished["undeployed"] or "nothing")
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
            "undeployed": finished["undeployed"],
            "leftovers_removed": leftovers,
            "default_alias": "default" in finished["version_aliases"],
            "instance_format": self.instance_format,
            "duration_s": round(time.monotonic() - t0, 2),
        }

    def _rollback_after(self, hook, error: BaseException, endpoint_id: str, new_id: str, version: str,
                        previous_split: dict[str, int]) -> None:
        """Roll the canary back after ``error`` and raise what the task should report."""
        self.log.error("rolling back deployed model %s after: %s", new_id, error)
        try:
            self.rollback(hook, endpoint_id, new_id, previous_split)
            self._canary = None
        except Exception as undeploy_error:
            raise AirflowException(
                f"model version {version} (deployed model {new_id}) failed ({error}); and undeploying it from "
                f"endpoint {endpoint_id} failed too: {undeploy_error}. The next attempt removes it first."
            ) from None
        kept = previous_split or "empty (no previous model)"
        if isinstance(error, SmokeTestFailed):
            raise AirflowFailException(
                f"smoke test of model version {version} (deployed model {new_id}) failed: {error}. Rolled back: "
                f"undeployed it; endpoint {endpoint_id} traffic stays {kept}"
            ) from None
        if isinstance(error, Exception):
            raise AirflowException(f"deploying model version {version} failed after DeployModel ({error}); rolled "
                                   f"back, endpoint {endpoint_id} traffic stays {kept}") from error
        raise error

"""The local platform's Vertex AI steps: same inputs and XCom outputs as the GCP operators.

- LocalCustomTrainingJobOperator: the training container's entrypoint as a process, with
  exactly the args and AIP_* environment Vertex AI custom training passes.
- LocalUploadModelOperator: a new Model Registry version under one parent, with aliases.
- LocalDeployModelOperator: get-or-create the endpoint, serve the new version on a spare
  port, smoke-test it over HTTP, then route the endpoint to it. A failed smoke test leaves
  the endpoint serving the previous version.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

from airflow.sdk.exceptions import AirflowException, AirflowFailException

from dual_deploy.hooks.gcs_io import GcsIO
from dual_deploy.hooks.local_vertex import LocalVertexHook
from dual_deploy.local_processes import ProcessFailed, child_env, run_streaming
from dual_deploy.operators.base import DictOutputOperator
from dual_deploy.smoke import SmokeTestFailed, smoke_test


class LocalCustomTrainingJobOperator(DictOutputOperator):
    """Run ``python -m dualml.trainer <args>`` as Vertex AI would run the trainer image.

    Environment: AIP_MODEL_DIR=<base_output_dir>/model/, AIP_CHECKPOINT_DIR=<base_output_dir>/checkpoints/,
    AIP_TENSORBOARD_LOG_DIR=<base_output_dir>/logs/, CLOUD_ML_JOB_ID. The trainer's output
    streams into the task log.

    XCom: ``{"model_dir", "metrics": {accuracy, macro_f1, per_class, confusion_matrix, labels, ...},
    "base_output_dir", "duration_s"}``.
    """

    template_fields: Sequence[str] = ("display_name", "args", "base_output_dir")
    ui_color = "#fce8b2"

    def __init__(self, *, display_name: str, args: list[str], base_output_dir: str, container_uri: str = "local",
                 python: str | None = None, environment: dict[str, str] | None = None,
                 timeout_s: float | None = 3600, gcp_conn_id: str = "google_cloud_default", **kwargs):
        super().__init__(**kwargs)
        self.display_name = display_name
        self.args = args
        self.base_output_dir = base_output_dir
        self.container_uri = container_uri
        self.python = python
        self.environment = environment or {}
        self.timeout_s = timeout_s
        self.gcp_conn_id = gcp_conn_id

    def execute(self, context) -> dict:
        t0 = time.monotonic()
        base = self.base_output_dir.rstrip("/")
        env = child_env({
            "AIP_MODEL_DIR": f"{base}/model/",
            "AIP_CHECKPOINT_DIR": f"{base}/checkpoints/",
            "AIP_TENSORBOARD_LOG_DIR": f"{base}/logs/",
            "CLOUD_ML_JOB_ID": self.display_name,
            **self.environment,
        })
        cmd = [self.python or sys.executable, "-m", "dualml.trainer", *[str(a) for a in self.args]]
        self.log.info("training job %s: %s", self.display_name, " ".join(cmd))
        try:
            rc = run_streaming(cmd, env, lambda line: self.log.info("[trainer] %s", line), self.timeout_s)
        except ProcessFailed as e:
            raise AirflowException(str(e)) from None
        if rc != 0:
            # Exit codes 2/3 are bad arguments/data: retrying cannot help.
            exc = AirflowFailException if rc in (2, 3) else AirflowException
            raise exc(f"training job {self.display_name} failed with exit code {rc}; see the [trainer] lines above")
        model_dir = f"{base}/model"
        metrics = GcsIO(self.gcp_conn_id).read_json(f"{model_dir}/metrics.json")
        self.log.info("test accuracy %.4f (macro F1 %.4f)", metrics["accuracy"], metrics["macro_f1"])
        return {
            "model_dir": model_dir,
            "base_output_dir": base,
            "metrics": metrics,
            "duration_s": round(time.monotonic() - t0, 2),
        }


class _LocalVertexMixin:
    def _hook(self) -> LocalVertexHook:
        return LocalVertexHook(
            bucket=self.local_bucket, state_dir=self.state_dir, host=self.host, base_port=self.base_port,
            gcp_conn_id=self.gcp_conn_id, python=self.python, bind_host=self.bind_host,
        )


class LocalUploadModelOperator(_LocalVertexMixin, DictOutputOperator):
    """Register ``artifact_uri`` as a new version of ``display_name`` (parent created on first run).

    XCom: ``{"model_id", "model_version_id", "model_resource_name", "version_aliases", "artifact_uri",
    "serving_container_image_uri", "duration_s"}``.
    """

    template_fields: Sequence[str] = ("display_name", "artifact_uri", "version_aliases")

    def __init__(self, *, display_name: str, artifact_uri: str, local_bucket: str, state_dir: str,
                 version_aliases: list[str] | None = None, serving_container_image_uri: str = "local/dualml-serving",
                 host: str = "127.0.0.1", base_port: int = 8501, python: str | None = None,
                 bind_host: str | None = None, gcp_conn_id: str = "google_cloud_default", **kwargs):
        super().__init__(**kwargs)
        self.display_name = display_name
        self.artifact_uri = artifact_uri
        self.version_aliases = version_aliases or []
        self.serving_container_image_uri = serving_container_image_uri
        self.local_bucket, self.state_dir, self.host, self.base_port = local_bucket, state_dir, host, base_port
        self.python, self.gcp_conn_id, self.bind_host = python, gcp_conn_id, bind_host

    def execute(self, context) -> dict:
        t0 = time.monotonic()
        container = {"image_uri": self.serving_container_image_uri, "predict_route": "/predict",
                     "health_route": "/health"}
        out = self._hook().upload_model(self.display_name, self.artifact_uri, container, self.version_aliases)
        model, version = out["model"], out["version"]
        self.log.info("registered %s version %s aliases=%s", model["name"], version["version_id"], version["aliases"])
        return {
            "model_id": model["model_id"],
            "model_version_id": version["version_id"],
            "model_resource_name": f"{model['name']}@{version['version_id']}",
            "version_aliases": version["aliases"],
            "artifact_uri": version["artifact_uri"],
            "serving_container_image_uri": self.serving_container_image_uri,
            "duration_s": round(time.monotonic() - t0, 2),
        }


class LocalDeployModelOperator(_LocalVertexMixin, DictOutputOperator):
    """Get-or-create the endpoint and deploy the registered version after a smoke test.

    XCom: ``{"endpoint_id", "endpoint_display_name", "endpoint_created", "prediction_url",
    "deployed_model_id", "model_version_id", "smoke_test", "duration_s"}``.
    """

    template_fields: Sequence[str] = ("endpoint_display_name", "model", "split_uri")

    def __init__(self, *, endpoint_display_name: str, model_display_name: str, model: dict, split_uri: str,
                 local_bucket: str, state_dir: str, smoke_instances: int = 2, startup_timeout_s: float = 180,
                 host: str = "127.0.0.1", base_port: int = 8501, python: str | None = None,
                 bind_host: str | None = None, gcp_conn_id: str = "google_cloud_default", **kwargs):
        super().__init__(**kwargs)
        self.endpoint_display_name = endpoint_display_name
        self.model_display_name = model_display_name
        self.model = model
        self.split_uri = split_uri
        self.smoke_instances = smoke_instances
        self.startup_timeout_s = startup_timeout_s
        self.local_bucket, self.state_dir, self.host, self.base_port = local_bucket, state_dir, host, base_port
        self.python, self.gcp_conn_id, self.bind_host = python, gcp_conn_id, bind_host

    def execute(self, context) -> dict:
        t0 = time.monotonic()
        hook = self._hook()
        registered = hook.get_model(self.model_display_name)
        version = next((v for v in (registered or {}).get("versions", [])
                        if v["version_id"] == str(self.model["model_version_id"])), None)
        if version is None:
            raise AirflowFailException(f"model {self.model_display_name} has no version {self.model['model_version_id']}")
        endpoint, created = hook.get_or_create_endpoint(self.endpoint_display_name)
        self.log.info("%s endpoint %s (port %s)", "created" if created else "reusing", endpoint["name"], endpoint["port"])

        name, base = hook.start_candidate(endpoint, version["artifact_uri"], self.startup_timeout_s)
        try:
            smoke = smoke_test(base + "/predict", self.split_uri, GcsIO(self.gcp_conn_id), self.smoke_instances)
        except SmokeTestFailed as e:
            raise AirflowFailException(
                f"smoke test of version {version['version_id']} failed, endpoint unchanged: {e}"
            ) from None
        finally:
            hook.stop(name)
        self.log.info("smoke test passed on the candidate: %s", smoke["predictions"])

        endpoint = hook.promote(endpoint, registered, version, self.startup_timeout_s)
        url = hook.url(endpoint)
        try:
            final = smoke_test(url, self.split_uri, GcsIO(self.gcp_conn_id), self.smoke_instances)
        except SmokeTestFailed as e:
            raise AirflowException(f"endpoint {url} failed its smoke test after promotion: {e}") from None
        self.log.info("endpoint %s now serves version %s", url, version["version_id"])
        return {
            "endpoint_id": endpoint["endpoint_id"],
            "endpoint_display_name": endpoint["display_name"],
            "endpoint_created": created,
            "prediction_url": url,
            "deployed_model_id": endpoint["deployed_models"][0]["id"],
            "model_version_id": version["version_id"],
            "smoke_test": final,
            "duration_s": round(time.monotonic() - t0, 2),
        }

"""Publish a validated .tflite to the mobile distribution channel."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence

from airflow.sdk.exceptions import AirflowFailException

from dual_deploy.hooks.firebase import FirebaseMLPublisherHook, FirebaseStoragePublisherHook
from dual_deploy.hooks.gcs_io import GcsIO
from dual_deploy.hooks.mobile_publisher import MobileModelPublisher
from dual_deploy.operators.base import DictOutputOperator

BACKENDS = ("firebase_storage", "firebase_ml")


class PublishMobileModelOperator(DictOutputOperator):
    """Create-or-update the mobile model ``display_name`` with ``tflite_uri`` and publish it.

    Runs only after the conversion task passed its validation thresholds (its upstream).
    ``backend``: ``firebase_storage`` (Cloud Storage for Firebase + a manifest, optionally a Remote
    Config parameter; locally the GCS emulator and the local server's Remote Config API) or
    ``firebase_ml`` (Firebase ML custom models; shuts down 2027-06-15). The Firebase backends use
    ``firebase_conn_id`` (a Google Cloud connection: keyfile JSON in its extras, or ADC),
    ``firebase_project`` and ``firebase_storage_bucket``; ``unlock_timeout_s`` bounds each wait for
    a locked Firebase ML model; ``remote_config_parameter`` names the client Remote Config
    parameter ``firebase_storage`` points at the new version (None: manifest only).
    See ``dual_deploy.hooks.firebase``.

    XCom: ``{"backend", "model_id", "display_name", "version", "tags", "published", "model_hash",
    "tflite_uri", "created", "duration_s"}``.
    """

    template_fields: Sequence[str] = ("display_name", "tflite_uri", "tags", "metadata")
    ui_color = "#ffe0b2"

    def __init__(self, *, display_name: str, tflite_uri: str, tags: list[str] | None = None, backend: str = "firebase_storage",
                 metadata: dict | None = None,
                 gcp_conn_id: str = "google_cloud_default", firebase_conn_id: str = "firebase_default",
                 firebase_project: str | None = None, firebase_storage_bucket: str | None = None,
                 unlock_timeout_s: float = 600, remote_config_parameter: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.display_name = display_name
        self.tflite_uri = tflite_uri
        self.tags = tags or []
        self.backend = backend
        self.metadata = metadata or {}
        self.gcp_conn_id = gcp_conn_id
        self.firebase_conn_id = firebase_conn_id
        self.firebase_project = firebase_project
        self.firebase_storage_bucket = firebase_storage_bucket
        self.unlock_timeout_s = unlock_timeout_s
        self.remote_config_parameter = remote_config_parameter

    def get_publisher(self) -> MobileModelPublisher:
        if self.backend not in BACKENDS:
            raise AirflowFailException(f"unknown mobile publishing backend {self.backend!r}; use one of {BACKENDS}")
        if not self.firebase_storage_bucket:
            raise AirflowFailException(
                f"backend {self.backend!r} needs firebase_storage_bucket (gcp.firebase_storage_bucket in the config)"
            )
        if self.backend == "firebase_ml":
            return FirebaseMLPublisherHook(
                firebase_conn_id=self.firebase_conn_id,
                firebase_project=self.firebase_project,
                storage_bucket=self.firebase_storage_bucket,
                unlock_timeout_s=self.unlock_timeout_s,
            )
        return FirebaseStoragePublisherHook(
            firebase_conn_id=self.firebase_conn_id,
            firebase_project=self.firebase_project,
            storage_bucket=self.firebase_storage_bucket,
            remote_config_parameter=self.remote_config_parameter,
        )

    def execute(self, context) -> dict:
        t0 = time.monotonic()
        publisher = self.get_publisher()
        with tempfile.TemporaryDirectory() as tmp:
            path = GcsIO(self.gcp_conn_id).download(self.tflite_uri, os.path.join(tmp, "model.tflite"))
            record = publisher.publish(self.display_name, path, list(self.tags), dict(self.metadata))
        self.log.info("%s mobile model %s (id %s) version %s", "created" if record["created"] else "updated",
                      self.display_name, record["model_id"], record["version"])
        return {"backend": self.backend, **record, "duration_s": round(time.monotonic() - t0, 2)}

"""Publish a validated .tflite to the mobile distribution channel."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence

from airflow.sdk.exceptions import AirflowFailException

from dual_deploy.hooks.gcs_io import GcsIO
from dual_deploy.hooks.mobile_publisher import LocalMobilePublisherHook, MobileModelPublisher
from dual_deploy.operators.base import DictOutputOperator


class PublishMobileModelOperator(DictOutputOperator):
    """Create-or-update the mobile model ``display_name`` with ``tflite_uri`` and publish it.

    Runs only after the conversion task passed its validation thresholds (its upstream).
    ``backend``: ``local`` (a bucket; the emulator locally), ``firebase_ml`` or
    ``firebase_storage`` (Firebase backends: see the GCP platform).

    XCom: ``{"backend", "model_id", "display_name", "version", "tags", "published", "model_hash",
    "tflite_uri", "created", "duration_s"}``.
    """

    template_fields: Sequence[str] = ("display_name", "tflite_uri", "tags", "metadata")
    ui_color = "#ffe0b2"

    def __init__(self, *, display_name: str, tflite_uri: str, tags: list[str] | None = None, backend: str = "local",
                 local_bucket: str | None = None, metadata: dict | None = None,
                 gcp_conn_id: str = "google_cloud_default", **kwargs):
        super().__init__(**kwargs)
        self.display_name = display_name
        self.tflite_uri = tflite_uri
        self.tags = tags or []
        self.backend = backend
        self.local_bucket = local_bucket
        self.metadata = metadata or {}
        self.gcp_conn_id = gcp_conn_id

    def get_publisher(self) -> MobileModelPublisher:
        if self.backend == "local":
            if not self.local_bucket:
                raise AirflowFailException("backend 'local' needs local_bucket")
            return LocalMobilePublisherHook(self.local_bucket, self.gcp_conn_id)
        raise AirflowFailException(
            f"mobile publishing backend {self.backend!r} is not available in this build; use 'local'"
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

"""Mobile model publishers: one interface, one backend per distribution channel.

Semantics follow Firebase ML custom models: a model is found by display name and
updated in place (never duplicated), carries tags, and is published so apps can
download it. Backends: ``local`` (this module: the .tflite and its metadata in a GCS
bucket, the emulator on the local platform), ``firebase_ml`` and ``firebase_storage``
(Firebase ML's successor) behind the same interface.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from datetime import UTC, datetime

from dual_deploy.hooks.gcs_io import GcsIO


class PublishError(RuntimeError):
    """Publishing failed; the message says which call and why."""


class MobileModelPublisher(ABC):
    """create-or-update by display name, then publish. Returns the published model's record:
    ``model_id``, ``display_name``, ``version``, ``tags``, ``published``, ``model_hash``,
    ``tflite_uri``, ``created`` (False when an existing model was updated).
    """

    @abstractmethod
    def publish(self, display_name: str, tflite_path: str, tags: list[str], metadata: dict | None = None) -> dict: ...

    @abstractmethod
    def get(self, display_name: str) -> dict | None: ...


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class LocalMobilePublisherHook(MobileModelPublisher):
    """Firebase-ML-like registry in a bucket: ``gs://<bucket>/mobile-models/<display_name>/``.

    ``model.json`` is the record apps would query; ``v<N>/model.tflite`` the versioned
    file; ``latest.json`` the pointer an app polls for updates.
    """

    def __init__(self, bucket: str, gcp_conn_id: str = "google_cloud_default"):
        self.io = GcsIO(gcp_conn_id)
        self.root = f"gs://{bucket}/mobile-models"

    def _record_uri(self, display_name: str) -> str:
        return f"{self.root}/{display_name}/model.json"

    def get(self, display_name: str) -> dict | None:
        uri = self._record_uri(display_name)
        return self.io.read_json(uri) if self.io.exists(uri) else None

    def publish(self, display_name: str, tflite_path: str, tags: list[str], metadata: dict | None = None) -> dict:
        now = datetime.now(UTC).isoformat(timespec="seconds")
        existing = self.get(display_name)
        record = existing or {
            "model_id": hashlib.sha256(display_name.encode()).hexdigest()[:12],
            "display_name": display_name,
            "create_time": now,
            "version": 0,
        }
        record["version"] += 1
        tflite_uri = f"{self.root}/{display_name}/v{record['version']}/model.tflite"
        self.io.upload_file(tflite_path, tflite_uri)
        record.update(
            tags=sorted(set(tags)),
            model_hash=file_sha256(tflite_path),
            tflite_uri=tflite_uri,
            published=True,
            update_time=now,
            metadata=metadata or {},
        )
        self.io.write_json(self._record_uri(display_name), record)
        self.io.write_json(f"{self.root}/{display_name}/latest.json",
                           {"version": record["version"], "tflite_uri": tflite_uri, "model_hash": record["model_hash"]})
        return {**record, "created": existing is None}

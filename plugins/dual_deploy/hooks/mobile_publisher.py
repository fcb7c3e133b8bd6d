"""Mobile model publishers: one interface, one backend per distribution channel.

Semantics follow Firebase ML custom models: a model is found by display name and
updated in place (never duplicated), carries tags, and is published so apps can
download it. Backends (``hooks/firebase.py``): ``firebase_storage`` (Cloud Storage for
Firebase + manifest: Firebase ML's successor) and ``firebase_ml``.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod


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

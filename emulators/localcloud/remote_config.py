"""Firebase Remote Config's REST template API, enough for publishers: one template per project, a
version number, and an ETag that a PUT must match (``If-Match``; ``*`` forces), as the real API
answers (412 on a stale ETag). Stored in the server's database."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime

from localcloud.store import Store


class RemoteConfig:
    def __init__(self, store: Store):
        self.store = store

    @staticmethod
    def _etag(project: str, version: int) -> str:
        return "etag-" + hashlib.sha256(f"{project}:{version}".encode()).hexdigest()[:16]

    def get(self, project: str) -> tuple[dict, str]:
        template = self.store.get_value(f"remote_config:{project}") or {
            "conditions": [], "parameters": {}, "parameterGroups": {}, "version": {"versionNumber": "0"},
        }
        return template, self._etag(project, int(template["version"]["versionNumber"]))

    def put(self, project: str, template: dict, if_match: str | None) -> tuple[int, dict, str | None]:
        with self.store.tx():
            current, etag = self.get(project)
            if not if_match:
                return 400, _error(400, "FAILED_PRECONDITION", "If-Match header is required"), None
            if if_match not in ("*", etag):
                return 412, _error(412, "FAILED_PRECONDITION",
                                   "Remote Config template changed since it was read (ETag mismatch)"), None
            if not isinstance(template, dict) or not isinstance(template.get("parameters", {}), dict):
                return 400, _error(400, "INVALID_ARGUMENT", "template.parameters must be an object"), None
            version = int(current["version"]["versionNumber"]) + 1
            stored = json.loads(json.dumps(template))
            stored["version"] = {"versionNumber": str(version), "updateOrigin": "REST_API", "updateType":
                                 "INCREMENTAL_UPDATE", "updateTime": datetime.now(UTC).isoformat()}
            self.store.set_value(f"remote_config:{project}", stored)
        return 200, stored, self._etag(project, version)


def _error(code: int, status: str, message: str) -> dict:
    return {"error": {"code": code, "message": message, "status": status}}

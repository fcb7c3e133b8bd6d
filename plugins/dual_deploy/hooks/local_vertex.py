"""A local stand-in for Vertex AI's Model Registry and Endpoints, kept in a GCS bucket.

Same semantics as Vertex: a model (by display name) has numbered versions; each upload
adds a version with aliases (an alias lives on one version at a time; ``default`` moves
to the newest version); endpoints are get-or-create by display name; deploying a version
routes 100 % of traffic to it. The deployed version is served by the project's serving app
as a background process (see local_processes.py); the endpoint's port never changes.
"""

from __future__ import annotations

import hashlib
import time
from datetime import UTC, datetime

from dual_deploy.hooks.gcs_io import GcsIO
from dual_deploy.local_processes import ServingProcesses, free_port, port_in_use


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _stable_id(kind: str, name: str) -> str:
    # Numeric like Vertex resource ids, stable per display name.
    return str(int(hashlib.sha256(f"{kind}:{name}".encode()).hexdigest()[:12], 16))


class LocalVertexHook:
    """Registry and endpoint records under ``gs://<bucket>/vertex-local/``."""

    def __init__(self, bucket: str, state_dir: str, host: str = "127.0.0.1", base_port: int = 8501,
                 gcp_conn_id: str = "google_cloud_default", python: str | None = None, project: str = "local-project",
                 region: str = "local", bind_host: str | None = None):
        self.io = GcsIO(gcp_conn_id)
        self.root = f"gs://{bucket}/vertex-local"
        self.host = host
        self.bind_host = bind_host or host
        self.base_port = base_port
        self.processes = ServingProcesses(state_dir, python)
        self.parent = f"projects/{project}/locations/{region}"

    # ---- Model Registry
    def _model_uri(self, display_name: str) -> str:
        return f"{self.root}/models/{display_name}.json"

    def get_model(self, display_name: str) -> dict | None:
        uri = self._model_uri(display_name)
        return self.io.read_json(uri) if self.io.exists(uri) else None

    def upload_model(self, display_name: str, artifact_uri: str, serving_container: dict,
                     version_aliases: list[str] | None = None, labels: dict | None = None,
                     version_description: str = "") -> dict:
        """Add a version (creating the model on first upload). Returns the model record and the new version."""
        model = self.get_model(display_name) or {
            "model_id": _stable_id("model", display_name),
            "display_name": display_name,
            "create_time": _now(),
            "versions": [],
        }
        model["name"] = f"{self.parent}/models/{model['model_id']}"
        aliases = list(dict.fromkeys(["default", *(version_aliases or [])]))
        for v in model["versions"]:
            v["aliases"] = [a for a in v["aliases"] if a not in aliases]
        version = {
            "version_id": str(len(model["versions"]) + 1),
            "artifact_uri": artifact_uri.rstrip("/"),
            "aliases": aliases,
            "labels": labels or {},
            "description": version_description,
            "serving_container": serving_container,
            "create_time": _now(),
        }
        model["versions"].append(version)
        model["update_time"] = _now()
        self.io.write_json(self._model_uri(display_name), model)
        return {"model": model, "version": version}

    # ---- Endpoints
    def _endpoint_uri(self, display_name: str) -> str:
        return f"{self.root}/endpoints/{display_name}.json"

    def list_endpoints(self) -> list[dict]:
        return [self.io.read_json(u) for u in self.io.list_files(f"{self.root}/endpoints") if u.endswith(".json")]

    def get_or_create_endpoint(self, display_name: str) -> tuple[dict, bool]:
        """Return (endpoint, created). Never creates a second endpoint with the same name."""
        uri = self._endpoint_uri(display_name)
        if self.io.exists(uri):
            return self.io.read_json(uri), False
        used = {e["port"] for e in self.list_endpoints()}
        port = next(p for p in range(self.base_port, self.base_port + 100) if p not in used)
        endpoint_id = _stable_id("endpoint", display_name)
        endpoint = {
            "endpoint_id": endpoint_id,
            "name": f"{self.parent}/endpoints/{endpoint_id}",
            "display_name": display_name,
            "port": port,
            "create_time": _now(),
            "deployed_models": [],
            "traffic_split": {},
        }
        self.io.write_json(uri, endpoint)
        return endpoint, True

    def url(self, endpoint: dict, route: str = "/predict") -> str:
        return f"http://{self.host}:{endpoint['port']}{route}"

    def start_candidate(self, endpoint: dict, model_uri: str, timeout_s: float) -> tuple[str, str]:
        """Serve ``model_uri`` on a spare port for smoke tests. Returns (process name, base URL)."""
        name = f"{endpoint['display_name']}-candidate"
        self.processes.stop(name)
        port = free_port(self.host)
        self.processes.start(name, model_uri, port, self.bind_host)
        base = f"http://{self.host}:{port}"
        self.processes.wait_healthy(name, base + "/health", timeout_s)
        return name, base

    def stop(self, name: str) -> None:
        self.processes.stop(name)

    def promote(self, endpoint: dict, model: dict, version: dict, timeout_s: float) -> dict:
        """Route all traffic to ``version``: replace the endpoint's server, then record it."""
        name = endpoint["display_name"]
        self.processes.stop(name)
        deadline = time.monotonic() + 15  # the old server may take a moment to release the port
        while port_in_use(endpoint["port"], self.host) and time.monotonic() < deadline:
            time.sleep(0.2)
        self.processes.start(name, version["artifact_uri"], endpoint["port"], self.bind_host,
                             extra_env={"MODEL_VERSION": version["version_id"]})
        self.processes.wait_healthy(name, self.url(endpoint, "/health"), timeout_s)
        deployed_id = _stable_id("deployed", f"{model['model_id']}@{version['version_id']}:{time.time()}")
        endpoint["deployed_models"] = [{
            "id": deployed_id,
            "model": model["name"],
            "model_version_id": version["version_id"],
            "artifact_uri": version["artifact_uri"],
            "create_time": _now(),
        }]
        endpoint["traffic_split"] = {deployed_id: 100}
        endpoint["update_time"] = _now()
        self.io.write_json(self._endpoint_uri(name), endpoint)
        return endpoint

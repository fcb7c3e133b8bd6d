"""The server's HTTP side (stdlib ThreadingHTTPServer, loopback only):

- Vertex AI REST prediction: ``POST /v1/projects/{p}/locations/{l}/endpoints/{e}:predict`` (and
  ``:rawPredict``), the URL a REST client of the cloud model calls; errors in Google's JSON form.
- Firebase Remote Config REST: ``GET``/``PUT /v1/projects/{p}/remoteConfig`` with ETag / If-Match,
  reached through ``FIREBASE_REMOTE_CONFIG_EMULATOR_HOST``.
- Admin for tests and scripts, under ``/localcloud/``: ``health``, ``state`` (every resource as JSON),
  ``faults`` (GET list, POST add, DELETE clear), ``customJobs/<id>:preempt`` and ``:fail``,
  ``trainingPipelines/<id>:fail``.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc

from localcloud import rules
from localcloud.errors import RpcError

log = logging.getLogger("localcloud.http")

_GRPC_TO_HTTP = {
    "INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "OUT_OF_RANGE": 400, "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403, "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "ABORTED": 409,
    "RESOURCE_EXHAUSTED": 429, "CANCELLED": 499, "INTERNAL": 500, "UNKNOWN": 500, "DATA_LOSS": 500,
    "UNIMPLEMENTED": 501, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504,
}
_PREDICT = re.compile(r"^/v1/(projects/[^/]+/locations/[^/]+/endpoints/[^/:]+):(predict|rawPredict)$")
_REMOTE_CONFIG = re.compile(r"^/v1/projects/([^/]+)/remoteConfig$")
_JOB_ACTION = re.compile(r"^/localcloud/customJobs/(.+):(preempt|fail)$")
_PIPELINE_FAIL = re.compile(r"^/localcloud/trainingPipelines/(.+):fail$")


def google_error(code: grpc.StatusCode | str, message: str) -> tuple[int, dict]:
    name = code.name if isinstance(code, grpc.StatusCode) else code
    status = _GRPC_TO_HTTP.get(name, 500)
    return status, {"error": {"code": status, "message": message, "status": name}}


class _Handler(BaseHTTPRequestHandler):
    server: HttpApi
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, fmt, *args):  # the server log, not stderr noise
        log.info("%s %s", self.address_string(), fmt % args)

    def _send(self, status: int, body, content_type: str = "application/json", headers: dict | None = None):
        data = body if isinstance(body, bytes) else json.dumps(body, indent=1).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes | None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            self._send(*google_error("INVALID_ARGUMENT", "invalid Content-Length"))
            return None
        if length > rules.MAX_PREDICT_REQUEST_BYTES + 65536:
            self.close_connection = True
            self._send(*google_error("INVALID_ARGUMENT", f"Request payload size exceeds the limit: "
                                                         f"{rules.MAX_PREDICT_REQUEST_BYTES} bytes"))
            return None
        return self.rfile.read(length) if length else b""

    def _json(self, body: bytes):
        try:
            return json.loads(body or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            self._send(*google_error("INVALID_ARGUMENT", f"Invalid JSON payload received: {e}"))
            return None

    def _guard(self, fn):
        try:
            fn()
        except RpcError as e:
            self._send(*google_error(e.code, e.message))
        except Exception as e:  # noqa: BLE001 - the server keeps serving
            log.exception("HTTP %s %s failed", self.command, self.path)
            self._send(*google_error("INTERNAL", f"local cloud server error: {e}"))

    # ---- routes
    def do_GET(self):  # noqa: N802
        self._guard(self._get)

    def do_POST(self):  # noqa: N802
        self._guard(self._post)

    def do_PUT(self):  # noqa: N802
        self._guard(self._put)

    def do_DELETE(self):  # noqa: N802
        self._guard(self._delete)

    def _get(self):
        api = self.server.api
        path = self.path.split("?", 1)[0]
        if path == "/localcloud/health":
            return self._send(200, {"ok": True, "grpc": f"{api.cfg.host}:{api.cfg.grpc_port}",
                                    "state_dir": str(api.cfg.state_dir)})
        if path == "/localcloud/state":
            return self._send(200, api.state())
        if path == "/localcloud/faults":
            return self._send(200, {"faults": api.faults.list()})
        m = _REMOTE_CONFIG.match(path)
        if m:
            template, etag = api.remote_config.get(m[1])
            return self._send(200, template, headers={"ETag": etag})
        self._send(*google_error("NOT_FOUND", f"no route {path}"))

    def _post(self):
        api = self.server.api
        path = self.path.split("?", 1)[0]
        body = self._body()
        if body is None:
            return
        m = _PREDICT.match(path)
        if m:
            endpoint, verb = m[1], m[2]
            if verb == "rawPredict":
                d, status, data, ctype = api.prediction.call(endpoint, body,
                                                             self.headers.get("Content-Type", "application/json"))
                return self._send(status, data, ctype, {"X-Vertex-AI-Deployed-Model-Id": d.id})
            payload = self._json(body)
            if payload is None:
                return
            if not isinstance(payload, dict) or not isinstance(payload.get("instances"), list):
                return self._send(*google_error("INVALID_ARGUMENT", '"instances" must be a list'))
            out = api.prediction.predict_dict(endpoint, payload["instances"], payload.get("parameters"), len(body))
            return self._send(200, out)
        if path == "/localcloud/faults":
            rule = self._json(body)
            if rule is None:
                return
            try:
                added = api.faults.add(**rule)
            except (TypeError, ValueError) as e:
                return self._send(*google_error("INVALID_ARGUMENT", f"bad fault rule: {e}"))
            return self._send(200, {"id": added.id})
        m = _JOB_ACTION.match(path)
        if m:
            name = m[1] if m[1].startswith("projects/") else api.find_job(m[1])
            if m[2] == "preempt":
                api.jobs.preempt(name)
            else:
                args = self._json(body) or {}
                api.jobs.fail(name, args.get("message", "injected failure"))
            return self._send(200, {"name": name, "action": m[2]})
        m = _PIPELINE_FAIL.match(path)
        if m:
            name = m[1] if m[1].startswith("projects/") else api.find_pipeline(m[1])
            api.pipelines.fail(name, (self._json(body) or {}).get("message", "injected failure"))
            return self._send(200, {"name": name, "action": "fail"})
        self._send(*google_error("NOT_FOUND", f"no route {path}"))

    def _put(self):
        api = self.server.api
        body = self._body()
        if body is None:
            return
        m = _REMOTE_CONFIG.match(self.path.split("?", 1)[0])
        if not m:
            return self._send(*google_error("NOT_FOUND", f"no route {self.path}"))
        template = self._json(body)
        if template is None:
            return
        status, out, etag = api.remote_config.put(m[1], template, self.headers.get("If-Match"))
        self._send(status, out, headers={"ETag": etag} if etag else None)

    def _delete(self):
        if self.path.split("?", 1)[0] == "/localcloud/faults":
            self.server.api.faults.clear()
            return self._send(200, {"faults": []})
        self._send(*google_error("NOT_FOUND", f"no route {self.path}"))


class HttpApi(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, api, host: str, port: int):
        super().__init__((host, port), _Handler)
        self.api = api
        self._thread = threading.Thread(target=self.serve_forever, name="http-api", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def to_json(message) -> dict:
    return type(message).to_dict(message)


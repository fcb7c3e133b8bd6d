"""A stand-in serving container for tests of the deploy path: honours Vertex's AIP_HTTP_PORT,
AIP_HEALTH_ROUTE, AIP_PREDICT_ROUTE and AIP_STORAGE_URI, answers ``{"predictions": [...]}`` with
one prediction per instance, instantly (no TensorFlow). Its behaviour is read from the model's
artifact URI, so each registered version can behave differently:

- ``.../bad-labels...``: answers a label that is not one of the model's classes (smoke test fails);
- ``.../slow...``: each prediction takes 2 s (a window to crash a deploy in);
- ``.../unhealthy...``: the health route never answers 200 (DeployModel fails);
- anything else: label ``daisy`` with confidence 0.9.
"""

import json
import os
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

URI = os.environ.get("AIP_STORAGE_URI", "")
HEALTH = os.environ.get("AIP_HEALTH_ROUTE", "/health")
PREDICT = os.environ.get("AIP_PREDICT_ROUTE", "/predict")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _send(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802
        if self.path == HEALTH:
            return self._send(503 if "unhealthy" in URI else 200, {"ready": "unhealthy" not in URI})
        self._send(404, {"error": "not found"})

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        if self.path != PREDICT:
            return self._send(404, {"error": "not found"})
        if "slow" in URI:
            time.sleep(2)
        label = "not-a-class" if "bad-labels" in URI else "daisy"
        n = len(body.get("instances", []))
        self._send(200, {"predictions": [{"label": label, "confidence": 0.9, "class_index": 0}] * n})


ThreadingHTTPServer(("127.0.0.1", int(os.environ["AIP_HTTP_PORT"])), Handler).serve_forever()

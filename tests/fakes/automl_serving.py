"""A stand-in for the AutoML serving image (``python -m dualml.automl.serve``) in tests that deploy the
fake search's placeholder model: Vertex's AutoML image classification request/response format, no
TensorFlow. Every instance is classified as the first label of the model's ``annotation_specs.json``
(in ``AIP_STORAGE_URI``) with confidence 0.9; an instance without ``content`` gets a 400.
"""

import json
import os
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SPECS = json.load(open(os.path.join(os.environ["AIP_STORAGE_URI"], "annotation_specs.json")))


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _send(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802
        self._send(200, {"status": "ok"})

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        instances = body.get("instances") or []
        if not instances or any(not isinstance(i, dict) or not i.get("content") for i in instances):
            return self._send(400, {"error": 'each instance must be {"content": "<base64 image>"}'})
        names = [s["displayName"] for s in SPECS]
        rest = (1 - 0.9) / max(1, len(names) - 1)
        self._send(200, {"predictions": [{"ids": [str(s["id"]) for s in SPECS], "displayNames": names,
                                          "confidences": [0.9] + [rest] * (len(names) - 1)} for _ in instances]})


server = ThreadingHTTPServer(("127.0.0.1", int(os.environ["AIP_HTTP_PORT"])), Handler)
signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
print("serving", flush=True)
server.serve_forever()
sys.exit(0)

"""A stand-in model server honouring Vertex AI's custom serving container contract (stdlib only).

Tests deploy it instead of the real serving app (which needs a trained SavedModel and TensorFlow):
a Model whose ``container_spec.command`` is ``[sys.executable, localcloud.stand_in_model.__file__]``
starts in a fraction of a second. It listens on ``AIP_HTTP_PORT``, answers ``AIP_HEALTH_ROUTE`` and
``AIP_PREDICT_ROUTE`` (``{"instances": [...]}`` -> one prediction per instance) and stops cleanly on
SIGTERM. Behaviour is set through the container's environment (``container_spec.env``):

- ``STAND_IN_LABEL``: the label every prediction carries (default ``daisy``);
- ``STAND_IN_VERSION``: a marker echoed in every prediction (default: ``AIP_STORAGE_URI``);
- ``STAND_IN_READY_AFTER_S``: the health route answers 503 for this long after start;
- ``STAND_IN_HEALTH=fail``: the health route never answers 200; ``exit``: exit 1 at start;
- ``STAND_IN_PREDICT_DELAY_S``: sleep this long in every predict call;
- ``STAND_IN_PREDICT_STATUS``: answer predict calls with this HTTP status (an error body).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STARTED = time.monotonic()


def _env_float(name: str) -> float:
    return float(os.environ.get(name) or 0)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # the container log: one line per request is enough
        sys.stdout.write(f"{self.command} {fmt % args}\n")
        sys.stdout.flush()

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802
        if self.path != os.environ["AIP_HEALTH_ROUTE"]:
            return self._send(404, {"error": f"no route {self.path}"})
        healthy = (os.environ.get("STAND_IN_HEALTH") != "fail"
                   and time.monotonic() - STARTED >= _env_float("STAND_IN_READY_AFTER_S"))
        self._send(200 if healthy else 503, {"healthy": healthy})

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path != os.environ["AIP_PREDICT_ROUTE"]:
            return self._send(404, {"error": f"no route {self.path}"})
        time.sleep(_env_float("STAND_IN_PREDICT_DELAY_S"))
        status = int(os.environ.get("STAND_IN_PREDICT_STATUS") or 200)
        if status != 200:
            return self._send(status, {"error": f"stand-in model told to answer {status}"})
        try:
            instances = json.loads(body)["instances"]
        except (ValueError, KeyError, TypeError):
            return self._send(400, {"error": "expected {\"instances\": [...]}"})
        version = os.environ.get("STAND_IN_VERSION") or os.environ.get("AIP_STORAGE_URI", "")
        label = os.environ.get("STAND_IN_LABEL", "daisy")
        self._send(200, {"predictions": [
            {"label": label, "confidence": 0.9, "version": version, "deployed_model_id": os.environ.get("AIP_DEPLOYED_MODEL_ID", ""),
             "pid": os.getpid(), "index": i}
            for i, _ in enumerate(instances)
        ]})


def main() -> int:
    if os.environ.get("STAND_IN_HEALTH") == "exit":
        print("stand-in model told to exit at start", flush=True)
        return 1
    server = ThreadingHTTPServer(("127.0.0.1", int(os.environ["AIP_HTTP_PORT"])), Handler)
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(f"stand-in model listening on {server.server_address[1]}", flush=True)
    server.serve_forever()
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m dualml.automl.serve``: online prediction for a deployed AutoML image classification model.

On Vertex AI an AutoML model is served by Google (it has no container of its own); locally the
Vertex AI server runs this for it with Vertex's serving environment (``AIP_HTTP_PORT``,
``AIP_PREDICT_ROUTE``, ``AIP_HEALTH_ROUTE``, ``AIP_STORAGE_URI`` = the model's SavedModel, see
``dualml.automl.export``). Request and answer are Vertex's AutoML image classification formats::

    {"instances": [{"content": "<base64 JPEG/PNG>"}], "parameters": {"confidenceThreshold": 0.5, "maxPredictions": 5}}
    -> {"predictions": [{"ids": ["<annotation spec id>", ...], "displayNames": ["daisy", ...],
                         "confidences": [0.97, ...]}]}    # best first

The health route answers 503 until the model is loaded, then 200. Malformed requests get a 400 that
says what is wrong.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger("dualml.automl.serve")
DEFAULT_MAX_PREDICTIONS = 10  # ImageClassificationPredictionParams defaults
DEFAULT_CONFIDENCE_THRESHOLD = 0.0
MAX_INSTANCES = 64
EXPECTED = '{"instances": [{"content": "<base64-encoded JPEG or PNG>"}], "parameters": {...}}'


class BadRequest(ValueError):
    pass


class Model:
    def __init__(self, model_dir: str):
        import tensorflow as tf

        from dualml.automl.export import SPECS_FILE

        self._tf = tf
        self._loaded = tf.saved_model.load(model_dir)
        self._fn = self._loaded.signatures["serving_default"]
        with open(os.path.join(model_dir, SPECS_FILE)) as f:
            self.ids = {s["displayName"]: str(s["id"]) for s in json.load(f)}

    def predict(self, images: list[bytes], threshold: float, top: int) -> list[dict]:
        tf = self._tf
        try:
            out = self._fn(image_bytes=tf.constant(images), key=tf.constant([str(i) for i in range(len(images))]))
        except tf.errors.InvalidArgumentError as e:
            raise BadRequest(f"an instance is not a decodable image (JPEG or PNG expected): {e.message[:200]}") from None
        scores, names = out["scores"].numpy(), out["labels"].numpy()
        answers = []
        for row, row_names in zip(scores, names, strict=True):
            ranked = sorted(zip(row.tolist(), (n.decode() for n in row_names), strict=True), reverse=True)
            kept = [(c, n) for c, n in ranked if c >= threshold][:top]
            answers.append({"ids": [self.ids.get(n, "") for _, n in kept], "displayNames": [n for _, n in kept],
                            "confidences": [c for c, _ in kept]})
        return answers


def parse_request(body: bytes) -> tuple[list[bytes], float, int]:
    try:
        payload = json.loads(body or b"")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"request body is not valid JSON ({e}); expected {EXPECTED}") from None
    instances = payload.get("instances") if isinstance(payload, dict) else None
    if not isinstance(instances, list) or not instances:
        raise BadRequest(f'"instances" must be a non-empty list; expected {EXPECTED}')
    if len(instances) > MAX_INSTANCES:
        raise BadRequest(f"{len(instances)} instances; at most {MAX_INSTANCES} per request")
    images = []
    for i, inst in enumerate(instances):
        content = inst.get("content") if isinstance(inst, dict) else None
        if not isinstance(content, str) or not content:
            raise BadRequest(f'instance {i} has no "content" (the base64-encoded image); expected {EXPECTED}')
        try:
            images.append(base64.b64decode("".join(content.split()), validate=True))
        except (binascii.Error, ValueError) as e:
            raise BadRequest(f'instance {i}: "content" is not valid base64 ({e})') from None
    params = payload.get("parameters") or {}
    if not isinstance(params, dict):
        raise BadRequest('"parameters" must be an object')
    try:
        threshold = float(params.get("confidenceThreshold", DEFAULT_CONFIDENCE_THRESHOLD))
        top = int(params.get("maxPredictions", DEFAULT_MAX_PREDICTIONS))
    except (TypeError, ValueError):
        raise BadRequest("parameters.confidenceThreshold must be a number and maxPredictions an integer") from None
    if not 0.0 <= threshold <= 1.0 or top < 1:
        raise BadRequest("parameters: confidenceThreshold must be within [0, 1] and maxPredictions at least 1")
    return images, threshold, top


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int, predict_route: str, health_route: str):
        super().__init__(("127.0.0.1", port), Handler)
        self.predict_route, self.health_route = predict_route, health_route
        self.model: Model | None = None


class Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        log.info("%s %s", self.address_string(), fmt % args)

    def _send(self, status: int, body: dict, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802
        if self.path.split("?")[0] != self.server.health_route:
            return self._send(404, {"error": f"no route {self.path}"})
        if self.server.model is None:
            return self._send(503, {"status": "loading"}, {"Retry-After": "1"})
        self._send(200, {"status": "ok"})

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.split("?")[0] != self.server.predict_route:
            return self._send(404, {"error": f"no route {self.path}"})
        if self.server.model is None:
            return self._send(503, {"error": "the model is loading"}, {"Retry-After": "1"})
        try:
            images, threshold, top = parse_request(body)
            self._send(200, {"predictions": self.server.model.predict(images, threshold, top)})
        except BadRequest as e:
            self._send(400, {"error": str(e)})


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    env = os.environ
    model_dir = env.get("AIP_STORAGE_URI", "")
    if not os.path.isdir(model_dir):
        log.error("AIP_STORAGE_URI=%r is not a local model folder", model_dir)
        return 2
    server = Server(int(env.get("AIP_HTTP_PORT", "8080")), env.get("AIP_PREDICT_ROUTE", "/predict"),
                    env.get("AIP_HEALTH_ROUTE", "/health"))

    def load():
        try:
            server.model = Model(model_dir)
            log.info("serving %s on port %d", model_dir, server.server_address[1])
        except Exception:
            log.exception("cannot load the model in %s", model_dir)
            os._exit(3)

    threading.Thread(target=load, daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())

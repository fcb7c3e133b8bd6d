"""HTTP prediction server implementing Vertex AI's custom serving container contract.

``python -m dualml.serving [--model-dir DIR|gs://...] [--port N] ...``

Environment (set by Vertex AI; CLI flags override them):

- ``AIP_HTTP_PORT`` (8080), ``AIP_PREDICT_ROUTE`` (``/predict``), ``AIP_HEALTH_ROUTE`` (``/health``)
- ``AIP_STORAGE_URI``: gs:// or local directory with the exported SavedModel and labels.txt
  (gs:// is downloaded to a temp dir first, through dualml.storage / STORAGE_EMULATOR_HOST)
- ``MODEL_VERSION`` / ``AIP_DEPLOYED_MODEL_ID``: reported as ``model.version`` when the model
  directory has no ``model_version.txt``
- ``SERVING_MAX_INSTANCES`` (64), ``SERVING_MAX_BODY_BYTES`` (1.5 MiB, Vertex's online request
  limit), ``SERVING_MAX_IMAGE_PIXELS`` (40e6, 0 = no limit)

The model is loaded (and warmed up) before the port is opened, so the health route answers 200
only when predictions can be served. Standard library only (http.server); never imports Airflow.
Request and response formats: see dualml.serving.protocol.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Protocol
from urllib.parse import urlsplit

from dualml.serving.protocol import EXPECTED_FORMAT, RequestError, error_json, parse_predict_body

log = logging.getLogger("dualml.serving")

DEFAULT_MAX_INSTANCES = 64
DEFAULT_MAX_BODY_BYTES = 1536 * 1024  # Vertex AI online prediction: 1.5 MB per request
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
DRAIN_LIMIT = 64 * 1024 * 1024  # read (and drop) oversized bodies up to this so the client sees the 413
SOCKET_TIMEOUT_S = 60


class PredictorLike(Protocol):
    labels: list[str]
    version: str | None

    def check_image(self, data: bytes) -> str | None: ...

    def predict(self, images: list[bytes]) -> list[dict]: ...


def _route(path: str) -> str:
    path = urlsplit(path).path or "/"
    return path.rstrip("/") or "/"


class PredictionHandler(BaseHTTPRequestHandler):
    """One instance per request; configuration lives on ``self.server``."""

    server: PredictionServer
    protocol_version = "HTTP/1.1"  # keep-alive for Vertex's proxy: every response sends Content-Length
    server_version = "dualml-serving/1"
    timeout = SOCKET_TIMEOUT_S
    # Headers and body go out as two writes; with Nagle + delayed ACK a keep-alive client waited
    # ~40 ms for the body on every response (measured by `make bench`: /health 44 ms -> <1 ms).
    disable_nagle_algorithm = True

    # --- bookkeeping for the one-line request log -------------------------------------------
    def handle_one_request(self):
        self._status = None
        self._instances = None
        self._t0 = time.perf_counter()
        self._body_read = False
        try:
            super().handle_one_request()
        finally:
            if self._status is not None:
                ms = (time.perf_counter() - self._t0) * 1000
                log.info(
                    "%s %s %s instances=%s ms=%.1f",
                    getattr(self, "command", None) or "-",
                    _route(getattr(self, "path", "") or "-"),
                    self._status,
                    "-" if self._instances is None else self._instances,
                    ms,
                )

    def parse_request(self):
        self._t0 = time.perf_counter()  # the request line is in: don't count keep-alive idle time
        return super().parse_request()

    def send_response(self, code, message=None):
        self._status = int(code)
        super().send_response(code, message)

    def log_request(self, code="-", size="-"):  # replaced by the line in handle_one_request
        pass

    def log_message(self, format, *args):
        log.debug("%s - %s", self.address_string(), format % args)

    # --- responses ---------------------------------------------------------------------------
    def _send_json(self, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
        if not self._body_read and self._has_body():
            # Unread request body on a keep-alive connection would be parsed as the next request.
            self.close_connection = True
        body = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_error(self, code, message=None, explain=None):
        """Errors raised by http.server itself (bad request line, unsupported method...) as JSON."""
        try:
            short, long = self.responses[code]
        except KeyError:
            short, long = "error", ""
        self.close_connection = True
        msg = message or explain or long or short
        if code == HTTPStatus.NOT_IMPLEMENTED:
            msg = f"method {getattr(self, 'command', '?')} is not supported; use POST for predictions"
        body = json.dumps(error_json(msg)).encode("utf-8")
        self.send_response(code, short)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if getattr(self, "command", None) != "HEAD" and code >= 200 and code not in (204, 304):
            self.wfile.write(body)

    # --- request body --------------------------------------------------------------------------
    def _has_body(self) -> bool:
        headers = getattr(self, "headers", None)
        if headers is None:
            return False
        if headers.get("Transfer-Encoding"):
            return True
        try:
            return int(headers.get("Content-Length") or 0) > 0
        except ValueError:
            return True

    def _drain(self, length: int) -> None:
        if length > DRAIN_LIMIT:
            self.close_connection = True
            return
        remaining = length
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, 65536))
            if not chunk:
                break
            remaining -= len(chunk)
        self._body_read = True

    def _read_body(self) -> bytes:
        limit = self.server.max_body_bytes
        te = self.headers.get("Transfer-Encoding")
        if te and te.strip().lower() != "identity":
            raise RequestError(
                411,
                f"Transfer-Encoding {te} is not supported: send the JSON body with a Content-Length header",
            )
        raw = self.headers.get("Content-Length")
        if raw is None:
            raise RequestError(411, f"missing Content-Length header; POST a JSON body like {EXPECTED_FORMAT}")
        try:
            length = int(raw)
            if length < 0:
                raise ValueError(raw)
        except ValueError:
            raise RequestError(400, f"invalid Content-Length header {raw!r}") from None
        if length > limit:
            self._drain(length)
            raise RequestError(
                413,
                f"request body too large: {length} bytes, the limit is {limit} bytes; "
                "send fewer or smaller images per request",
            )
        try:
            data = self.rfile.read(length)
        except TimeoutError:
            self.close_connection = True
            raise RequestError(
                408, f"timed out after {self.timeout} s waiting for the {length}-byte request body"
            ) from None
        self._body_read = True
        if len(data) < length:
            self.close_connection = True
            raise RequestError(400, f"request body ended after {len(data)} of {length} bytes")
        return data

    # --- routing -------------------------------------------------------------------------------
    def _dispatch(self, method: str) -> None:
        route = _route(self.path)
        srv = self.server
        try:
            if route == srv.health_route:
                if method in ("GET", "HEAD"):
                    self._health()
                else:
                    self._send_json(
                        405,
                        error_json(f"method {method} not allowed on {srv.health_route}; use GET"),
                        {"Allow": "GET, HEAD"},
                    )
            elif route == srv.predict_route:
                if method == "POST":
                    self._predict()
                else:
                    self._send_json(
                        405,
                        error_json(
                            f"method {method} not allowed on {srv.predict_route}; "
                            f"use POST with a JSON body like {EXPECTED_FORMAT}"
                        ),
                        {"Allow": "POST"},
                    )
            else:
                self._send_json(
                    404,
                    error_json(
                        f"unknown route {route}; use POST {srv.predict_route} for predictions "
                        f"and GET {srv.health_route} for health"
                    ),
                )
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # a bug must not kill the server
            log.exception("unhandled error on %s %s", method, route)
            self.close_connection = True
            if self._status is None:
                try:
                    self._send_json(500, error_json(f"internal server error: {type(e).__name__}: {e}"))
                except OSError:
                    pass

    def _health(self) -> None:
        srv = self.server
        self._send_json(
            200,
            {
                "status": "ok",
                "model": {"labels": srv.predictor.labels, "version": srv.predictor.version},
                "predict_route": srv.predict_route,
                "uptime_s": round(time.monotonic() - srv.started_at, 1),
            },
        )

    def _predict(self) -> None:
        srv = self.server
        predictor = srv.predictor
        try:
            images = parse_predict_body(self._read_body(), srv.max_instances)
            self._instances = len(images)
            problems = [
                f"instance {i}: {p}" for i, data in enumerate(images) if (p := predictor.check_image(data))
            ]
            if problems:
                raise RequestError(400, "; ".join(problems))
        except RequestError as e:
            self._send_json(e.status, error_json(e.message))
            return
        try:
            predictions = predictor.predict(images)
        except Exception as e:  # report, keep serving
            log.exception("prediction failed for %d instance(s)", len(images))
            self._send_json(500, error_json(f"internal error while predicting: {type(e).__name__}: {e}"))
            return
        self._send_json(
            200,
            {"predictions": predictions, "model": {"labels": predictor.labels, "version": predictor.version}},
        )

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_PATCH(self):
        self._dispatch("PATCH")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def do_OPTIONS(self):
        self._dispatch("OPTIONS")


class PredictionServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # listen backlog: bursts from Vertex's front end must not be refused

    def __init__(
        self,
        address: tuple[str, int],
        predictor: PredictorLike,
        *,
        predict_route: str = "/predict",
        health_route: str = "/health",
        max_instances: int = DEFAULT_MAX_INSTANCES,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ):
        self.predictor = predictor
        self.predict_route = _route(predict_route)
        self.health_route = _route(health_route)
        self.max_instances = max_instances
        self.max_body_bytes = max_body_bytes
        self.started_at = time.monotonic()
        super().__init__(address, PredictionHandler)


# --- command line ------------------------------------------------------------------------------


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise SystemExit(f"environment variable {name}={raw!r} is not an integer") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dualml.serving",
        description="Serve the exported image classifier over HTTP (Vertex AI custom container contract).",
    )
    p.add_argument(
        "--model-dir",
        default=os.environ.get("AIP_STORAGE_URI"),
        help="gs:// or local directory with saved_model.pb + labels.txt (default: $AIP_STORAGE_URI)",
    )
    p.add_argument("--host", default=os.environ.get("SERVING_HOST", "0.0.0.0"), help="bind address (0.0.0.0)")
    p.add_argument(
        "--port", type=int, default=_env_int("AIP_HTTP_PORT", 8080), help="port ($AIP_HTTP_PORT, 8080)"
    )
    p.add_argument(
        "--predict-route",
        default=os.environ.get("AIP_PREDICT_ROUTE") or "/predict",
        help="POST route for predictions ($AIP_PREDICT_ROUTE, /predict)",
    )
    p.add_argument(
        "--health-route",
        default=os.environ.get("AIP_HEALTH_ROUTE") or "/health",
        help="GET route for health checks ($AIP_HEALTH_ROUTE, /health)",
    )
    p.add_argument(
        "--max-instances",
        type=int,
        default=_env_int("SERVING_MAX_INSTANCES", DEFAULT_MAX_INSTANCES),
        help=f"most images per request ({DEFAULT_MAX_INSTANCES})",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=_env_int("SERVING_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES),
        help=f"largest request body in bytes ({DEFAULT_MAX_BODY_BYTES}, Vertex's 1.5 MB online limit)",
    )
    p.add_argument(
        "--max-image-pixels",
        type=int,
        default=_env_int("SERVING_MAX_IMAGE_PIXELS", DEFAULT_MAX_IMAGE_PIXELS),
        help=f"largest decoded image, width*height ({DEFAULT_MAX_IMAGE_PIXELS}; 0 = no limit)",
    )
    p.add_argument(
        "--model-version",
        default=None,
        help="version reported in responses (default: model_version.txt, $MODEL_VERSION, $AIP_DEPLOYED_MODEL_ID)",
    )
    p.add_argument("--log-level", default=os.environ.get("SERVING_LOG_LEVEL", "INFO"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.model_dir:
        log.error("no model: set AIP_STORAGE_URI or pass --model-dir (gs:// or a local directory)")
        return 2
    for name in ("max_instances", "max_body_bytes"):
        if getattr(args, name) < 1:
            log.error("--%s must be >= 1, got %s", name.replace("_", "-"), getattr(args, name))
            return 2

    # SIGTERM (Vertex undeploy, docker stop) -> leave serve_forever and clean up.
    def _stop(signum, frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _stop)

    from dualml.serving.model import ModelLoadError, Predictor, fetch_model_dir

    t0 = time.perf_counter()
    tmp_dir = None
    server = None
    try:
        try:
            local_dir, tmp_dir = fetch_model_dir(args.model_dir)
            predictor = Predictor(
                local_dir, version=args.model_version, max_image_pixels=args.max_image_pixels
            )
        except (ModelLoadError, OSError, RuntimeError, ValueError) as e:
            log.error("cannot load the model from %s: %s", args.model_dir, e)
            return 1
        log.info(
            "loaded model from %s in %.1f s: %d labels (%s), version %s",
            args.model_dir,
            time.perf_counter() - t0,
            len(predictor.labels),
            ", ".join(predictor.labels),
            predictor.version,
        )
        try:
            server = PredictionServer(
                (args.host, args.port),
                predictor,
                predict_route=args.predict_route,
                health_route=args.health_route,
                max_instances=args.max_instances,
                max_body_bytes=args.max_body_bytes,
            )
        except OSError as e:
            log.error("cannot listen on %s:%s: %s", args.host, args.port, e)
            return 1
        log.info(
            "listening on http://%s:%d  POST %s  GET %s  (max %d instances, %d body bytes)",
            args.host,
            server.server_address[1],
            server.predict_route,
            server.health_route,
            server.max_instances,
            server.max_body_bytes,
        )
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        return 0
    finally:
        if server is not None:
            log.info("shutting down")
            server.server_close()
        if tmp_dir:
            shutil.rmtree(tmp_dir, ignore_errors=True)

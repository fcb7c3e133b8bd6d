"""``python -m dualml.serving``: Vertex AI's custom-container contract, served by uvicorn.

Environment (set by Vertex AI; the flags of ``--help`` override them):

- ``AIP_HTTP_PORT`` (8080), ``AIP_PREDICT_ROUTE`` (``/predict``), ``AIP_HEALTH_ROUTE`` (``/health``)
- ``AIP_STORAGE_URI``: gs:// or local directory with the exported SavedModel and labels.txt
  (from gs:// only the serving files are downloaded, through dualml.storage / STORAGE_EMULATOR_HOST)
- ``MODEL_VERSION`` / ``AIP_DEPLOYED_MODEL_ID``: the ``X-Model-Version`` response header when the
  model directory has no ``model_version.txt``
- ``SERVING_MAX_BATCH_SIZE`` (8), ``SERVING_BATCH_TIMEOUT_MS`` (5), ``SERVING_BATCH_THREADS`` (2):
  dynamic batching (most instances per model call, longest wait for more, model calls at a time)
- ``SERVING_MAX_CONCURRENT_REQUESTS`` (64): predict requests admitted at once, then 503
- ``SERVING_MAX_INSTANCES`` (64), ``SERVING_MAX_BODY_BYTES`` (1.5 MiB, Vertex's online request
  limit), ``SERVING_MAX_IMAGE_PIXELS`` (40e6, 0 = no limit)
- ``SERVING_INTRA_OP_THREADS`` (0: TensorFlow's default, one per core): threads one op may use
- ``SERVING_MODEL_NICE`` (5): the model's threads run that much nicer than the HTTP event loop
- ``SERVING_DRAIN_TIMEOUT_S`` (25): on SIGTERM, how long in-flight requests may take to finish
- ``SERVING_LOG_LEVEL`` (INFO), ``SERVING_LOG_FORMAT`` (json: Cloud Logging structured lines; text)

The port is bound before anything else, so it accepts connections at once; the health route
answers 503 until the model is downloaded, loaded and warmed, then 200. SIGTERM (Vertex undeploy,
``docker stop``): stop accepting connections, finish in-flight requests, exit 0.
Exit status 1: the model cannot be loaded or the port cannot be bound; 2: bad configuration.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import tempfile
import time

from dualml.serving.app import (
    DEFAULT_BATCH_THREADS,
    DEFAULT_BATCH_TIMEOUT_MS,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_CONCURRENT_REQUESTS,
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_INSTANCES,
    DEFAULT_MODEL_NICE,
    ServingOptions,
    create_app,
)
from dualml.serving.logs import LogSetup
from dualml.serving.protocol import error_json

log = logging.getLogger("dualml.serving")

DEFAULT_DRAIN_TIMEOUT_S = 25  # Kubernetes (and so Vertex AI) sends SIGKILL 30 s after SIGTERM
# Longer than the front end's idle timeout, so the proxy, not us, closes idle keep-alive
# connections (a server-side close racing a new request is a 502 for that client).
KEEP_ALIVE_S = 75
LISTEN_BACKLOG = 2048


def _env(name: str, default):
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return type(default)(raw)
    except ValueError:
        raise SystemExit(f"environment variable {name}={raw!r} is not a valid {type(default).__name__}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dualml.serving",
        description="Serve the exported image classifier over HTTP (Vertex AI custom container contract).",
    )
    add = p.add_argument
    add("--model-dir", default=os.environ.get("AIP_STORAGE_URI"),
        help="gs:// or local directory with saved_model.pb + labels.txt (default: $AIP_STORAGE_URI)")
    add("--host", default=_env("SERVING_HOST", "0.0.0.0"), help="bind address ($SERVING_HOST, 0.0.0.0)")
    add("--port", type=int, default=_env("AIP_HTTP_PORT", 8080), help="port ($AIP_HTTP_PORT, 8080)")
    add("--predict-route", default=_env("AIP_PREDICT_ROUTE", "/predict"),
        help="POST route for predictions ($AIP_PREDICT_ROUTE, /predict)")
    add("--health-route", default=_env("AIP_HEALTH_ROUTE", "/health"),
        help="GET route for health checks ($AIP_HEALTH_ROUTE, /health)")
    add("--max-batch-size", type=int, default=_env("SERVING_MAX_BATCH_SIZE", DEFAULT_MAX_BATCH_SIZE),
        help=f"most instances in one model call ($SERVING_MAX_BATCH_SIZE, {DEFAULT_MAX_BATCH_SIZE})")
    add("--batch-timeout-ms", type=float, default=_env("SERVING_BATCH_TIMEOUT_MS", DEFAULT_BATCH_TIMEOUT_MS),
        help="longest wait for requests on their way to join a batch "
             f"($SERVING_BATCH_TIMEOUT_MS, {DEFAULT_BATCH_TIMEOUT_MS:g})")
    add("--batch-threads", type=int, default=_env("SERVING_BATCH_THREADS", DEFAULT_BATCH_THREADS),
        help=f"model calls in flight at a time ($SERVING_BATCH_THREADS, {DEFAULT_BATCH_THREADS})")
    add("--intra-op-threads", type=int, default=_env("SERVING_INTRA_OP_THREADS", 0),
        help="threads one TensorFlow op may use ($SERVING_INTRA_OP_THREADS; 0 = TensorFlow's default, "
             "one per core)")
    add("--model-nice", type=int, default=_env("SERVING_MODEL_NICE", DEFAULT_MODEL_NICE),
        help="how much lower the CPU priority of the model's threads is than the HTTP event loop's "
             f"($SERVING_MODEL_NICE, {DEFAULT_MODEL_NICE}; 0 = same)")
    add("--max-concurrent-requests", type=int,
        default=_env("SERVING_MAX_CONCURRENT_REQUESTS", DEFAULT_MAX_CONCURRENT_REQUESTS),
        help="predict requests admitted at once; more get 503 + Retry-After "
             f"($SERVING_MAX_CONCURRENT_REQUESTS, {DEFAULT_MAX_CONCURRENT_REQUESTS})")
    add("--max-instances", type=int, default=_env("SERVING_MAX_INSTANCES", DEFAULT_MAX_INSTANCES),
        help=f"most images per request ($SERVING_MAX_INSTANCES, {DEFAULT_MAX_INSTANCES})")
    add("--max-body-bytes", type=int, default=_env("SERVING_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES),
        help=f"largest request body ($SERVING_MAX_BODY_BYTES, {DEFAULT_MAX_BODY_BYTES}: Vertex's 1.5 MB)")
    add("--max-image-pixels", type=int, default=_env("SERVING_MAX_IMAGE_PIXELS", DEFAULT_MAX_IMAGE_PIXELS),
        help=f"largest image, width*height ($SERVING_MAX_IMAGE_PIXELS, {DEFAULT_MAX_IMAGE_PIXELS}; 0 = no limit)")
    add("--drain-timeout-s", type=float, default=_env("SERVING_DRAIN_TIMEOUT_S", float(DEFAULT_DRAIN_TIMEOUT_S)),
        help=f"on SIGTERM, time for in-flight requests to finish ($SERVING_DRAIN_TIMEOUT_S, {DEFAULT_DRAIN_TIMEOUT_S})")
    add("--model-version", default=None,
        help="the X-Model-Version header (default: model_version.txt, $MODEL_VERSION, $AIP_DEPLOYED_MODEL_ID)")
    add("--log-level", default=_env("SERVING_LOG_LEVEL", "INFO"), help="$SERVING_LOG_LEVEL (INFO)")
    add("--log-format", choices=("json", "text"), default=_env("SERVING_LOG_FORMAT", "json"),
        help="json: one Cloud Logging structured entry per line; text: for a terminal ($SERVING_LOG_FORMAT)")
    return p


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, open before the model loads: connections queue at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def http_protocol():
    """uvicorn's httptools protocol, answering unparseable requests with a JSON error too."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # pragma: no cover - httptools is a serving dependency; h11 also works
        return "h11"

    body = json.dumps(error_json(
        "malformed HTTP request (request line, headers, Content-Length or chunked encoding); "
        'POST a JSON body like {"instances": [{"b64": "..."}]} with a valid Content-Length'
    )).encode()

    class JsonErrorHttpToolsProtocol(HttpToolsProtocol):
        def send_400_response(self, msg: str) -> None:
            head = [b"HTTP/1.1 400 Bad Request\r\n"]
            for name, value in self.server_state.default_headers:
                head += [name, b": ", value, b"\r\n"]
            head.append(b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
                        % len(body))
            self.transport.write(b"".join(head) + body)
            self.transport.close()

    return JsonErrorHttpToolsProtocol


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        logs = LogSetup(args.log_level, args.log_format)
    except ValueError as e:
        raise SystemExit(f"--log-level/--log-format: {e}") from None
    try:
        return _serve(args)
    finally:
        logs.close()


def _serve(args) -> int:
    if not args.model_dir:
        log.error("no model: set AIP_STORAGE_URI or pass --model-dir (gs:// or a local directory)")
        return 2
    options = ServingOptions(
        predict_route=args.predict_route,
        health_route=args.health_route,
        max_instances=args.max_instances,
        max_body_bytes=args.max_body_bytes,
        max_batch_size=args.max_batch_size,
        batch_timeout_ms=args.batch_timeout_ms,
        batch_threads=args.batch_threads,
        model_nice=args.model_nice,
        max_concurrent_requests=args.max_concurrent_requests,
    )
    try:
        options.check()
        if args.drain_timeout_s < 0:
            raise ValueError(f"drain timeout must be >= 0, got {args.drain_timeout_s}")
    except ValueError as e:
        log.error("bad configuration: %s", e)
        return 2
    try:
        sock = _bind(args.host, args.port)
    except OSError as e:
        log.error("cannot listen on %s:%s: %s", args.host, args.port, e)
        return 1

    import uvicorn

    intra_op_threads = args.intra_op_threads or None
    work_dir = tempfile.mkdtemp(prefix="dualml-serving-")  # gs:// downloads; removed on exit
    failure: list[str] = []
    server: uvicorn.Server | None = None

    def load_model():
        from dualml.serving.model import Predictor, fetch_model_dir

        t0 = time.perf_counter()
        local_dir, _ = fetch_model_dir(args.model_dir, download_to=work_dir)
        predictor = Predictor(local_dir, version=args.model_version, max_image_pixels=args.max_image_pixels,
                              intra_op_threads=intra_op_threads)
        log.info("loaded model from %s in %.1f s", args.model_dir, time.perf_counter() - t0)
        return predictor

    def on_fatal(message: str) -> None:
        failure.append(message)
        if server is not None:
            server.should_exit = True  # read by uvicorn's main loop every 0.1 s

    app = create_app(options, load_model, on_fatal)
    config = uvicorn.Config(
        app,
        http=http_protocol(),
        ws="none",
        lifespan="on",
        log_config=None,  # logging is ours (dualml.serving.logs)
        access_log=False,  # replaced by the structured request log
        timeout_keep_alive=KEEP_ALIVE_S,
        timeout_graceful_shutdown=args.drain_timeout_s,
        server_header=False,
        headers=[("server", "dualml-serving")],
    )
    server = uvicorn.Server(config)
    # uvicorn drains on SIGTERM, then re-raises the signal to the handler installed before it; a
    # no-op handler there lets the process end with status 0 after a clean drain.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    host, port = sock.getsockname()[:2]
    log.info(
        "listening on http://%s:%d  POST %s  GET %s; loading the model from %s",
        host, port, options.predict_route, options.health_route, args.model_dir,
    )
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
        shutil.rmtree(work_dir, ignore_errors=True)
    if failure:
        log.error("exiting: the model could not be loaded from %s", args.model_dir)
        return 1
    log.info("stopped")
    return 0

"""The HTTP layer: a Starlette ASGI application (served by uvicorn, see ``dualml.serving.server``).

Why Starlette + uvicorn: both are maintained, small, and already pinned in the project through
Airflow 3 (its API server runs on them), so the serving image adds no new stack; uvicorn with
httptools parses HTTP in C, handles keep-alive, chunked bodies, pipelining and graceful SIGTERM
draining; Starlette gives routing, request streaming and a lifespan without FastAPI's
validation layer (nothing to validate that ``protocol.py`` does not already explain better).
KServe's and Vertex AI's own Python model servers are built on the same two. A thread-per-
connection server (the previous ``http.server`` one) or gunicorn workers would need one model
copy per process and could not batch across requests.

What lives here, the model being behind ``load_model`` (``dualml.serving.model``) and the
request format in ``dualml.serving.protocol``:

- **readiness**: the app serves at once; the model is loaded (downloaded, loaded, warmed) on a
  thread, and the health route answers 503 ``{"status": "loading"}`` until it is ready, then 200.
  Predictions before that get a 503 with Retry-After. A model that cannot load ends the process.
- **limits**: at most ``max_concurrent_requests`` predict requests admitted at once (reading,
  parsing, queued or predicting); one more gets 503 + Retry-After at once (never an unbounded
  queue). Bodies: Content-Length or chunked; more than ``max_body_bytes`` is a 413 at once (the
  rest of a declared body up to ``DISCARD_LIMIT`` past it is then read and dropped, so a client
  still sending gets to read it); no length at all is a 411; a body slower than ``body_timeout_s`` is a 408.
- **batching**: parsed requests go to ``DynamicBatcher`` (one model call for concurrent requests).
- **logs**: one structured line per request (``httpRequest``, instances, batch size, latency).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from dualml.serving.batching import BatcherStopped, DynamicBatcher
from dualml.serving.logs import FIELDS_ATTR
from dualml.serving.protocol import EXPECTED_FORMAT, RequestError, error_json, parse_predict_body

log = logging.getLogger("dualml.serving")
request_log = logging.getLogger("dualml.serving.requests")

DEFAULT_MAX_INSTANCES = 64
DEFAULT_MAX_BODY_BYTES = 1536 * 1024  # Vertex AI online prediction: 1.5 MB per request
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
# Tuned with `make bench` on 2 cores (DenseNet121): see docs/design.md, "Serving".
DEFAULT_MAX_BATCH_SIZE = 8
DEFAULT_BATCH_TIMEOUT_MS = 5.0
DEFAULT_BATCH_THREADS = 2
# The model's threads (loader, batch workers and TensorFlow's pools, which inherit it) run this much
# nicer than the event loop, so health checks and request I/O are not queued behind inference.
DEFAULT_MODEL_NICE = 5
DEFAULT_MAX_CONCURRENT_REQUESTS = 64
DEFAULT_BODY_TIMEOUT_S = 60.0
# A declared body up to this size past the limit is read and dropped after the 413 is sent (the
# client reads its 413, keep-alive or not); beyond it the connection is closed instead of reading more.
DISCARD_LIMIT = 16 * 1024 * 1024
LOG_ERROR_CHARS = 300  # error messages in logs are cut: a client may echo anything in a key


class PredictorLike(Protocol):
    labels: list[str]
    version: str | None

    def check_image(self, data: bytes, thorough: bool = False) -> str | None: ...

    def predict(self, images: list[bytes]) -> list[dict]: ...


@dataclass(frozen=True)
class ServingOptions:
    predict_route: str = "/predict"
    health_route: str = "/health"
    max_instances: int = DEFAULT_MAX_INSTANCES
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    batch_timeout_ms: float = DEFAULT_BATCH_TIMEOUT_MS
    batch_threads: int = DEFAULT_BATCH_THREADS
    max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    parse_threads: int = 4
    model_nice: int = DEFAULT_MODEL_NICE
    warm_up: bool = True

    def check(self) -> None:
        for name in ("max_instances", "max_body_bytes", "max_batch_size", "batch_threads",
                     "max_concurrent_requests", "parse_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_timeout_ms < 0 or self.body_timeout_s <= 0:
            raise ValueError("batch_timeout_ms must be >= 0 and body_timeout_s > 0")
        for name in ("predict_route", "health_route"):
            if not getattr(self, name).startswith("/"):
                raise ValueError(f"{name} must start with '/', got {getattr(self, name)!r}")
        if _route(self.predict_route) == _route(self.health_route):
            raise ValueError(f"predict and health routes are both {self.predict_route}")


def _route(path: str) -> str:
    return path.rstrip("/") or "/"


class ModelState:
    """Where the model is: loading -> ready | failed. Written by the loader thread, read by requests."""

    def __init__(self):
        self.status = "loading"
        self.error: str | None = None
        self.predictor: PredictorLike | None = None
        self.batcher: DynamicBatcher | None = None
        self.started_at = time.monotonic()
        self.ready_after_s: float | None = None
        self.admitted = 0  # predict requests in flight (event-loop thread only)
        self.rejected = 0  # turned away by back-pressure


def _be_nicer(increment: int) -> None:
    """Lower this thread's CPU priority (Linux: per thread; threads it starts inherit it)."""
    if increment <= 0 or not hasattr(os, "setpriority"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + increment)
    except OSError as e:  # pragma: no cover - not permitted: keep going at the same priority
        log.warning("could not lower the model threads' priority: %s", e)


def _json_response(status: int, payload: dict, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(payload).encode("utf-8"), status, headers, media_type="application/json")


class LingeringResponse(Response):
    """A whole answer sent at once, then the request held open while the rest of its body arrives
    and is dropped (up to ``timeout_s``), nginx's "lingering close": a client that sends its whole
    body before reading (urllib, with "Connection: close", after which uvicorn closes the socket as
    soon as the response ends) reads this answer instead of a broken pipe."""

    def __init__(self, status: int, payload: dict, timeout_s: float):
        super().__init__(json.dumps(payload).encode("utf-8"), status, media_type="application/json")
        self.timeout_s = timeout_s

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": self.body, "more_body": True})
        try:
            async with asyncio.timeout(self.timeout_s):
                while True:
                    message = await receive()
                    if message["type"] != "http.request" or not message.get("more_body", False):
                        break
        except TimeoutError:
            pass
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _note(request: Request, **fields) -> None:
    """Fields for this request's log line (read by RequestLogMiddleware after the response)."""
    request.scope.setdefault("dualml.log", {}).update(fields)


def create_app(
    options: ServingOptions,
    load_model: Callable[[], PredictorLike],
    on_fatal: Callable[[str], None] | None = None,
) -> Starlette:
    """The ASGI app. ``load_model`` runs on a background thread at startup; ``on_fatal`` is told
    when it fails (the server then exits: Vertex AI restarts or reports the container)."""
    options.check()
    state = ModelState()
    parse_pool = ThreadPoolExecutor(options.parse_threads, thread_name_prefix="dualml-parse")
    predict_route, health_route = _route(options.predict_route), _route(options.health_route)

    def load() -> None:
        _be_nicer(options.model_nice)
        try:
            predictor = load_model()
            if options.warm_up and hasattr(predictor, "warm_up"):
                predictor.warm_up((1, options.max_batch_size))
            batcher = DynamicBatcher(
                predictor.predict,
                max_batch_size=options.max_batch_size,
                timeout_s=options.batch_timeout_ms / 1000,
                threads=options.batch_threads,
            )
        except BaseException as e:  # noqa: BLE001 - reported, then the process exits
            state.error = f"{type(e).__name__}: {e}" if not str(e) else str(e)
            state.status = "failed"
            # ModelLoadError / StorageError / OSError explain themselves; anything else is a bug.
            log.error("cannot load the model: %s", state.error,
                      exc_info=not isinstance(e, (RuntimeError, OSError, ValueError)))
            if on_fatal:
                on_fatal(state.error)
            return
        # TensorFlow leaves hundreds of thousands of long-lived Python objects; a full collection
        # walking them stopped every thread, the event loop included, for ~1 s under load. Freeze
        # them out of the collector: later collections only see what requests allocate.
        gc.collect()
        gc.freeze()
        state.predictor, state.batcher = predictor, batcher
        state.ready_after_s = time.monotonic() - state.started_at
        state.status = "ready"
        log.info(
            "model ready after %.1f s: %d labels (%s), version %s; batching up to %d instances, %g ms wait, "
            "%d model calls at a time",
            state.ready_after_s, len(predictor.labels), ", ".join(predictor.labels), predictor.version,
            options.max_batch_size, options.batch_timeout_ms, options.batch_threads,
            extra={FIELDS_ATTR: {"ready_after_s": round(state.ready_after_s, 2),
                                 "intra_op_threads": getattr(predictor, "intra_op_threads", None)}},
        )

    @contextlib.asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=load, name="dualml-model-loader", daemon=True).start()
        yield
        # uvicorn has drained in-flight requests (or given up after its graceful timeout).
        if state.batcher is not None:
            state.batcher.stop(timeout_s=10)
        parse_pool.shutdown(wait=False, cancel_futures=True)

    def not_ready() -> Response:
        waited = time.monotonic() - state.started_at
        if state.status == "failed":
            return _json_response(503, error_json(f"the model failed to load: {state.error}"))
        return _json_response(
            503,
            error_json(f"the model is still loading ({waited:.0f} s so far); retry when "
                       f"GET {health_route} answers 200"),
            {"Retry-After": "5"},
        )

    async def health(request: Request) -> Response:
        if state.status != "ready":
            _note(request, error=state.error)
            body = {"status": state.status, "uptime_s": round(time.monotonic() - state.started_at, 1)}
            if state.error:
                body["error"] = state.error
            return _json_response(503, body, {"Retry-After": "5"} if state.status == "loading" else None)
        p = state.predictor
        return _json_response(200, {
            "status": "ok",
            "model": {"labels": p.labels, "version": p.version},
            "predict_route": predict_route,
            "uptime_s": round(time.monotonic() - state.started_at, 1),
            "in_flight": state.admitted,
            "rejected": state.rejected,
        })

    def check(images: list[bytes], thorough: bool = False) -> None:
        predictor = state.predictor
        problems = [f"instance {i}: {p}" for i, data in enumerate(images)
                    if (p := predictor.check_image(data, thorough=thorough))]
        if problems:
            raise RequestError(400, "; ".join(problems))

    def parse(body: bytes) -> list[bytes]:
        images = parse_predict_body(body, options.max_instances)
        check(images)
        return images

    async def predict(request: Request) -> Response:
        if state.status != "ready":
            _note(request, error="model not ready")
            return not_ready()
        if state.admitted >= options.max_concurrent_requests:
            state.rejected += 1
            _note(request, error="back-pressure", backpressure=True)
            return _json_response(
                503,
                error_json(f"server overloaded: {state.admitted} requests in flight, the limit is "
                           f"{options.max_concurrent_requests}; retry after a second"),
                {"Retry-After": "1"},
            )
        batcher = state.batcher
        loop = asyncio.get_running_loop()
        state.admitted += 1
        batcher.expect()
        submitted = False
        try:
            body = await _read_body(request, options)
            _note(request, request_bytes=len(body))
            parse_start = time.perf_counter()
            images = await loop.run_in_executor(parse_pool, parse, body)
            _note(request, instances=len(images), parse_ms=round((time.perf_counter() - parse_start) * 1000, 2))
            future = batcher.submit(images)
            submitted = True
            try:
                result = await asyncio.wrap_future(future)
            except Exception:
                # Most often an image only the model's decoder rejects (a truncated JPEG): name it (400).
                await loop.run_in_executor(parse_pool, check, images, True)
                raise
        except RequestError as e:
            _note(request, error=e.message)
            if e.linger:
                return LingeringResponse(e.status, error_json(e.message), options.body_timeout_s)
            return _json_response(e.status, error_json(e.message), {"Connection": "close"} if e.close else None)
        except BatcherStopped:
            _note(request, error="shutting down")
            return _json_response(503, error_json("the server is shutting down; retry"), {"Retry-After": "1"})
        except ClientDisconnect:
            _note(request, error="client disconnected")
            return Response(status_code=499)  # nobody reads it; logged as nginx's "client closed request"
        except Exception as e:  # a bug or a model failure must not kill the server
            log.exception("prediction failed")
            _note(request, error=f"{type(e).__name__}: {e}")
            return _json_response(500, error_json(f"internal error while predicting: {type(e).__name__}: {e}"))
        finally:
            state.admitted -= 1
            if not submitted:
                batcher.forget()
        _note(request, batch_size=result.batch_size, batch_requests=result.batch_requests,
              queue_ms=round(result.queue_s * 1000, 2), model_ms=round(result.model_s * 1000, 2))
        headers = {"X-Model-Version": str(state.predictor.version)} if state.predictor.version else None
        return _json_response(200, {"predictions": result.outputs}, headers)

    async def not_found(request: Request, exc: HTTPException) -> Response:
        return _json_response(404, error_json(
            f"unknown route {request.url.path}; use POST {predict_route} for predictions "
            f"and GET {health_route} for health"))

    async def method_not_allowed(request: Request, exc: HTTPException) -> Response:
        if _route(request.url.path) == health_route:
            msg = f"method {request.method} not allowed on {health_route}; use GET"
        else:
            msg = (f"method {request.method} not allowed on {predict_route}; "
                   f"use POST with a JSON body like {EXPECTED_FORMAT}")
        return _json_response(405, error_json(msg), dict(exc.headers or {}))

    async def server_error(request: Request, exc: Exception) -> Response:
        return _json_response(500, error_json(f"internal server error: {type(exc).__name__}: {exc}"))

    app = Starlette(
        routes=[
            Route(predict_route, predict, methods=["POST"]),
            Route(health_route, health, methods=["GET"]),  # HEAD is implied
        ],
        exception_handlers={404: not_found, 405: method_not_allowed, Exception: server_error},
        lifespan=lifespan,
    )
    app.state.model = state
    return RequestLogMiddleware(app, health_route)


async def _read_body(request: Request, options: ServingOptions) -> bytes:
    """The body, Content-Length or chunked, never more than ``max_body_bytes`` of it read."""
    limit = options.max_body_bytes
    headers = request.headers
    declared = headers.get("content-length")
    if declared is not None:
        # uvicorn's parser already refuses malformed / negative lengths with a 400.
        try:
            length = int(declared)
        except ValueError:
            raise RequestError(400, f"invalid Content-Length header {declared!r}", close=True) from None
        if length > limit:
            close = length > limit + DISCARD_LIMIT
            raise RequestError(
                413,
                f"request body too large: {length} bytes, the limit is {limit} bytes; "
                "send fewer or smaller images per request",
                close=close,
                linger=not close,
            )
    elif "chunked" not in headers.get("transfer-encoding", "").lower():
        raise RequestError(
            411,
            f"the request has no body length: send a Content-Length header (or Transfer-Encoding: chunked) "
            f"with a JSON body like {EXPECTED_FORMAT}",
            close=True,  # whatever follows the headers would be read as the next request
        )
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(options.body_timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise RequestError(
                        413,
                        f"request body too large: over {limit} bytes (chunked); "
                        "send fewer or smaller images per request",
                        close=True,
                    )
                chunks.append(chunk)
    except TimeoutError:
        raise RequestError(
            408, f"timed out after {options.body_timeout_s:g} s waiting for the request body ({size} bytes so far)",
            close=True,
        ) from None
    return b"".join(chunks)


class RequestLogMiddleware:
    """One log line per request, after the response is sent (pure ASGI: sees every status)."""

    def __init__(self, app: Starlette, health_route: str):
        self.app = app
        self.health_route = health_route
        self.state = app.state.model

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = 0
        sent = 0

        async def send_and_count(message):
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_and_count)
        finally:
            self._log(scope, status, sent, time.perf_counter() - t0)

    def _log(self, scope, status: int, sent: int, seconds: float) -> None:
        path = scope.get("path", "")
        level = logging.INFO
        if _route(path) == self.health_route and status == 200:
            level = logging.DEBUG  # Vertex probes health every few seconds: keep logs readable
        elif status >= 500 and status != 503:
            level = logging.ERROR
        elif status >= 400:
            level = logging.WARNING
        if not request_log.isEnabledFor(level):
            return
        fields = dict(scope.get("dualml.log") or {})
        error = fields.pop("error", None)
        headers = dict(scope.get("headers") or [])
        client = scope.get("client")
        http_request = {
            "requestMethod": scope.get("method"),
            "requestUrl": path,
            "status": status,
            "latency": f"{seconds:.6f}s",
            "responseSize": str(sent),
            "protocol": f"HTTP/{scope.get('http_version', '1.1')}",
        }
        if "request_bytes" in fields:
            http_request["requestSize"] = str(fields["request_bytes"])
        if client:
            http_request["remoteIp"] = client[0]
        if b"user-agent" in headers:
            http_request["userAgent"] = headers[b"user-agent"].decode("latin-1")[:200]
        ms = seconds * 1000
        summary = f"{scope.get('method')} {path} {status} {ms:.1f} ms"
        if "instances" in fields:
            summary += f" instances={fields['instances']}"
        if "batch_size" in fields:
            summary += f" batch={fields['batch_size']}"
        entry = {"httpRequest": http_request, "latency_ms": round(ms, 2), **fields}
        if error:
            entry["error"] = str(error)[:LOG_ERROR_CHARS]
            summary += f" error: {entry['error']}"
        request_log.log(level, "%s", summary, extra={FIELDS_ATTR: entry})

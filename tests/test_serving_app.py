"""The serving HTTP layer and batcher in-process, with a fake model (fast: no TensorFlow).

The Starlette app is served by real uvicorn (the protocol class ``python -m dualml.serving``
uses) on a loopback port in a thread, and driven over real HTTP. The fake model echoes its
inputs, so each response shows exactly which instances it was computed from, and it can hold a
model call open (a gate) so that concurrency, batching and back-pressure are reached
deterministically: tests wait for states (polling with a generous deadline), never for durations.
"""

from __future__ import annotations

import base64
import gc
import http.client
import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from urllib.parse import urlsplit

import pytest

from dualml.serving.app import ServingOptions, create_app
from dualml.serving.batching import BatcherStopped, DynamicBatcher

WAIT_S = 60  # deadline for states a loaded 2-core CI box reaches in milliseconds


def wait_for(condition, what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


class EchoModel:
    """Fake predictor: the prediction of ``b"x"`` is ``{"label": "x"}``; bytes starting with
    ``BAD`` are not an image; a batch containing ``POISON`` raises. ``gate`` holds every call."""

    labels = ["a", "b"]
    version = "v9"

    def __init__(self):
        self.calls: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()  # a call is being made (and maybe held at the gate)
        self._lock = threading.Lock()

    def check_image(self, data: bytes, thorough: bool = False) -> str | None:
        if data.startswith(b"BAD") or (thorough and data.startswith(b"LATE")):
            return "not a decodable image (JPEG or PNG expected): fake"
        return None

    def predict(self, images: list[bytes]) -> list[dict]:
        names = [b.decode() for b in images]
        with self._lock:
            self.calls.append(names)
        self.entered.set()
        self.gate.wait(WAIT_S)
        if any(n.startswith(("POISON", "LATE")) for n in names):
            raise RuntimeError(f"model exploded on {names}")
        return [{"label": n, "confidence": 1.0, "class_index": 0, "probabilities": {"a": 1.0, "b": 0.0}}
                for n in names]


@contextmanager
def serve(load, options: ServingOptions | None = None, on_fatal=None):
    """Serve create_app(...) with uvicorn in a thread; yields (base URL, app state)."""
    import uvicorn

    from dualml.serving.server import http_protocol

    options = options or ServingOptions(warm_up=False)
    app = create_app(options, load, on_fatal)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(app, host="127.0.0.1", port=port, http=http_protocol(), ws="none",
                            lifespan="on", log_config=None, access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, "uvicorn to start")
    try:
        yield f"http://127.0.0.1:{port}", app.app.state.model
    finally:
        server.should_exit = True
        thread.join(30)


def request(url: str, method: str = "GET", body: dict | bytes | None = None, timeout: float = WAIT_S):
    """(status, parsed JSON, headers) over a fresh connection."""
    parts = urlsplit(url)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request(method, parts.path, body=data, headers={"Content-Type": "application/json"} if data else {})
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, (json.loads(raw) if raw else None), resp.headers
    finally:
        conn.close()


def instances(*names: str) -> dict:
    return {"instances": [{"b64": base64.b64encode(n.encode()).decode()} for n in names]}


def labels(body: dict) -> list[str]:
    return [p["label"] for p in body["predictions"]]


# --- readiness -------------------------------------------------------------------------------


def test_health_is_503_while_loading_then_200():
    loaded = threading.Event()
    model = EchoModel()

    def load():
        loaded.wait(WAIT_S)
        return model

    with serve(load) as (url, state):
        status, body, headers = request(url + "/health")
        assert (status, body["status"]) == (503, "loading")
        assert headers["Retry-After"]
        status, body, headers = request(url + "/predict", "POST", instances("x"))
        assert status == 503 and "loading" in body["error"] and headers["Retry-After"]
        loaded.set()
        wait_for(lambda: request(url + "/health")[0] == 200, "health 200 after loading")
        # What loading left behind is out of the collector's reach (no full-GC pauses under load).
        assert gc.get_freeze_count() > 0
        status, body, headers = request(url + "/predict", "POST", instances("x"))
        assert status == 200 and labels(body) == ["x"]
        assert set(body) == {"predictions"}  # nothing Vertex would not pass through
        assert headers["X-Model-Version"] == "v9"


def test_a_model_that_fails_to_load_is_reported_and_ends_the_server():
    fatal = []

    def load():
        raise RuntimeError("no saved_model.pb under gs://b/m")

    with serve(load, on_fatal=fatal.append) as (url, state):
        wait_for(lambda: state.status == "failed", "the load to fail")
        status, body, _ = request(url + "/health")
        assert status == 503 and body["status"] == "failed" and "saved_model.pb" in body["error"]
        status, body, _ = request(url + "/predict", "POST", instances("x"))
        assert status == 503 and "failed to load" in body["error"]
    assert fatal == ["no saved_model.pb under gs://b/m"]


# --- batching through HTTP -----------------------------------------------------------------------


def test_concurrent_requests_share_model_calls_and_each_gets_its_own_predictions():
    model = EchoModel()
    options = ServingOptions(warm_up=False, max_batch_size=6, batch_timeout_ms=0, batch_threads=1)
    sizes = {"r1": 4, "r2": 4, "r3": 2}  # 4 + 4 would overflow a batch of 6; a split would fill it
    with serve(lambda: model, options) as (url, state):
        wait_for(lambda: state.status == "ready", "the model")
        model.gate.clear()
        model.entered.clear()
        with ThreadPoolExecutor(4) as pool:
            first = pool.submit(request, url + "/predict", "POST", instances("r0-0"))
            wait_for(model.entered.is_set, "the first model call")  # now held at the gate
            futures = {name: pool.submit(request, url + "/predict", "POST",
                                         instances(*[f"{name}-{j}" for j in range(n)]))
                       for name, n in sizes.items()}  # these queue behind the held call
            wait_for(lambda: state.batcher.queued_requests == len(sizes), "all requests queued")
            model.gate.set()
            assert first.result()[0] == 200
            for name, future in futures.items():
                status, body, _ = future.result()
                assert status == 200, body
                assert labels(body) == [f"{name}-{j}" for j in range(sizes[name])]
    assert model.calls[0] == ["r0-0"]
    merged = model.calls[1:]
    # Two calls whatever the arrival order ([4], [4, 2] or [4, 2], [4] ...): merged up to 6, and
    # every request whole in exactly one call.
    assert sorted(len(c) for c in merged) == [4, 6]
    for name, n in sizes.items():
        holding = [c for c in merged if any(x.startswith(name + "-") for x in c)]
        assert len(holding) == 1 and sum(x.startswith(name + "-") for x in holding[0]) == n


def test_batch_threads_keep_that_many_model_calls_in_flight():
    model = EchoModel()
    options = ServingOptions(warm_up=False, batch_timeout_ms=0, batch_threads=2, max_batch_size=1)
    with serve(lambda: model, options) as (url, state):
        wait_for(lambda: state.status == "ready", "the model")
        model.gate.clear()
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(request, url + "/predict", "POST", instances(f"c{i}")) for i in range(3)]
            wait_for(lambda: len(model.calls) == 2, "two model calls at once")
            wait_for(lambda: state.batcher.queued_requests == 1, "the third request to queue")
            assert len(model.calls) == 2  # no third call while both threads are busy
            model.gate.set()
            assert sorted(labels(f.result()[1])[0] for f in futures) == ["c0", "c1", "c2"]


def test_the_model_runs_at_a_lower_cpu_priority_than_the_http_side():
    """Health checks and request I/O must not queue behind inference for the CPU."""
    seen = []

    class Recording(EchoModel):
        def predict(self, images):
            seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
            return super().predict(images)

    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())  # the server thread inherits it
    with serve(Recording, ServingOptions(warm_up=False, model_nice=3)) as (url, state):
        wait_for(lambda: state.status == "ready", "the model")
        assert request(url + "/predict", "POST", instances("x"))[0] == 200
    assert seen == [min(base + 3, 19)]


def test_a_failing_request_does_not_fail_the_requests_batched_with_it():
    model = EchoModel()
    options = ServingOptions(warm_up=False, batch_timeout_ms=0, batch_threads=1)
    with serve(lambda: model, options) as (url, state):
        wait_for(lambda: state.status == "ready", "the model")
        model.gate.clear()
        model.entered.clear()
        with ThreadPoolExecutor(4) as pool:
            first = pool.submit(request, url + "/predict", "POST", instances("first"))
            wait_for(model.entered.is_set, "the first model call")
            good = pool.submit(request, url + "/predict", "POST", instances("good"))
            bad = pool.submit(request, url + "/predict", "POST", instances("POISON"))
            wait_for(lambda: state.batcher.queued_requests == 2, "both queued")
            model.gate.set()
            assert first.result()[0] == 200
            status, body, _ = good.result()
            assert status == 200 and labels(body) == ["good"]
            status, body, _ = bad.result()
            assert status == 500 and "POISON" in body["error"]
        merged, *alone = model.calls[1:]
        assert sorted(merged) == ["POISON", "good"]  # failed together, then each retried alone
        assert sorted(alone) == [["POISON"], ["good"]]
        assert request(url + "/health")[0] == 200


# --- back-pressure -------------------------------------------------------------------------------


def test_requests_beyond_the_concurrency_limit_get_503_at_once_and_health_stays_up():
    model = EchoModel()
    options = ServingOptions(warm_up=False, max_concurrent_requests=3, max_batch_size=1, batch_timeout_ms=0,
                             batch_threads=1)
    with serve(lambda: model, options) as (url, state):
        wait_for(lambda: state.status == "ready", "the model")
        model.gate.clear()
        with ThreadPoolExecutor(3) as pool:
            held = [pool.submit(request, url + "/predict", "POST", instances(f"h{i}")) for i in range(3)]
            wait_for(lambda: state.admitted == 3, "three requests in flight")
            status, body, headers = request(url + "/predict", "POST", instances("one too many"))
            assert status == 503
            assert "overloaded" in body["error"] and "limit is 3" in body["error"]
            assert headers["Retry-After"] == "1"
            status, body, _ = request(url + "/health")
            assert status == 200 and body["in_flight"] == 3 and body["rejected"] == 1
            model.gate.set()
            assert sorted(labels(f.result()[1])[0] for f in held) == ["h0", "h1", "h2"]
        assert state.admitted == 0
        assert request(url + "/predict", "POST", instances("after"))[0] == 200


# --- request handling -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def echo_server():
    model = EchoModel()
    options = ServingOptions(warm_up=False, max_body_bytes=4096, max_instances=4,
                             predict_route="/v1/m:predict", health_route="/v1/health")
    with serve(lambda: model, options) as (url, state):
        wait_for(lambda: state.status == "ready", "the model")
        yield url, model


def raw_exchange(url: str, data: bytes, timeout: float = 20) -> bytes:
    """Send raw bytes, read until the server closes or goes quiet; a hang fails the test."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(data)
        out = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                pytest.fail(f"no complete answer in {timeout} s; got {out[:300]!r}")
            if not chunk:
                return out
            out += chunk
            if b"\r\n\r\n" in out:
                head, _, rest = out.partition(b"\r\n\r\n")
                length = [int(v) for k, v in (h.split(b":", 1) for h in head.split(b"\r\n")[1:])
                          if k.strip().lower() == b"content-length"]
                if length and len(rest) >= length[0]:
                    return out


def parse_response(raw: bytes) -> tuple[int, dict, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return int(lines[0].split()[1]), json.loads(body), headers


def test_chunked_body_is_accepted(echo_server):
    url, _ = echo_server
    payload = json.dumps(instances("chunked")).encode()
    half = len(payload) // 2
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (payload[:half], payload[half:]))
    status, body, headers = parse_response(raw_exchange(url, (
        b"POST /v1/m:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunks + b"0\r\n\r\n")))
    assert status == 200, body
    assert labels(body) == ["chunked"]


def test_chunked_body_over_the_limit_is_413(echo_server):
    url, _ = echo_server
    chunk = b"x" * 3000
    status, body, headers = parse_response(raw_exchange(url, (
        b"POST /v1/m:predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + (b"%x\r\n%s\r\n" % (len(chunk), chunk)) * 2 + b"0\r\n\r\n")))
    assert status == 413 and "too large" in body["error"]
    assert headers["connection"] == "close"


def test_declared_length_over_the_limit_is_413_before_the_body_is_sent(echo_server):
    """Only headers are sent: the answer cannot have waited for (or read) the 10 MB body."""
    url, _ = echo_server
    status, body, _ = parse_response(raw_exchange(url, (
        b"POST /v1/m:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n")))
    assert status == 413
    assert "10000000 bytes, the limit is 4096" in body["error"]


@pytest.mark.parametrize(
    ("name", "raw", "status", "word"),
    [
        ("no_content_length", b"POST /v1/m:predict HTTP/1.1\r\nHost: x\r\n\r\n", 411, "content-length"),
        ("negative_content_length",
         b"POST /v1/m:predict HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n{}", 400, "content-length"),
        ("garbage_content_length",
         b"POST /v1/m:predict HTTP/1.1\r\nHost: x\r\nContent-Length: ten\r\n\r\n{}", 400, "content-length"),
        ("bad_chunk_size",
         b"POST /v1/m:predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
         400, "chunked"),
        ("not_http", b"HELLO\r\n\r\n", 400, "malformed"),
    ],
)
def test_malformed_http_gets_a_prompt_json_4xx(echo_server, name, raw, status, word):
    url, _ = echo_server
    got_status, body, headers = parse_response(raw_exchange(url, raw))
    assert got_status == status, body
    assert headers["content-type"] == "application/json"
    assert word in body["error"].lower()
    assert request(url + "/v1/health")[0] == 200


def test_a_stalled_body_times_out_with_408():
    model = EchoModel()
    with serve(lambda: model, ServingOptions(warm_up=False, body_timeout_s=0.5)) as (url, state):
        wait_for(lambda: state.status == "ready", "the model")
        status, body, headers = parse_response(raw_exchange(url, (
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"instances\"")))
        assert status == 408 and "request body" in body["error"]
        assert state.admitted == 0


def test_an_image_only_the_model_rejects_is_a_400_naming_it(echo_server):
    """The quick check reads headers only; when the model's own decoder fails, the request's images
    are fully checked to explain it as a client error, and the requests batched with it succeed."""
    url, _ = echo_server
    status, body, _ = request(url + "/v1/m:predict", "POST", instances("fine", "LATE-truncated"))
    assert status == 400 and body["error"].startswith("instance 1: not a decodable image"), body
    assert request(url + "/v1/m:predict", "POST", instances("fine"))[0] == 200


def test_errors_keep_the_contract(echo_server):
    url, model = echo_server
    status, body, _ = request(url + "/v1/m:predict", "POST", instances("ok", "BADimage"))
    assert status == 400 and body["error"].startswith("instance 1: not a decodable image")
    status, body, _ = request(url + "/v1/m:predict", "POST", instances(*"abcde"))
    assert status == 413 and "limit is 4" in body["error"]
    status, body, headers = request(url + "/v1/health", "DELETE")
    assert status == 405 and "use GET" in body["error"] and "GET" in headers["Allow"]
    status, body, _ = request(url + "/predict", "POST", instances("x"))
    assert status == 404 and "/v1/m:predict" in body["error"]


def test_keep_alive_connection_survives_client_errors(echo_server):
    url, _ = echo_server
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=WAIT_S)
    try:
        sockets = set()
        for body, status in [(b"x" * 5000, 413), (b"not json", 400), (json.dumps(instances("ok")).encode(), 200)]:
            conn.request("POST", "/v1/m:predict", body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            payload = json.loads(resp.read())
            assert resp.status == status, payload
            sockets.add(id(conn.sock))
        assert labels(payload) == ["ok"]
        assert len(sockets) == 1  # one connection for all three
    finally:
        conn.close()


def test_internal_errors_are_500_and_the_server_keeps_serving():
    class Broken(EchoModel):
        def check_image(self, data, thorough=False):
            raise RuntimeError("decoder exploded")

    with serve(lambda: Broken()) as (url, state):
        wait_for(lambda: state.status == "ready", "the model")
        status, body, _ = request(url + "/predict", "POST", instances("x"))
        assert status == 500 and "exploded" in body["error"]
        assert request(url + "/health")[0] == 200


def test_one_structured_log_line_per_request_without_image_bytes(echo_server, caplog):
    url, _ = echo_server
    secret = "s3cr3t-image-content"

    def records():
        return [r for r in caplog.records if r.name == "dualml.serving.requests"]

    with caplog.at_level("INFO", logger="dualml.serving.requests"):
        request(url + "/v1/m:predict", "POST", instances(secret, "two"))
        request(url + "/v1/m:predict", "POST", b"{oops")
        wait_for(lambda: len(records()) >= 2, "two request log records")
    ok, bad = records()[:2]
    assert ok.getMessage().startswith("POST /v1/m:predict 200 ")
    assert ok.fields["httpRequest"]["status"] == 200
    assert ok.fields["httpRequest"]["latency"].endswith("s")
    assert ok.fields["instances"] == 2 and ok.fields["batch_size"] >= 2
    assert bad.levelname == "WARNING" and bad.fields["httpRequest"]["status"] == 400
    assert "not valid JSON" in bad.fields["error"]
    encoded = base64.b64encode(secret.encode()).decode()
    for record in records():
        assert encoded not in json.dumps(record.fields) and secret not in record.getMessage()


# --- the batcher alone ----------------------------------------------------------------------------


def test_batcher_runs_a_lone_request_without_waiting_for_its_timeout():
    calls = []
    # A wait of an hour would fail result(timeout=WAIT_S): nothing else is on its way, so no wait.
    batcher = DynamicBatcher(lambda items: calls.append(list(items)) or items, max_batch_size=8, timeout_s=3600)
    try:
        batcher.expect()
        assert batcher.submit(["a"]).result(timeout=WAIT_S).outputs == ["a"]
    finally:
        batcher.stop()
    assert calls == [["a"]]


def test_batcher_waits_for_an_expected_request_and_never_splits_one():
    calls = []
    batcher = DynamicBatcher(lambda items: calls.append(list(items)) or items, max_batch_size=4, timeout_s=WAIT_S)
    try:
        batcher.expect()
        batcher.expect()
        first = batcher.submit(["a1", "a2"])  # one more is expected: the batcher waits for it
        second = batcher.submit(["b1", "b2"])
        assert first.result(timeout=WAIT_S).outputs == ["a1", "a2"]
        result = second.result(timeout=WAIT_S)
        assert result.outputs == ["b1", "b2"] and (result.batch_size, result.batch_requests) == (4, 2)
        big = batcher.submit(["c"] * 6, expected=False)  # larger than max_batch_size: runs alone, whole
        assert big.result(timeout=WAIT_S).outputs == ["c"] * 6
    finally:
        batcher.stop()
    assert calls == [["a1", "a2", "b1", "b2"], ["c"] * 6]


def test_batcher_stop_finishes_queued_work_then_refuses_more():
    release = threading.Event()
    batcher = DynamicBatcher(lambda items: release.wait(WAIT_S) and items, max_batch_size=1, timeout_s=0)
    futures = [batcher.submit([i], expected=False) for i in range(3)]
    stopper = threading.Thread(target=batcher.stop, kwargs={"timeout_s": WAIT_S})
    stopper.start()
    release.set()
    stopper.join(WAIT_S)
    assert [f.result(timeout=0).outputs for f in futures] == [[0], [1], [2]]
    with pytest.raises(BatcherStopped):
        batcher.submit([9], expected=False)

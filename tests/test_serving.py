"""The serving app (dualml.serving) as a real subprocess, over real HTTP, with a real model.

One tiny model is exported per module and served by ``python -m dualml.serving`` configured
only through Vertex AI's AIP_* variables; predictions are compared with the SavedModel's
signature called in-process. A second server loads the same model from gs:// (the
gcp-storage-emulator) and is then stopped with SIGTERM while a request is in flight. Bad and
hostile requests must get a prompt 4xx JSON error and never hurt the server. The HTTP layer's
finer behaviour (batching, back-pressure, readiness) with a fake model: test_serving_app.py.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
LABELS = ["daisy", "roses", "tulips"]
IMAGE_SIZE = 32
VERSION = "test-v7"


def _encode(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buf, fmt)
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


_rng = np.random.RandomState(0)
# Two clearly different real images (a reddish PNG and a greenish JPEG of other sizes).
PNG = _encode(_rng.randint(0, 256, (30, 40, 3)) * [1.0, 0.3, 0.2], "PNG")
JPEG = _encode(_rng.randint(0, 256, (48, 64, 3)) * [0.2, 1.0, 0.4], "JPEG")
TINY_PNG = _encode(np.full((4, 4, 3), 128), "PNG")
MAX_IMAGE_PIXELS = 1_000_000  # the module's server runs with this limit (SERVING_MAX_IMAGE_PIXELS)
HUGE_PNG = _encode(np.zeros((1000, 1100, 3)), "PNG")  # 1.1 Mpx, a few KB: a (mild) decompression bomb


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, method: str = "GET", body: bytes | dict | None = None, timeout: float = 60):
    """(status, parsed JSON body, headers) for any status code."""
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    req = urllib.request.Request(url, data=body, method=method)
    if body is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null"), resp.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null"), e.headers


# --- the model --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """A tiny classifier exported with the real serving contract (export_serving_model).

    Not build_classifier("mobilenet_v3_small", weights=None): at 32 px its random backbone
    emits ~1e-10 features, so every image gets exactly 1/3 per class and comparing
    probabilities would prove nothing. This model's output depends on the pixels.
    """
    import keras

    from dualml.trainer.export import export_serving_model

    keras.utils.set_random_seed(7)
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
    x = keras.layers.Rescaling(1.0 / 255)(inputs)
    x = keras.layers.Conv2D(8, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(len(LABELS), activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    model.layers[-1].set_weights([model.layers[-1].get_weights()[0] * 8, np.zeros(len(LABELS))])

    out = str(tmp_path_factory.mktemp("serving") / "model")
    export_serving_model(model, LABELS, IMAGE_SIZE, out)
    Path(out, "model_version.txt").write_text(VERSION + "\n")
    return out


@pytest.fixture(scope="module")
def reference(model_dir):
    """Probabilities from the exported signature, called in-process: bytes -> np.ndarray."""
    import tensorflow as tf

    from dualml.trainer.export import load_serving_fn

    fn = load_serving_fn(model_dir)

    def probabilities(*images: bytes) -> np.ndarray:
        return fn(image_bytes=tf.constant(list(images)))["probabilities"].numpy()

    return probabilities


# --- the server subprocess ------------------------------------------------------------------


class ServerProcess:
    def __init__(
        self, proc: subprocess.Popen, url: str, log_path: Path, predict_route: str, health_route: str
    ):
        self.proc = proc
        self.url = url
        self.log_path = log_path
        self.predict_url = url + predict_route
        self.health_url = url + health_route
        self.host, self.port = "127.0.0.1", int(url.rsplit(":", 1)[1])
        self.predict_path = predict_route
        self.first_health: tuple[int, dict] | None = None  # the first answer of the health route
        self.predict_while_loading: tuple[int, dict, str | None] | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def json_log(self) -> list[dict]:
        return [json.loads(line) for line in self.log().splitlines() if line.startswith("{")]


@contextmanager
def run_server(model_uri: str, log_path: Path, extra_env: dict | None = None, timeout: float = 300):
    port = _free_port()
    predict_route, health_route = "/v1/endpoints/e1/deployedModels/m1:predict", "/v1/endpoints/e1/health"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO / "include"),
        "AIP_HTTP_PORT": str(port),
        "AIP_STORAGE_URI": model_uri,
        "AIP_PREDICT_ROUTE": predict_route,
        "AIP_HEALTH_ROUTE": health_route,
        "TF_CPP_MIN_LOG_LEVEL": "2",
        **(extra_env or {}),
    }
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [PYTHON, "-m", "dualml.serving"], env=env, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT
        )
    server = ServerProcess(proc, f"http://127.0.0.1:{port}", log_path, predict_route, health_route)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"server exited with {proc.returncode} before it was healthy:\n{server.log()[-4000:]}"
                )
            try:
                status, body, _ = _request(server.health_url, timeout=10)
            except OSError:
                status = None
            if status is not None and server.first_health is None:
                server.first_health = (status, body)
                if status == 503:
                    st, b, headers = _request(server.predict_url, "POST", {"instances": [{"b64": _b64(PNG)}]})
                    server.predict_while_loading = (st, b, headers.get("Retry-After"))
            if status == 200:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"server not healthy after {timeout} s:\n{server.log()[-4000:]}")
            time.sleep(0.05)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("serving_log") / "server.log"
    with run_server(model_dir, log_path, {"SERVING_MAX_IMAGE_PIXELS": str(MAX_IMAGE_PIXELS)}) as srv:
        yield srv


# --- happy path -------------------------------------------------------------------------------


def test_health(server):
    status, body, headers = _request(server.health_url)
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert body["status"] == "ok"
    assert body["model"] == {"labels": LABELS, "version": VERSION}


def test_port_answers_503_while_the_model_loads(server):
    """Vertex routes traffic only after the health route answers 200: before that, 503."""
    status, body = server.first_health
    assert status == 503 and body["status"] == "loading"
    status, body, retry_after = server.predict_while_loading
    assert status == 503 and "loading" in body["error"] and retry_after


def test_predict_matches_the_signature_in_process(server, model_dir, reference):
    status, body, headers = _request(
        server.predict_url, "POST", {"instances": [{"b64": _b64(PNG)}, {"b64": _b64(JPEG)}]}
    )
    assert status == 200, body
    assert set(body) == {"predictions"}  # Vertex passes only this through (and adds its own "model")
    assert headers["X-Model-Version"] == VERSION
    labels = Path(model_dir, "labels.txt").read_text().split()
    preds = body["predictions"]
    assert len(preds) == 2
    expected = reference(PNG, JPEG)
    for pred, exp in zip(preds, expected, strict=True):
        assert set(pred) == {"label", "confidence", "class_index", "probabilities"}
        assert pred["label"] in labels
        assert list(pred["probabilities"]) == labels
        got = np.array([pred["probabilities"][name] for name in labels])
        assert np.allclose(got, exp, atol=1e-5)
        assert pred["class_index"] == int(np.argmax(exp))
        assert pred["label"] == labels[pred["class_index"]]
        assert pred["confidence"] == pytest.approx(float(exp.max()), abs=1e-5)
    # The comparison has teeth: the two images get different probabilities.
    assert not np.allclose(expected[0], expected[1], atol=1e-3)


def test_predict_accepts_automl_style_and_ignores_parameters(server, reference):
    payload = {
        "instances": [{"image_bytes": {"b64": _b64(JPEG)}}, {"b64": _b64(PNG)}],
        "parameters": {"confidence_threshold": 0.5},
    }
    status, body, _ = _request(server.predict_url, "POST", payload)
    assert status == 200, body
    got = np.array([[p["probabilities"][name] for name in LABELS] for p in body["predictions"]])
    assert np.allclose(got, reference(JPEG, PNG), atol=1e-5)


def test_predict_accepts_line_wrapped_base64(server, reference):
    wrapped = base64.encodebytes(JPEG).decode()  # 76-column lines, like the `base64` command
    assert "\n" in wrapped
    status, body, _ = _request(server.predict_url, "POST", {"instances": [{"b64": wrapped}]})
    assert status == 200, body
    got = [body["predictions"][0]["probabilities"][name] for name in LABELS]
    assert np.allclose(got, reference(JPEG)[0], atol=1e-5)


IMAGES = {"png": PNG, "jpeg": JPEG, "tiny": TINY_PNG}
MIXES = [("png",), ("jpeg", "png"), ("tiny", "jpeg", "png"), ("jpeg",), ("png", "tiny"), ("tiny",)]


def _probabilities(body: dict) -> np.ndarray:
    return np.array([[p["probabilities"][name] for name in LABELS] for p in body["predictions"]])


def test_concurrent_requests_get_the_predictions_of_one_by_one_calls(server, reference):
    """Batched server-side or not, each request gets exactly its own images' predictions."""
    payloads = [{"instances": [{"b64": _b64(IMAGES[k])} for k in mix]} for mix in MIXES * 4]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda p: _request(server.predict_url, "POST", p), payloads))
    for mix, (status, body, _) in zip(MIXES * 4, results, strict=True):
        assert status == 200, body
        assert np.allclose(_probabilities(body), reference(*[IMAGES[k] for k in mix]), atol=1e-5)


def test_merged_model_calls_give_the_same_predictions_as_one_by_one(model_dir, reference):
    """The real model behind the real HTTP layer, one call held so that the others queue and are
    merged into one batch: every response equals the signature called on that request alone."""
    from test_serving_app import serve, wait_for

    from dualml.serving.app import ServingOptions
    from dualml.serving.model import Predictor

    class HeldPredictor(Predictor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.gate, self.entered, self.sizes = threading.Event(), threading.Event(), []

        def predict(self, images):
            self.sizes.append(len(images))
            self.entered.set()
            self.gate.wait(120)
            return super().predict(images)

    predictor = HeldPredictor(model_dir)
    with serve(lambda: predictor, ServingOptions(warm_up=False, max_batch_size=64, batch_threads=1)) as (url, state):
        wait_for(lambda: state.status == "ready", "the model")
        with ThreadPoolExecutor(len(MIXES) + 1) as pool:
            first = pool.submit(_request, url + "/predict", "POST", {"instances": [{"b64": _b64(JPEG)}]})
            wait_for(predictor.entered.is_set, "the first model call")
            futures = [pool.submit(_request, url + "/predict", "POST",
                                   {"instances": [{"b64": _b64(IMAGES[k])} for k in mix]}) for mix in MIXES]
            wait_for(lambda: state.batcher.queued_requests == len(MIXES), "the requests to queue")
            predictor.gate.set()
            assert first.result()[0] == 200
            results = [f.result() for f in futures]
    assert predictor.sizes == [1, sum(map(len, MIXES))]  # everything queued went in one call
    for mix, (status, body, _) in zip(MIXES, results, strict=True):
        assert status == 200, body
        assert np.allclose(_probabilities(body), reference(*[IMAGES[k] for k in mix]), atol=1e-5)


# --- bad requests -----------------------------------------------------------------------------

GOOD = {"b64": _b64(TINY_PNG)}
_PREDICT, _HEALTH = "predict", "health"

BAD_REQUESTS = [
    # id, method, route, body, status, a word the error must contain
    ("body_not_json", "POST", _PREDICT, b"{instances: oops", 400, "json"),
    ("body_not_utf8", "POST", _PREDICT, b"\xff\xfe\x00garbage", 400, "json"),
    ("body_not_object", "POST", _PREDICT, b'[{"b64": "aGk="}]', 400, "object"),
    ("no_instances", "POST", _PREDICT, {"inputs": [GOOD]}, 400, "instances"),
    ("instances_not_list", "POST", _PREDICT, {"instances": GOOD}, 400, "list"),
    ("instances_empty", "POST", _PREDICT, {"instances": []}, 400, "empty"),
    ("too_many_instances", "POST", _PREDICT, {"instances": [GOOD] * 65}, 413, "too many"),
    ("instance_without_b64", "POST", _PREDICT, {"instances": [GOOD, {"image": "x"}]}, 400, "instance 1"),
    ("instance_bare_string", "POST", _PREDICT, {"instances": [_b64(TINY_PNG)]}, 400, "b64"),
    ("b64_not_string", "POST", _PREDICT, {"instances": [{"b64": 12345}]}, 400, "b64"),
    ("b64_invalid", "POST", _PREDICT, {"instances": [{"b64": "not base64 at all!!"}]}, 400, "base64"),
    ("b64_empty", "POST", _PREDICT, {"instances": [{"b64": ""}]}, 400, "empty"),
    (
        "bytes_not_an_image",
        "POST",
        _PREDICT,
        {"instances": [GOOD, GOOD, {"b64": _b64(b"this is text, not a picture")}]},
        400,
        "instance 2",
    ),
    ("truncated_png", "POST", _PREDICT, {"instances": [{"b64": _b64(PNG[: len(PNG) // 2])}]}, 400, "image"),
    ("image_too_many_pixels", "POST", _PREDICT, {"instances": [{"b64": _b64(HUGE_PNG)}]}, 400, "pixels"),
    ("body_too_large", "POST", _PREDICT, {"instances": [{"b64": "A" * 1_700_000}]}, 413, "too large"),
    ("body_empty", "POST", _PREDICT, b"", 400, "empty"),
    ("json_nested_100k_deep", "POST", _PREDICT, b"[" * 100_000 + b"]" * 100_000, 400, "nested"),
    ("json_nested_in_instances", "POST", _PREDICT, b'{"instances": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
     400, "nested"),
    ("json_5000_digit_integer", "POST", _PREDICT, b'{"instances": [' + b"9" * 5000 + b"]}", 400, "digits"),
    ("get_on_predict", "GET", _PREDICT, None, 405, "post"),
    ("delete_on_predict", "DELETE", _PREDICT, None, 405, "post"),
    ("post_on_health", "POST", _HEALTH, {"instances": [GOOD]}, 405, "get"),
    ("unknown_route", "POST", "/v1/models/flowers:predict", {"instances": [GOOD]}, 404, "route"),
]


@pytest.mark.parametrize(
    ("method", "route", "body", "status", "word"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_REQUESTS],
)
def test_bad_request_gets_4xx_json_error(server, method, route, body, status, word):
    url = {_PREDICT: server.predict_url, _HEALTH: server.health_url}.get(route, server.url + route)
    got_status, got_body, headers = _request(url, method, body)
    assert got_status == status, got_body
    assert headers["Content-Type"] == "application/json"
    assert isinstance(got_body, dict) and set(got_body) == {"error"}
    assert word in got_body["error"].lower(), got_body["error"]
    assert _request(server.health_url)[0] == 200  # still serving


def test_bad_image_error_names_instance_and_expected_format(server):
    status, body, _ = _request(server.predict_url, "POST", {"instances": [{"b64": _b64(b"GIF89a-nope")}]})
    assert status == 400
    assert body["error"].startswith("instance 0:")
    assert "JPEG or PNG" in body["error"]


def test_keep_alive_connection_survives_errors(server):
    """Oversized and malformed bodies are consumed, so the next request on the connection works."""
    host, port = server.url.removeprefix("http://").split(":")
    path = server.predict_url.removeprefix(server.url)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        for body, status in [
            (json.dumps({"instances": [{"b64": "A" * 1_700_000}]}).encode(), 413),
            (b"not json", 400),
            (json.dumps({"instances": [{"b64": _b64(PNG)}]}).encode(), 200),
        ]:
            conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            payload = json.loads(resp.read())
            assert resp.status == status, payload
        assert payload["predictions"][0]["label"] in LABELS
    finally:
        conn.close()


def test_too_large_body_is_answered_after_it_arrives_even_with_connection_close(server):
    """A client that sends its whole oversized body before reading (urllib, with "Connection:
    close") reads its 413: the server answers at once but does not close the connection while the
    body is still coming, which the client would see as a broken pipe. The body comes slowly here,
    in 64 KiB pieces."""
    body = b"A" * (1536 * 1024 + 512 * 1024)
    head = (f"POST {server.predict_url.removeprefix(server.url)} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection((server.host, server.port), timeout=30) as sock:
        sock.sendall(head)
        time.sleep(0.3)  # the server has the headers (and could answer) long before the body is in
        for i in range(0, len(body), 64 * 1024):
            sock.sendall(body[i:i + 64 * 1024])  # BrokenPipeError / ConnectionResetError if it closed early
            time.sleep(0.01)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        assert resp.status == 413
        assert "too large" in json.loads(resp.read())["error"]


def _raw(server, data: bytes, timeout: float = 30) -> tuple[int, dict, dict]:
    """Send raw bytes; the answer must come within ``timeout`` (the old server held some for 35 s)."""
    with socket.create_connection((server.host, server.port), timeout=timeout) as sock:
        sock.sendall(data)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        return resp.status, json.loads(resp.read()), {k.lower(): v for k, v in resp.getheaders()}


def test_chunked_body_is_accepted(server, reference):
    payload = json.dumps({"instances": [{"b64": _b64(JPEG)}]}).encode()
    cut = len(payload) // 3
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (payload[:cut], payload[cut:])) + b"0\r\n\r\n"
    status, body, _ = _raw(server, (
        f"POST {server.predict_path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n").encode() + chunked)
    assert status == 200, body
    assert np.allclose(_probabilities(body), reference(JPEG), atol=1e-5)


@pytest.mark.parametrize(
    ("headers", "status", "word"),
    [
        pytest.param("", 411, "content-length", id="no_content_length"),
        pytest.param("Content-Length: -1\r\n", 400, "content-length", id="negative_content_length"),
        pytest.param("Content-Length: 5000000\r\n", 413, "too large", id="declared_over_the_limit_unsent"),
    ],
)
def test_requests_without_a_usable_length_are_answered_at_once(server, headers, status, word):
    got, body, resp_headers = _raw(server, (
        f"POST {server.predict_path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n").encode())
    assert got == status, body
    assert resp_headers["content-type"] == "application/json"
    assert word in body["error"].lower()
    assert _request(server.health_url)[0] == 200


def test_head_on_health(server):
    req = urllib.request.Request(server.health_url, method="HEAD")
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200
        assert resp.read() == b""


def test_server_logs_one_structured_line_per_request(server):
    marker = f"/nowhere-{time.monotonic_ns()}"
    _request(server.predict_url, "POST", {"instances": [{"b64": _b64(PNG)}, {"b64": _b64(JPEG)}]})
    _request(server.url + marker)

    def request_lines():
        return [e for e in server.json_log() if "httpRequest" in e]

    deadline = time.monotonic() + 30  # the line is written just after the response is sent
    while not any(e["httpRequest"]["requestUrl"] == marker for e in request_lines()):
        assert time.monotonic() < deadline, server.log()[-3000:]
        time.sleep(0.1)
    lines = request_lines()
    predict = [e for e in lines if e["httpRequest"]["requestUrl"] == server.predict_path
               and e["httpRequest"]["status"] == 200 and e.get("instances") == 2]
    assert predict, lines
    entry = predict[-1]
    assert entry["severity"] == "INFO" and entry["message"].startswith(f"POST {server.predict_path} 200 ")
    assert entry["httpRequest"]["requestMethod"] == "POST" and entry["httpRequest"]["latency"].endswith("s")
    assert entry["batch_size"] >= 2 and entry["latency_ms"] > 0
    missing = [e for e in lines if e["httpRequest"]["requestUrl"] == marker]
    assert len(missing) == 1 and missing[0]["httpRequest"]["status"] == 404
    assert missing[0]["severity"] == "WARNING"
    log = server.log()
    assert _b64(PNG)[:40] not in log and _b64(JPEG)[:40] not in log  # never image bytes
    assert "Traceback" not in log
    assert any(e["message"].startswith("model ready after") for e in server.json_log())


# --- loading from gs:// -----------------------------------------------------------------------


TRAINER_EXTRAS = {  # what the trainer writes beside the SavedModel, which serving never reads
    "model.keras": b"k" * 200_000,
    "metrics.json": b"{}",
    "history.json": b"{}",
    "split.json": b"{}",
}


@pytest.fixture(scope="module")
def gcs_model_uri(gcs_emulator, model_dir) -> str:
    """The model as the trainer leaves it in a bucket (serving files + trainer extras)."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage as gcs

    from dualml import storage

    bucket = f"serving-{uuid.uuid4().hex[:8]}"
    gcs.Client(project="local-project", credentials=AnonymousCredentials()).create_bucket(bucket)
    uri = f"gs://{bucket}/flowers/cloud/model"
    assert f"{uri}/saved_model.pb" in storage.upload_dir(model_dir, uri)
    for name, data in TRAINER_EXTRAS.items():
        storage.write_bytes(f"{uri}/{name}", data)
    return uri


def test_only_the_serving_files_are_downloaded(gcs_model_uri, model_dir, tmp_path):
    from dualml.serving.model import fetch_model_dir

    local, to_delete = fetch_model_dir(gcs_model_uri, download_to=str(tmp_path / "dl"))
    assert (local, to_delete) == (str(tmp_path / "dl"), None)
    got = sorted(p.relative_to(local).as_posix() for p in Path(local).rglob("*") if p.is_file())
    want = sorted(p.relative_to(model_dir).as_posix() for p in Path(model_dir).rglob("*") if p.is_file())
    assert got == want  # saved_model.pb, variables/*, fingerprint.pb, labels.txt, model_version.txt
    assert not set(TRAINER_EXTRAS) & set(got)


@pytest.fixture(scope="module")
def gcs_server(gcs_model_uri, gcs_emulator, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("serving_gcs") / "server.log"
    env = {"STORAGE_EMULATOR_HOST": gcs_emulator, "SERVING_DRAIN_TIMEOUT_S": "300", "SERVING_INTRA_OP_THREADS": "1"}
    with run_server(gcs_model_uri, log_path, env) as srv:
        yield srv


def test_serves_model_from_gcs(gcs_server, gcs_model_uri, reference):
    status, body, headers = _request(gcs_server.predict_url, "POST", {"instances": [{"b64": _b64(JPEG)}]})
    assert status == 200, body
    assert headers["X-Model-Version"] == VERSION
    assert np.allclose(_probabilities(body), reference(JPEG), atol=1e-5)
    log = gcs_server.log()
    assert f"loaded model from {gcs_model_uri}" in log
    assert f"skipped {len(TRAINER_EXTRAS)} others" in log
    ready = [e for e in gcs_server.json_log() if e["message"].startswith("model ready after")]
    assert ready and ready[0]["intra_op_threads"] == 1  # SERVING_INTRA_OP_THREADS reached TensorFlow


def test_sigterm_drains_in_flight_requests(gcs_server, reference):
    """Vertex undeploy / docker stop: no new connections, idle ones closed, the request in flight
    (its body half sent when the signal arrives) still gets its predictions, then exit 0."""
    srv = gcs_server
    idle = http.client.HTTPConnection(srv.host, srv.port, timeout=60)
    idle.request("GET", srv.health_url.removeprefix(srv.url))
    assert idle.getresponse().read() and idle.sock is not None  # kept alive, now idle

    payload = json.dumps({"instances": [{"b64": _b64(JPEG)}, {"b64": _b64(PNG)}]}).encode()
    half = len(payload) // 2
    busy = socket.create_connection((srv.host, srv.port), timeout=60)
    busy.sendall((f"POST {srv.predict_path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload[:half])
    deadline = time.monotonic() + 60
    while _request(srv.health_url)[1]["in_flight"] != 1:  # the server is reading its body
        assert time.monotonic() < deadline, "the half-sent request never became in flight"
        time.sleep(0.05)

    srv.proc.send_signal(signal.SIGTERM)
    while True:  # the listener closes: new connections are refused
        try:
            socket.create_connection((srv.host, srv.port), timeout=5).close()
        except ConnectionRefusedError:
            break
        assert time.monotonic() < deadline + 60, "still accepting connections after SIGTERM"
        time.sleep(0.05)
    assert idle.sock.recv(1) == b""  # the idle keep-alive connection was closed

    busy.sendall(payload[half:])
    resp = http.client.HTTPResponse(busy)
    resp.begin()
    body = json.loads(resp.read())
    busy.close()
    assert resp.status == 200, body
    assert resp.getheader("Connection") == "close"
    assert np.allclose(_probabilities(body), reference(JPEG, PNG), atol=1e-5)
    assert srv.proc.wait(timeout=120) == 0
    assert any(e["message"] == "stopped" for e in srv.json_log())


# --- start-up failures, import hygiene (fast: no TensorFlow needed) -----------------------------


def _run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "dualml.serving", *args],
        env={**os.environ, "PYTHONPATH": str(REPO / "include"), **(env or {})},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_without_model_explains_how_to_configure():
    env = {k: v for k, v in os.environ.items() if k != "AIP_STORAGE_URI"}
    result = subprocess.run(
        [PYTHON, "-m", "dualml.serving"],
        env={**env, "PYTHONPATH": str(REPO / "include")},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "AIP_STORAGE_URI" in result.stderr


def test_cli_with_a_directory_that_is_not_a_model_fails_clearly(tmp_path):
    (tmp_path / "README.txt").write_text("no model here")
    result = _run_cli("--model-dir", str(tmp_path), "--port", str(_free_port()))
    assert result.returncode == 1
    assert "saved_model.pb" in result.stderr and "README.txt" in result.stderr
    error = [json.loads(line) for line in result.stderr.splitlines() if '"ERROR"' in line]
    assert error and error[0]["severity"] == "ERROR"


@pytest.mark.parametrize(
    ("env", "args", "status", "words"),
    [
        ({"SERVING_MAX_BATCH_SIZE": "0"}, (), 2, ("max_batch_size", ">= 1")),
        ({"SERVING_BATCH_TIMEOUT_MS": "soon"}, (), 1, ("SERVING_BATCH_TIMEOUT_MS", "float")),
        ({}, ("--predict-route", "/health"), 2, ("both",)),
        ({}, ("--port", "BUSY"), 1, ("cannot listen",)),
    ],
    ids=["batch_size_0", "timeout_not_a_number", "same_routes", "port_in_use"],
)
def test_cli_configuration_errors_are_explained(tmp_path, env, args, status, words):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        args = tuple(str(busy.getsockname()[1]) if a == "BUSY" else a for a in args)
        result = _run_cli("--model-dir", str(tmp_path), "--host", "127.0.0.1", *args, env=env)
    assert result.returncode == status, result.stderr
    for word in words:
        assert word in result.stderr


def test_importing_the_serving_app_pulls_neither_airflow_nor_tensorflow():
    code = (
        "import sys, dualml.serving.server, dualml.serving.app, dualml.serving.protocol, "
        "dualml.serving.model, dualml.serving.batching, dualml.serving.logs; "
        "bad = [m for m in ('airflow', 'tensorflow', 'keras') if m in sys.modules]; "
        "assert not bad, bad"
    )
    result = subprocess.run(
        [PYTHON, "-c", code],
        env={**os.environ, "PYTHONPATH": str(REPO / "include")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_signature_names_match_the_exporter():
    from dualml.serving import model
    from dualml.trainer import export

    assert (model.SIGNATURE_NAME, model.INPUT_NAME) == (export.SIGNATURE_NAME, export.INPUT_NAME)


# --- request parsing (pure Python) ------------------------------------------------------------


def test_parse_predict_body_formats():
    from dualml.serving.protocol import RequestError, parse_predict_body

    urlsafe = base64.urlsafe_b64encode(b"\xfb\xff\xfe" * 4).decode()
    assert "-" in urlsafe or "_" in urlsafe
    body = json.dumps(
        {"instances": [{"b64": _b64(PNG)}, {"image_bytes": {"b64": _b64(JPEG)}}, {"b64": urlsafe}]}
    ).encode()
    assert parse_predict_body(body, max_instances=3) == [PNG, JPEG, b"\xfb\xff\xfe" * 4]
    with pytest.raises(RequestError) as e:
        parse_predict_body(body, max_instances=2)
    assert e.value.status == 413 and "limit is 2" in e.value.message


def test_parse_predict_body_refuses_hostile_json_as_client_errors():
    from dualml.serving.protocol import RequestError, parse_predict_body

    for body, word in [
        (b"[" * 100_000 + b"]" * 100_000, "nested"),
        (b'{"instances": [{"b64": ' + b"1" * 5000 + b"}]}", "digits"),
        (b"", "empty"),
    ]:
        with pytest.raises(RequestError) as e:
            parse_predict_body(body, max_instances=4)
        assert e.value.status == 400 and word in e.value.message


def test_serving_files_are_chosen_from_a_listing():
    from dualml.serving.model import ModelLoadError, serving_files

    listing = ["saved_model.pb", "fingerprint.pb", "variables/variables.index", "variables/variables.data-0",
               "assets/vocab.txt", "labels.txt", "model_version.txt", "model.keras", "metrics.json",
               "checkpoints/ckpt-1.index", "export/old/saved_model.pb"]
    root, files = serving_files(listing, "gs://b/m")
    assert root == ""
    assert files == ["saved_model.pb", "fingerprint.pb", "variables/variables.index",
                     "variables/variables.data-0", "assets/vocab.txt", "labels.txt", "model_version.txt"]
    root, files = serving_files(["run/model/saved_model.pb", "run/model/labels.txt", "run/model.keras"], "x")
    assert (root, files) == ("run/model", ["run/model/saved_model.pb", "run/model/labels.txt"])
    with pytest.raises(ModelLoadError, match="several SavedModels"):
        serving_files(["a/saved_model.pb", "b/saved_model.pb"], "gs://b/m")
    with pytest.raises(ModelLoadError, match="no saved_model.pb"):
        serving_files(["model.keras"], "gs://b/m")

"""The serving app (dualml.serving) as a real subprocess, over real HTTP.

One tiny model is exported per module and served by ``python -m dualml.serving`` configured
only through Vertex AI's AIP_* variables; predictions are compared with the SavedModel's
signature called in-process. A second server loads the same model from gs:// (the
gcp-storage-emulator). Bad requests must get a 4xx JSON error and never hurt the server.
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

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def run_server(model_uri: str, log_path: Path, extra_env: dict | None = None, timeout: float = 150):
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
                if _request(server.health_url, timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not healthy after {timeout} s:\n{server.log()[-4000:]}")
            time.sleep(0.25)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
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


def test_predict_matches_the_signature_in_process(server, model_dir, reference):
    status, body, _ = _request(
        server.predict_url, "POST", {"instances": [{"b64": _b64(PNG)}, {"b64": _b64(JPEG)}]}
    )
    assert status == 200, body
    labels = Path(model_dir, "labels.txt").read_text().split()
    assert body["model"] == {"labels": labels, "version": VERSION}
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


def test_concurrent_requests(server, reference):
    payload = {"instances": [{"b64": _b64(PNG)}, {"b64": _b64(JPEG)}]}
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: _request(server.predict_url, "POST", payload), range(8)))
    expected = reference(PNG, JPEG)
    for status, body, _ in results:
        assert status == 200, body
        got = np.array([[p["probabilities"][name] for name in LABELS] for p in body["predictions"]])
        assert np.allclose(got, expected, atol=1e-5)


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


def test_chunked_body_is_refused_with_411(server):
    # One write of the whole chunked request: the server answers 411 as soon as it has read the
    # headers and closes, so a client still streaming chunks would race it (BrokenPipe).
    host, port = server.url.removeprefix("http://").split(":")
    path = server.predict_url.removeprefix(server.url)
    chunk = b'{"instances": []}'
    raw = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
           f"Transfer-Encoding: chunked\r\n\r\n{len(chunk):x}\r\n").encode() + chunk + b"\r\n0\r\n\r\n"
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(raw)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        assert resp.status == 411
        assert "content-length" in json.loads(resp.read())["error"].lower()
    assert _request(server.health_url)[0] == 200


def test_head_on_health(server):
    req = urllib.request.Request(server.health_url, method="HEAD")
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200
        assert resp.read() == b""


def test_server_logs_one_line_per_request(server):
    _request(server.predict_url, "POST", {"instances": [{"b64": _b64(PNG)}, {"b64": _b64(JPEG)}]})
    _request(server.url + "/nowhere")
    path = server.predict_url.removeprefix(server.url)
    wanted = [f"POST {path} 200 instances=2 ms=", "GET /nowhere 404 instances=- ms="]
    deadline = time.monotonic() + 10  # the line is written just after the response is sent
    while not all(w in server.log() for w in wanted) and time.monotonic() < deadline:
        time.sleep(0.1)
    log = server.log()
    for w in wanted:
        assert w in log
    assert "Traceback" not in log


# --- loading from gs:// -----------------------------------------------------------------------


def test_serves_model_from_gcs(gcs_emulator, model_dir, reference, tmp_path):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage as gcs

    from dualml import storage

    gcs.Client(project="local-project", credentials=AnonymousCredentials()).create_bucket("serving-models")
    uri = "gs://serving-models/flowers/cloud/v7"
    written = storage.upload_dir(model_dir, uri)
    assert f"{uri}/saved_model.pb" in written

    with run_server(uri, tmp_path / "server.log", {"STORAGE_EMULATOR_HOST": gcs_emulator}) as srv:
        status, body, _ = _request(srv.predict_url, "POST", {"instances": [{"b64": _b64(JPEG)}]})
        assert status == 200, body
        assert body["model"] == {"labels": LABELS, "version": VERSION}
        got = [body["predictions"][0]["probabilities"][name] for name in LABELS]
        assert np.allclose(got, reference(JPEG)[0], atol=1e-5)
        assert f"loaded model from {uri}" in srv.log()
        srv.proc.send_signal(signal.SIGTERM)  # Vertex / docker stop: clean exit
        assert srv.proc.wait(timeout=15) == 0
    assert "shutting down" in srv.log()


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


def test_importing_the_serving_app_pulls_neither_airflow_nor_tensorflow():
    code = (
        "import sys, dualml.serving.app, dualml.serving.protocol, dualml.serving.model; "
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


# --- the HTTP layer in-process with a fake model: internal errors -----------------------------


class _FakePredictor:
    labels = ["a", "b"]
    version = None

    def __init__(self, fail_in: str):
        self.fail_in = fail_in

    def check_image(self, data: bytes):
        if self.fail_in == "check":
            raise RuntimeError("decoder exploded")
        return None

    def predict(self, images):
        if self.fail_in == "predict":
            raise RuntimeError("model exploded")
        return [{"label": "a", "confidence": 1.0, "class_index": 0, "probabilities": {"a": 1.0, "b": 0.0}}]


@pytest.mark.parametrize("fail_in", ["check", "predict"])
def test_internal_error_is_a_500_and_the_server_keeps_serving(fail_in):
    from dualml.serving.app import PredictionServer

    srv = PredictionServer(("127.0.0.1", 0), _FakePredictor(fail_in))
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        status, body, _ = _request(url + "/predict", "POST", {"instances": [{"b64": _b64(TINY_PNG)}]})
        assert status == 500
        assert "exploded" in body["error"]
        assert _request(url + "/health")[0] == 200
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)


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

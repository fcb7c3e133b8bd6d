"""Prediction endpoint latency and throughput over HTTP vs calling the model in-process.

The cloud model (DenseNet121 at the local platform's image size, weights=None: latency does not
depend on training) is exported with ``dualml.trainer.export.export_serving_model`` and served
by ``python -m dualml.serving`` on a free loopback port. Clients send Vertex-format requests
(``{"instances": [{"b64": ...}]}``, one sample JPEG each) on keep-alive connections from 1 and 8
threads, bounded by a request count and a time limit; the same bytes go through the exported
serving signature called in the benchmark process from as many threads. HTTP and in-process runs
alternate (``rounds`` rounds per concurrency) after warm-up requests; reported: p50/p99 latency
(ms) and requests/s, with the ratios HTTP / in-process, and at 1 client the latency of
``GET /health`` (the HTTP round trip without the model). The server is always stopped.

``python bench/endpoint_latency.py [--data DIR] [--requests N] [--quick] [--out FILE]``
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import benchlib

ARCHITECTURE = "densenet121"
CONCURRENCY = (1, 8)
WARMUP_REQUESTS = 10


def export_model(export_dir: str, labels: list[str], image_size: int) -> str:
    import keras

    from dualml.trainer.export import export_serving_model
    from dualml.trainer.models import build_classifier

    keras.utils.set_random_seed(0)
    model, _ = build_classifier(ARCHITECTURE, len(labels), image_size, None, 0.2, 0.9)
    return export_serving_model(model, labels, image_size, export_dir)


class Server:
    """``python -m dualml.serving`` as a child process in its own session (stopped by its pid)."""

    def __init__(self, model_dir: str, log_path: str, startup_timeout_s: float = 240):
        self.port = benchlib.free_port()
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dualml.serving", "--model-dir", model_dir, "--host", "127.0.0.1",
             "--port", str(self.port), "--log-level", "WARNING"],
            env=benchlib.child_env(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        t0 = time.perf_counter()
        try:
            self._wait_healthy(startup_timeout_s)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.perf_counter() - t0

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serving app exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    conn.close()
                    return
                conn.close()
            except OSError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"serving app not healthy on port {self.port} after {timeout_s:.0f} s: {self.log_tail()}")

    def log_tail(self, n: int = 1500) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(10)
        self._log.close()


def http_caller(port: int, body: bytes):
    """A function that sends one predict request on this thread's keep-alive connection."""
    local = threading.local()
    headers = {"Content-Type": "application/json"}

    def call():
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            conn.request("POST", "/predict", body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException):
            conn.close()
            local.conn = None
            raise
        if resp.status != 200 or b'"predictions"' not in data:
            raise RuntimeError(f"predict answered {resp.status}: {data[:300]!r}")

    return call


def health_caller(port: int):
    """GET /health on this thread's keep-alive connection: the HTTP round trip without the model."""
    local = threading.local()

    def call():
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("GET", "/health")
        resp = conn.getresponse()
        resp.read()
        if resp.status != 200:
            raise RuntimeError(f"health answered {resp.status}")

    return call


def inprocess_caller(export_dir: str, image: bytes):
    import tensorflow as tf

    from dualml.trainer.export import INPUT_NAME, load_serving_fn

    fn = load_serving_fn(export_dir)
    batch = tf.constant([image])

    def call():
        out = fn(**{INPUT_NAME: batch})
        out["probabilities"].numpy()

    return call


def _measure(call, count: int, seconds: float, clients: int) -> tuple[list[float], float, int]:
    benchlib.run_bounded(call, count=WARMUP_REQUESTS, seconds=seconds, concurrency=clients)
    durations, wall = benchlib.run_bounded(call, count=count, seconds=seconds, concurrency=clients)
    return durations, wall, len(durations)


def _summary(durations: list[float], wall: float, rate_key: str = "req_s") -> dict:
    s = benchlib.summarize_ms(durations)
    s[rate_key] = len(durations) / wall if wall else None
    s["wall_s"] = wall
    return s


def run(data_dir: str | None = None, requests: int = 300, seconds: float = 60.0, rounds: int = 2) -> dict:
    benchlib.setup_paths()
    with tempfile.TemporaryDirectory(prefix="bench-endpoint-") as tmp:
        data_dir = benchlib.ensure_sample_data(data_dir or Path(tmp) / "flowers")
        manifest = benchlib.local_split(data_dir)
        image_size = benchlib.local_image_sizes().get(ARCHITECTURE, 64)
        image_path = manifest.files["test"][0][0]
        image = Path(image_path).read_bytes()
        body = json.dumps({"instances": [{"b64": base64.b64encode(image).decode()}]}).encode()
        export_dir = os.path.join(tmp, "model")
        benchlib.log(f"endpoint_latency: exporting {ARCHITECTURE} {image_size} px")
        export_model(export_dir, manifest.labels, image_size)
        inproc = inprocess_caller(export_dir, image)
        server = Server(export_dir, os.path.join(tmp, "serving.log"))
        try:
            benchlib.log(f"endpoint_latency: serving on 127.0.0.1:{server.port} (ready in {server.startup_s:.1f} s)")
            http_call = http_caller(server.port, body)
            levels = []
            for clients in CONCURRENCY:
                per_round = max(1, requests // rounds)
                acc = {"http": ([], 0.0), "in_process": ([], 0.0)}
                for _ in range(rounds):
                    for name, call in (("http", http_call), ("in_process", inproc)):
                        d, w, _ = _measure(call, per_round, seconds / rounds, clients)
                        acc[name] = (acc[name][0] + d, acc[name][1] + w)
                h = _summary(*acc["http"])
                p = _summary(*acc["in_process"])
                level = {
                    "clients": clients,
                    "http": h,
                    "in_process": p,
                    "p50_ratio": benchlib.ratio(h["p50_ms"], p["p50_ms"]),
                    "p99_ratio": benchlib.ratio(h["p99_ms"], p["p99_ms"]),
                    "throughput_ratio": benchlib.ratio(h["req_s"], p["req_s"]),
                }
                if clients == 1:
                    # Transport alone (no model): how much of the HTTP latency is the round trip.
                    d, w, _ = _measure(health_caller(server.port), min(requests, 100), seconds / rounds, 1)
                    level["http_health"] = _summary(d, w)
                levels.append(level)
                benchlib.log(f"endpoint_latency: {clients} client(s): HTTP p50 {h['p50_ms']:.1f} ms "
                             f"{h['req_s']:.1f} req/s; in-process p50 {p['p50_ms']:.1f} ms {p['req_s']:.1f}/s")
            startup_s = server.startup_s
        finally:
            server.stop()
    return {
        "architecture": ARCHITECTURE,
        "image_size": image_size,
        "weights": None,
        "request": f"Vertex format, 1 instance, {len(image)}-byte JPEG ({len(body)}-byte body)",
        "requests_per_level": requests,
        "time_limit_s_per_level": seconds,
        "rounds": rounds,
        "warmup_requests": WARMUP_REQUESTS,
        "server_startup_s": startup_s,
        "concurrency": levels,
        "method": "keep-alive loopback HTTP client threads vs the serving signature called from as many "
                  "threads in the benchmark process; alternated per round",
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="image folder (default: generate the sample data in a temp dir)")
    p.add_argument("--requests", type=int, default=300, help="requests per concurrency level and side")
    p.add_argument("--seconds", type=float, default=60.0, help="time limit per level and side")
    p.add_argument("--quick", action="store_true", help="100 requests, 20 s per level")
    p.add_argument("--out")
    a = p.parse_args(argv)
    res = run(a.data, requests=100 if a.quick else a.requests, seconds=20.0 if a.quick else a.seconds)
    benchlib.emit(res, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

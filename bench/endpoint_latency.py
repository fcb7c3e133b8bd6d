"""Prediction endpoint over HTTP vs the model called in-process, plus a 64-client soak.

The cloud model (DenseNet121 at the local platform's image size, weights=None: latency does not
depend on training) is exported with ``dualml.trainer.export.export_serving_model`` and served by
``python -m dualml.serving`` configured like Vertex AI configures it (AIP_* environment only,
default batching and limits) on a free loopback port. Clients send Vertex-format requests
(``{"instances": [{"b64": ...}]}``, one sample JPEG each) on keep-alive connections.

- 1 and 8 clients: HTTP and in-process rounds alternate (``rounds`` per level, after warm-up);
  in-process = the exported serving signature called with batch 1 on the same bytes from as many
  threads (what a server without batching could do at best). Reported: p50/p99 latency, requests/s,
  the ratios, the server's mean batch size (from its request log) and, at 1 client, ``GET /health``.
- 64 clients for ``soak_s`` seconds: status counts (5xx other than the server's deliberate 503
  back-pressure must be 0; clients honour Retry-After), the server's RSS at the start, end and peak
  (growth must stay under 20 %), and ``GET /health`` latency probed every 100 ms on its own
  connection from a separate process (must stay under 50 ms), next to the same probe against a
  trivial asyncio HTTP server run at the same time (the machine's own scheduling tail).

Each level records the 1-minute load average before and after it: the machine is shared.
The issue-12 targets are evaluated into ``targets`` (value, limit, met). The server is always stopped.

``python bench/endpoint_latency.py [--data DIR] [--requests N] [--soak-s S] [--quick] [--out FILE]``
``python bench/endpoint_latency.py --sweep``: 8 closed-loop clients through the batcher (no HTTP) with
other batching settings, each next to the batch-1 baseline (how the defaults were chosen; not
part of ``make bench``).
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
SOAK_CLIENTS = 64
WARMUP_REQUESTS = 10
HEALTH_PROBE_INTERVAL_S = 0.1
PREDICT_ROUTE, HEALTH_ROUTE = "/predict", "/health"
TARGETS = {  # issue 12, "Done when"
    "p50_ratio_1_client_max": 1.10,
    "throughput_ratio_8_clients_min": 1.5,
    "p99_over_p50_8_clients_max": 3.0,
    "soak_rss_growth_max": 0.20,
    "soak_health_ms_max": 50.0,
}


def export_model(export_dir: str, labels: list[str], image_size: int) -> str:
    import keras

    from dualml.trainer.export import export_serving_model
    from dualml.trainer.models import build_classifier

    keras.utils.set_random_seed(0)
    model, _ = build_classifier(ARCHITECTURE, len(labels), image_size, None, 0.2, 0.9)
    return export_serving_model(model, labels, image_size, export_dir)


class Server:
    """``python -m dualml.serving`` as Vertex AI starts it (environment only), in its own session."""

    def __init__(self, model_dir: str, log_path: str, extra_env: dict | None = None, startup_timeout_s: float = 300):
        self.port = benchlib.free_port()
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        env = benchlib.child_env({
            "AIP_HTTP_PORT": str(self.port),
            "AIP_STORAGE_URI": model_dir,
            "AIP_PREDICT_ROUTE": PREDICT_ROUTE,
            "AIP_HEALTH_ROUTE": HEALTH_ROUTE,
            "SERVING_HOST": "127.0.0.1",
            **(extra_env or {}),
        })
        self.proc = subprocess.Popen([sys.executable, "-m", "dualml.serving"], env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        t0 = time.perf_counter()
        try:
            self.port_open_s = self._wait_status({503, 200}, startup_timeout_s) - t0
            self.startup_s = self._wait_status({200}, startup_timeout_s) - t0
        except BaseException:
            self.stop()
            raise

    def _wait_status(self, statuses: set[int], timeout_s: float) -> float:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serving app exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", HEALTH_ROUTE)
                status = conn.getresponse().status
                conn.close()
                if status in statuses:
                    return time.perf_counter()
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"serving app not answering {statuses} on port {self.port} after {timeout_s:.0f} s: "
                           f"{self.log_tail()}")

    def rss_bytes(self) -> int | None:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def log_offset(self) -> int:
        self._log.flush()
        return os.path.getsize(self.log_path)

    def request_log(self, start: int) -> list[dict]:
        """The server's request log entries written after ``start`` (a log_offset())."""
        time.sleep(0.3)  # the log thread writes just after each response
        with open(self.log_path, "rb") as f:
            f.seek(start)
            lines = f.read().decode(errors="replace").splitlines()
        out = []
        for line in lines:
            if line.startswith("{") and '"httpRequest"' in line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
        return out

    def log_tail(self, n: int = 1500) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


class KeepAlive:
    """One keep-alive connection per thread."""

    def __init__(self, port: int):
        self.port = port
        self.local = threading.local()

    def send(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes, http.client.HTTPResponse]:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException):
            conn.close()
            self.local.conn = None
            raise
        if resp.will_close:
            conn.close()
            self.local.conn = None
        return resp.status, data, resp


def http_caller(port: int, body: bytes):
    client = KeepAlive(port)

    def call():
        status, data, _ = client.send("POST", PREDICT_ROUTE, body)
        if status != 200 or b'"predictions"' not in data:
            raise RuntimeError(f"predict answered {status}: {data[:300]!r}")

    return call


def health_caller(port: int):
    client = KeepAlive(port)

    def call():
        status, _, _ = client.send("GET", HEALTH_ROUTE)
        if status != 200:
            raise RuntimeError(f"health answered {status}")

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


def _measure(call, count: int, seconds: float, clients: int) -> tuple[list[float], float]:
    benchlib.run_bounded(call, count=WARMUP_REQUESTS, seconds=seconds, concurrency=clients)
    return benchlib.run_bounded(call, count=count, seconds=seconds, concurrency=clients)


def _summary(durations: list[float], wall: float) -> dict:
    s = benchlib.summarize_ms(durations)
    s["req_s"] = len(durations) / wall if wall else None
    s["wall_s"] = wall
    return s


def _load1() -> float:
    return round(os.getloadavg()[0], 2)


def _batch_stats(entries: list[dict]) -> dict:
    sizes = [e["batch_size"] for e in entries if e.get("batch_size")]
    if not sizes:
        return {}
    return {"mean_batch_size": sum(sizes) / len(sizes), "max_batch_size_seen": max(sizes)}


def measure_level(server: Server, http_call, inproc, clients: int, requests: int, seconds: float, rounds: int) -> dict:
    load_before = _load1()
    per_round = max(1, requests // rounds)
    acc = {"http": ([], 0.0), "in_process": ([], 0.0)}
    batch_entries: list[dict] = []
    for _ in range(rounds):
        for name, call in (("http", http_call), ("in_process", inproc)):
            offset = server.log_offset()
            d, w = _measure(call, per_round, seconds / rounds, clients)
            acc[name] = (acc[name][0] + d, acc[name][1] + w)
            if name == "http":
                batch_entries += [e for e in server.request_log(offset) if e["httpRequest"]["requestUrl"] == PREDICT_ROUTE]
    h, p = _summary(*acc["http"]), _summary(*acc["in_process"])
    level = {
        "clients": clients,
        "http": h,
        "in_process": p,
        "p50_ratio": benchlib.ratio(h["p50_ms"], p["p50_ms"]),
        "p99_ratio": benchlib.ratio(h["p99_ms"], p["p99_ms"]),
        "throughput_ratio": benchlib.ratio(h["req_s"], p["req_s"]),
        "http_p99_over_p50": benchlib.ratio(h["p99_ms"], h["p50_ms"]),
        "server": _batch_stats(batch_entries),
        "load_average_1m": [load_before, _load1()],
    }
    if clients == 1:  # transport alone (no model): how much of the HTTP latency is the round trip
        d, w = _measure(health_caller(server.port), min(requests, 100), seconds / rounds, 1)
        level["http_health"] = _summary(d, w)
    return level


def soak(server: Server, body: bytes, clients: int, seconds: float) -> dict:
    """``clients`` keep-alive clients for ``seconds``; health probed; RSS sampled."""
    load_before = _load1()
    stop = threading.Event()
    lock = threading.Lock()
    statuses: dict[str, int] = {}
    latencies: list[float] = []
    errors: list[str] = []
    rss: list[int] = []

    def count(key: str) -> None:
        with lock:
            statuses[key] = statuses.get(key, 0) + 1

    def client() -> None:
        conn = KeepAlive(server.port)
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                status, data, resp = conn.send("POST", PREDICT_ROUTE, body)
            except (OSError, http.client.HTTPException) as e:
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                count("connection_error")
                time.sleep(0.1)
                continue
            dt = time.perf_counter() - t0
            if status == 200:
                with lock:
                    latencies.append(dt)
                count("200")
            elif status == 503 and b"overloaded" in data:
                count("503_backpressure")
                stop.wait(float(resp.getheader("Retry-After") or 1))
            else:
                count(str(status))
                with lock:
                    errors.append(f"{status}: {data[:200]!r}")

    def sampler() -> None:
        while not stop.is_set():
            value = server.rss_bytes()
            if value:
                rss.append(value)
            stop.wait(0.5)

    rss_start = server.rss_bytes()
    offset = server.log_offset()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    threads.append(threading.Thread(target=sampler, daemon=True))
    # The health prober is its own process: in this one it would wait for the GIL behind 64 client
    # threads and measure them, not the server.
    probe = subprocess.Popen([sys.executable, __file__, "--health-probe", str(server.port), "--probe-s", str(seconds)],
                             stdout=subprocess.PIPE, text=True)
    # Anchor: the same probe against a trivial asyncio HTTP server in its own process, at the same
    # time. On a shared 2-core box most of the tail is the machine's scheduling, not the server.
    control_port = benchlib.free_port()
    control = subprocess.Popen([sys.executable, __file__, "--control-server", str(control_port)])
    control_probe = subprocess.Popen([sys.executable, __file__, "--health-probe", str(control_port),
                                      "--probe-s", str(seconds), "--probe-path", "/"], stdout=subprocess.PIPE, text=True)
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    stop.wait(seconds)
    stop.set()
    for t in threads:
        t.join(150)
    wall = time.perf_counter() - t0
    probed = json.loads(probe.communicate(timeout=120)[0])
    health_ms, health_bad = probed["ms"], probed["failures"]
    control_ms = json.loads(control_probe.communicate(timeout=120)[0])["ms"]
    control.kill()
    control.wait(10)
    rss_end = server.rss_bytes()
    entries = server.request_log(offset)
    five_xx = {k: v for k, v in statuses.items() if k.startswith("5") and k != "503_backpressure"}
    out = {
        "clients": clients,
        "seconds": round(wall, 1),
        "statuses": statuses,
        "server_5xx_other_than_backpressure": sum(five_xx.values()),
        "errors_sample": errors[:5],
        "ok": _summary(latencies, wall) if latencies else None,
        "health": {**benchlib.summarize_ms([m / 1000 for m in health_ms]), "failures": len(health_bad),
                   "failures_sample": health_bad[:5]} if health_ms else {"failures": len(health_bad)},
        "control_probe": benchlib.summarize_ms([m / 1000 for m in control_ms]) if control_ms else None,
        "rss_mb": {
            "start": rss_start / 1e6 if rss_start else None,
            "end": rss_end / 1e6 if rss_end else None,
            "peak": max(rss) / 1e6 if rss else None,
        },
        "server": _batch_stats([e for e in entries if e["httpRequest"]["requestUrl"] == PREDICT_ROUTE]),
        "load_average_1m": [load_before, _load1()],
    }
    out["rss_growth"] = benchlib.ratio((rss_end or 0) - (rss_start or 0), rss_start) if rss_start and rss_end else None
    return out


def control_server(port: int) -> None:
    """A trivial keep-alive HTTP server (asyncio streams): the anchor for the health probe."""
    import asyncio

    async def handle(reader, writer):
        while await reader.readline():
            while (await reader.readline()) not in (b"\r\n", b""):
                pass
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
        writer.close()

    async def serve():
        server = await asyncio.start_server(handle, "127.0.0.1", port)
        await server.serve_forever()

    asyncio.run(serve())


def health_probe(port: int, seconds: float, path: str = HEALTH_ROUTE) -> dict:
    """``GET path`` every HEALTH_PROBE_INTERVAL_S on one keep-alive connection for ``seconds``."""
    conn = KeepAlive(port)
    ms: list[float] = []
    failures: list[str] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.perf_counter()
        try:
            status, _, _ = conn.send("GET", path)
        except (OSError, http.client.HTTPException) as e:
            failures.append(f"{type(e).__name__}: {e}")
            status = None
        if status == 200:
            ms.append((time.perf_counter() - t0) * 1000)
        elif status is not None:
            failures.append(f"status {status}")
        time.sleep(HEALTH_PROBE_INTERVAL_S)
    return {"ms": ms, "failures": failures}


def evaluate_targets(levels: list[dict], soak_result: dict | None) -> dict:
    by = {lv["clients"]: lv for lv in levels}
    t = {}

    def put(name, value, limit, ok):
        t[name] = {"value": value, "limit": limit, "met": None if value is None else bool(ok)}

    one, eight = by.get(1), by.get(8)
    if one:
        v = one["p50_ratio"]
        put("p50_ratio_1_client", v, f"<= {TARGETS['p50_ratio_1_client_max']:.2f}x",
            v is not None and v <= TARGETS["p50_ratio_1_client_max"])
    if eight:
        v = eight["throughput_ratio"]
        put("throughput_ratio_8_clients", v, f">= {TARGETS['throughput_ratio_8_clients_min']}x",
            v is not None and v >= TARGETS["throughput_ratio_8_clients_min"])
        v = eight["http_p99_over_p50"]
        put("p99_over_p50_8_clients", v, f"<= {TARGETS['p99_over_p50_8_clients_max']}",
            v is not None and v <= TARGETS["p99_over_p50_8_clients_max"])
    if soak_result:
        v = soak_result["server_5xx_other_than_backpressure"] + soak_result["statuses"].get("connection_error", 0)
        put("soak_5xx_and_connection_errors", v, "== 0", v == 0)
        v = soak_result["rss_growth"]
        put("soak_rss_growth", v, f"< {TARGETS['soak_rss_growth_max']:.0%}", v is not None and v < TARGETS["soak_rss_growth_max"])
        h = soak_result["health"]
        v = h.get("max_ms")
        put("soak_health_max_ms", v, f"< {TARGETS['soak_health_ms_max']:.0f} ms",
            v is not None and v < TARGETS["soak_health_ms_max"] and not h["failures"])
    return t


def _prepare(data_dir: str | None, tmp: str) -> tuple[str, bytes, bytes, int]:
    data_dir = benchlib.ensure_sample_data(data_dir or Path(tmp) / "flowers")
    manifest = benchlib.local_split(data_dir)
    image_size = benchlib.local_image_sizes().get(ARCHITECTURE, 64)
    image = Path(manifest.files["test"][0][0]).read_bytes()
    body = json.dumps({"instances": [{"b64": base64.b64encode(image).decode()}]}).encode()
    export_dir = os.path.join(tmp, "model")
    benchlib.log(f"endpoint_latency: exporting {ARCHITECTURE} {image_size} px")
    export_model(export_dir, manifest.labels, image_size)
    return export_dir, image, body, image_size


def run(data_dir: str | None = None, requests: int = 400, seconds: float = 60.0, rounds: int = 4,
        soak_s: float = 20.0) -> dict:
    benchlib.setup_paths()
    with tempfile.TemporaryDirectory(prefix="bench-endpoint-") as tmp:
        export_dir, image, body, image_size = _prepare(data_dir, tmp)
        inproc = inprocess_caller(export_dir, image)
        server = Server(export_dir, os.path.join(tmp, "serving.log"))
        try:
            benchlib.log(f"endpoint_latency: port open after {server.port_open_s:.1f} s, "
                         f"healthy after {server.startup_s:.1f} s")
            http_call = http_caller(server.port, body)
            levels = []
            for clients in CONCURRENCY:
                lv = measure_level(server, http_call, inproc, clients, requests, seconds, rounds)
                levels.append(lv)
                h, p = lv["http"], lv["in_process"]
                benchlib.log(f"endpoint_latency: {clients} client(s): HTTP p50/p99 {h['p50_ms']:.1f}/"
                             f"{h['p99_ms']:.1f} ms {h['req_s']:.1f} req/s (batch "
                             f"{lv['server'].get('mean_batch_size', 0):.1f}); in-process p50 {p['p50_ms']:.1f} ms "
                             f"{p['req_s']:.1f}/s; load {lv['load_average_1m']}")
            soak_result = None
            if soak_s > 0:
                soak_result = soak(server, body, SOAK_CLIENTS, soak_s)
                benchlib.log(f"endpoint_latency: soak {SOAK_CLIENTS} clients {soak_s:.0f} s: {soak_result['statuses']}, "
                             f"RSS {soak_result['rss_mb']}, health max "
                             f"{soak_result['health'].get('max_ms', float('nan')):.1f} ms")
            startup = {"port_open_s": server.port_open_s, "healthy_s": server.startup_s}
        finally:
            exit_status = server.stop()
    return {
        "architecture": ARCHITECTURE,
        "image_size": image_size,
        "weights": None,
        "request": f"Vertex format, 1 instance, {len(image)}-byte JPEG ({len(body)}-byte body)",
        "server_config": "python -m dualml.serving with AIP_* environment only (default batching and limits)",
        "requests_per_level": requests,
        "time_limit_s_per_level": seconds,
        "rounds": rounds,
        "warmup_requests": WARMUP_REQUESTS,
        "server_startup": startup,
        "server_exit_status_after_sigterm": exit_status,
        "concurrency": levels,
        "soak": soak_result,
        "targets": evaluate_targets(levels, soak_result),
        "method": "keep-alive loopback HTTP client threads vs the serving signature called (batch 1) from as "
                  "many threads in the benchmark process; alternated per round; soak clients honour Retry-After",
    }


def sweep(data_dir: str | None, requests: int = 240, seconds: float = 30.0, clients: int = 8) -> dict:
    """How the batching defaults were chosen: ``clients`` closed-loop threads submitting one image
    each to DynamicBatcher around the real Predictor (no HTTP, one model load), for several
    settings, alternated with the batch-1-from-``clients``-threads baseline."""
    benchlib.setup_paths()
    from dualml.serving.batching import DynamicBatcher
    from dualml.serving.model import Predictor

    configs = [(1, 0, 1), (4, 5, 1), (8, 5, 1), (16, 5, 1), (4, 5, 2), (8, 0, 2), (8, 5, 2), (8, 10, 2),
               (16, 5, 2), (8, 5, 3)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-endpoint-sweep-") as tmp:
        export_dir, image, _, _ = _prepare(data_dir, tmp)
        predictor = Predictor(export_dir)
        baseline = inprocess_caller(export_dir, image)
        for size, wait_ms, threads in configs:
            batcher = DynamicBatcher(predictor.predict, max_batch_size=size, timeout_s=wait_ms / 1000, threads=threads)

            def call(batcher=batcher):
                batcher.expect()
                batcher.submit([image]).result()

            try:
                load_before = _load1()
                d, w = _measure(call, requests, seconds, clients)
                b_d, b_w = _measure(baseline, requests, seconds, clients)
            finally:
                batcher.stop()
            row = {"max_batch_size": size, "batch_timeout_ms": wait_ms, "batch_threads": threads,
                   "batched": _summary(d, w), "batch_1_threads": _summary(b_d, b_w),
                   "load_average_1m": [load_before, _load1()]}
            row["throughput_ratio"] = benchlib.ratio(row["batched"]["req_s"], row["batch_1_threads"]["req_s"])
            rows.append(row)
            benchlib.log(f"sweep: batch {size} wait {wait_ms} ms threads {threads}: {row['batched']['req_s']:.1f} "
                         f"img/s (p50/p99 {row['batched']['p50_ms']:.0f}/{row['batched']['p99_ms']:.0f} ms) vs "
                         f"batch-1 x{clients} threads {row['batch_1_threads']['req_s']:.1f}/s: "
                         f"{row['throughput_ratio']:.2f}x; load {row['load_average_1m']}")
    return {"clients": clients, "method": "DynamicBatcher + Predictor in-process, no HTTP", "rows": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="image folder (default: generate the sample data in a temp dir)")
    p.add_argument("--requests", type=int, default=400, help="requests per concurrency level and side")
    p.add_argument("--rounds", type=int, default=4, help="alternations of HTTP and in-process per level "
                   "(short alternating rounds keep a shared machine's changing load off the ratios)")
    p.add_argument("--seconds", type=float, default=60.0, help="time limit per level and side")
    p.add_argument("--soak-s", type=float, default=20.0, help=f"seconds of the {SOAK_CLIENTS}-client soak (0: skip)")
    p.add_argument("--quick", action="store_true", help="100 requests, 20 s per level, 10 s soak")
    p.add_argument("--sweep", action="store_true", help="try batching settings at 8 clients instead")
    p.add_argument("--out")
    p.add_argument("--health-probe", type=int, metavar="PORT", help=argparse.SUPPRESS)
    p.add_argument("--probe-s", type=float, default=20.0, help=argparse.SUPPRESS)
    p.add_argument("--probe-path", default=HEALTH_ROUTE, help=argparse.SUPPRESS)
    p.add_argument("--control-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.health_probe:
        print(json.dumps(health_probe(a.health_probe, a.probe_s, a.probe_path)))
        return 0
    if a.control_server:
        control_server(a.control_server)
        return 0
    if a.sweep:
        res = sweep(a.data)
    elif a.quick:
        res = run(a.data, requests=100, seconds=20.0, rounds=2, soak_s=10.0)
    else:
        res = run(a.data, requests=a.requests, seconds=a.seconds, rounds=a.rounds, soak_s=a.soak_s)
    benchlib.emit(res, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A deployed model's replica must be the process answering on its port (issue 15 item 6).

The port a replica gets is free when chosen, but another process can take it before the model server
binds it; the model server then dies (or lingers) with "Address already in use" while the other
process answers the health route. Readiness must notice, not declare the deployment healthy.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest
from google.cloud.aiplatform_v1 import types

from localcloud import runtime
from localcloud.config import ServerConfig
from localcloud.errors import RpcError
from localcloud.serving import Deployment, Replica, ServingRuntime, free_port
from localcloud.store import Store


class _Healthy(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def foreign_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Healthy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_a_health_answer_from_another_process_is_not_readiness(tmp_path, foreign_server):
    rt = ServingRuntime(ServerConfig(state_dir=tmp_path), Store(tmp_path / "db.sqlite3"))
    model = types.Model(name="projects/p/locations/l/models/1", version_id="1",
                        container_spec={"image_uri": "x", "health_route": "/health", "predict_route": "/predict"})
    d = Deployment("projects/p/locations/l/endpoints/2", types.DeployedModel(id="7"), model)
    # The "model server": alive, but it never got the port (another process holds it).
    squatted = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        r = Replica(0, port=foreign_server, pid=squatted.pid)
        assert runtime.listening_pids(foreign_server) == {os.getpid()}
        with pytest.raises(RpcError) as e:
            rt._wait_ready(d, r, timeout_s=10)
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert f"Port {foreign_server}" in e.value.message and "held by another process" in e.value.message
        assert not r.ready
    finally:
        squatted.kill()
        squatted.wait()


def test_the_replica_that_listens_is_ready(tmp_path):
    rt = ServingRuntime(ServerConfig(state_dir=tmp_path), Store(tmp_path / "db.sqlite3"))
    port = free_port(runtime.LOOPBACK)
    model = types.Model(name="projects/p/locations/l/models/1", version_id="1",
                        container_spec={"image_uri": "x", "health_route": "/health", "predict_route": "/predict"})
    d = Deployment("projects/p/locations/l/endpoints/2", types.DeployedModel(id="8"), model)
    code = ("import http.server as h, sys\n"
            "class H(h.BaseHTTPRequestHandler):\n"
            "    def do_GET(self): self.send_response(200); self.send_header('Content-Length','0'); self.end_headers()\n"
            f"h.HTTPServer(('127.0.0.1', {port}), H).serve_forever()\n")
    server = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        r = Replica(0, port=port, pid=server.pid)
        rt._wait_ready(d, r, timeout_s=30)
        assert r.ready
    finally:
        server.kill()
        server.wait()

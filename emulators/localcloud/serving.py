"""Deployed models as local serving processes, and the traffic router in front of them.

A deployed model runs its Model's serving container command (``container_spec``) as
``min_replica_count`` processes with Vertex's serving environment (AIP_HTTP_PORT,
AIP_PREDICT_ROUTE, AIP_HEALTH_ROUTE, AIP_STORAGE_URI, ...). A replica receives traffic only once
its health route answers 200; a replica that exits is restarted (as Vertex restarts a crashed
container) and receives traffic again when healthy. Routing follows the endpoint's traffic split
(weighted random, as Vertex does); a change of the split is one atomic swap, and an undeployed
model leaves the routing table before its in-flight requests are drained and its processes
stopped, so promotion and rollback fail no request.
"""

from __future__ import annotations

import itertools
import logging
import random
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import urllib3
from google.cloud.aiplatform_v1 import types

from localcloud import runtime
from localcloud.config import ServerConfig
from localcloud.errors import RpcError, failed_precondition
from localcloud.store import Store

log = logging.getLogger("localcloud.serving")

_http = urllib3.PoolManager(maxsize=64, block=False, retries=False)
# Vertex AI's message for a deployment whose container never answers its health route.
NEVER_READY = ("Model server never became ready. Please validate that your model file or container "
               "configuration are valid.")


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class Replica:
    index: int
    port: int = 0
    pid: int = 0
    ready: bool = False
    inflight: int = 0
    stopping: bool = False


@dataclass
class Deployment:
    endpoint: str  # endpoint resource name
    deployed_model: types.DeployedModel
    model: types.Model  # the deployed version
    replicas: list[Replica] = field(default_factory=list)
    deploying: bool = False  # DeployModel is still starting it: a replica that dies fails the deploy
    lock: threading.Condition = field(default_factory=threading.Condition)
    _rr: itertools.count = field(default_factory=itertools.count)

    @property
    def id(self) -> str:
        return self.deployed_model.id

    def pick(self) -> Replica | None:
        with self.lock:
            ready = [r for r in self.replicas if r.ready and not r.stopping]
            if not ready:
                return None
            replica = ready[next(self._rr) % len(ready)]
            replica.inflight += 1
            return replica

    def release(self, replica: Replica) -> None:
        with self.lock:
            replica.inflight -= 1
            self.lock.notify_all()


class ServingRuntime:
    def __init__(self, cfg: ServerConfig, store: Store):
        self.cfg = cfg
        self.store = store
        self._lock = threading.RLock()
        self.deployments: dict[tuple[str, str], Deployment] = {}  # (endpoint, deployed model id)
        self.splits: dict[str, dict[str, int]] = {}  # endpoint -> live traffic split
        self._stop = threading.Event()
        self._monitor = threading.Thread(target=self._watch, name="replica-monitor", daemon=True)

    def start_monitor(self) -> None:
        self._monitor.start()

    # ---- processes
    def _log_path(self, d: Deployment, r: Replica) -> Path:
        endpoint_id = d.endpoint.rsplit("/", 1)[-1]
        return self.cfg.state_dir / "logs" / "endpoints" / endpoint_id / f"{d.id}-replica{r.index}.log"

    def _launch(self, d: Deployment, r: Replica) -> None:
        spec = d.model.container_spec
        endpoint_id = d.endpoint.rsplit("/", 1)[-1]
        project = d.endpoint.split("/")[1]
        argv, image_env = runtime.container_argv(self.cfg, spec.image_uri, list(spec.command), list(spec.args))
        r.port = free_port(runtime.LOOPBACK)
        vertex_env = {
            "AIP_HTTP_PORT": str(r.port),
            "AIP_PREDICT_ROUTE": spec.predict_route or f"/v1/endpoints/{endpoint_id}/deployedModels/{d.id}:predict",
            "AIP_HEALTH_ROUTE": spec.health_route or f"/v1/endpoints/{endpoint_id}/deployedModels/{d.id}",
            "AIP_STORAGE_URI": d.model.artifact_uri,
            "AIP_DEPLOYED_MODEL_ID": d.id,
            "AIP_ENDPOINT_ID": endpoint_id,
            "AIP_PROJECT_NUMBER": project,
            "AIP_MACHINE_TYPE": d.deployed_model.dedicated_resources.machine_spec.machine_type or "automatic",
            "AIP_MODE": "PREDICTION",
            "AIP_MODE_VERSION": "1.0.0",
        }
        env = runtime.container_env(self.cfg, image_env, {e.name: e.value for e in spec.env}, vertex_env)
        proc = runtime.spawn(argv, env, self._log_path(d, r), cwd=self.cfg.root)
        r.pid, r.ready, r.stopping = proc.pid, False, False
        self.store.set_value(f"replica:{d.endpoint}/{d.id}/{r.index}", {"pid": r.pid, "port": r.port})
        log.info("deployed model %s replica %d: pid %d port %d", d.id, r.index, r.pid, r.port)

    def _health_url(self, d: Deployment, r: Replica) -> str:
        spec = d.model.container_spec
        endpoint_id = d.endpoint.rsplit("/", 1)[-1]
        route = spec.health_route or f"/v1/endpoints/{endpoint_id}/deployedModels/{d.id}"
        return f"http://{runtime.LOOPBACK}:{r.port}{route}"

    def _wait_ready(self, d: Deployment, r: Replica, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not self._stop.is_set():
            if not runtime.alive(r.pid):
                raise failed_precondition(
                    f"{NEVER_READY} The container of deployed model {d.id} exited. Model server logs: "
                    f"{self._log_path(d, r)}. Last lines:\n{runtime.tail(self._log_path(d, r))}")
            try:
                resp = _http.request("GET", self._health_url(d, r), timeout=2.0)
                if resp.status == 200:
                    self._check_owner(d, r)
                    with d.lock:
                        r.ready = True
                    return
            except urllib3.exceptions.HTTPError:
                pass
            time.sleep(0.2)
        if self._stop.is_set():  # the server is stopping: the DeployModel operation ends ABORTED
            raise RpcError(grpc.StatusCode.ABORTED, "interrupted by a restart of the local Vertex AI server; "
                                                    "retry the call")
        raise failed_precondition(
            f"{NEVER_READY} Deployed model {d.id}: {self._health_url(d, r)} did not answer 200 within "
            f"{timeout_s:.0f} s. Model server logs: {self._log_path(d, r)}. Last lines:\n"
            f"{runtime.tail(self._log_path(d, r))}")

    def _check_owner(self, d: Deployment, r: Replica) -> None:
        """The 200 must come from this replica: another process may hold the port (taken between
        choosing it and the replica binding it, which then fails with "Address already in use")."""
        owners = runtime.listening_pids(r.port)
        if owners is None or owners & runtime.session_pids(r.pid):
            return
        raise failed_precondition(
            f"{NEVER_READY} Port {r.port} of deployed model {d.id} is held by another process (pid(s) "
            f"{sorted(owners)}), which answered its health route; the model server (pid {r.pid}) could not "
            f"listen there. Last log lines:\n{runtime.tail(self._log_path(d, r))}")

    def start(self, endpoint: str, deployed_model: types.DeployedModel, model: types.Model,
              wait: bool = True) -> Deployment:
        """Start the replicas of a deployed model; with ``wait`` block until all are healthy (raises
        FAILED_PRECONDITION, after stopping them, when one never becomes ready)."""
        count = max(1, deployed_model.dedicated_resources.min_replica_count or 1)
        d = Deployment(endpoint, deployed_model, model, [Replica(i) for i in range(count)], deploying=wait)
        with self._lock:
            self.deployments[(endpoint, d.id)] = d
        try:
            for r in d.replicas:
                self._launch(d, r)
            if wait:
                for r in d.replicas:
                    self._wait_ready(d, r, self.cfg.deploy_timeout_s)
                d.deploying = False
            else:
                for r in d.replicas:
                    threading.Thread(target=self._ready_quietly, args=(d, r), daemon=True).start()
        except Exception:
            self.stop(endpoint, d.id, drain=False)
            raise
        return d

    def resize(self, endpoint: str, deployed_model_id: str, count: int) -> None:
        """Run ``count`` replicas (MutateDeployedModel's min_replica_count): start the new ones and wait
        until they are healthy, or drain and stop the surplus."""
        with self._lock:
            d = self.deployments.get((endpoint, deployed_model_id))
        if d is None:
            return
        count = max(1, count)
        added: list[Replica] = []
        d.deploying = True
        try:
            while len(d.replicas) < count:
                r = Replica(len(d.replicas))
                self._launch(d, r)
                with d.lock:
                    d.replicas.append(r)
                added.append(r)
                self._wait_ready(d, r, self.cfg.deploy_timeout_s)
        except Exception:  # none of the new replicas stays: the deployed model keeps its old size
            with d.lock:
                for r in added:
                    r.stopping = True
                d.replicas = [r for r in d.replicas if r not in added]
            for r in added:
                runtime.stop_group(r.pid, grace_s=5)
                self.store.delete_value(f"replica:{endpoint}/{deployed_model_id}/{r.index}")
            raise
        finally:
            d.deploying = False
        surplus = d.replicas[count:]
        with d.lock:
            for r in surplus:
                r.stopping = True
            d.lock.wait_for(lambda: all(r.inflight == 0 for r in surplus), timeout=30)
            d.replicas = d.replicas[:count]
        for r in surplus:
            runtime.stop_group(r.pid, grace_s=10)
            self.store.delete_value(f"replica:{endpoint}/{deployed_model_id}/{r.index}")

    def _ready_quietly(self, d: Deployment, r: Replica) -> None:
        try:
            self._wait_ready(d, r, self.cfg.deploy_timeout_s)
        except RpcError as e:
            log.error("%s", e.message)

    def stop(self, endpoint: str, deployed_model_id: str, drain: bool = True, grace_s: float = 30) -> None:
        """Take a deployed model out of service: (already out of routing) wait for its in-flight
        requests, then SIGTERM its replicas (the serving app drains too)."""
        with self._lock:
            d = self.deployments.pop((endpoint, deployed_model_id), None)
        if d is None:
            return
        with d.lock:
            for r in d.replicas:
                r.stopping = True
            if drain:
                d.lock.wait_for(lambda: all(r.inflight == 0 for r in d.replicas), timeout=grace_s)
        for r in d.replicas:
            if r.pid:
                runtime.stop_group(r.pid, grace_s=10)
            self.store.delete_value(f"replica:{endpoint}/{deployed_model_id}/{r.index}")

    def stop_all(self) -> None:
        self._stop.set()
        for endpoint, dm_id in list(self.deployments):
            self.stop(endpoint, dm_id, drain=True, grace_s=5)

    def kill_leftovers(self) -> int:
        """Stop replica processes a crashed server left behind (their pids are in the store)."""
        n = 0
        for key, info in self.store.values_with_prefix("replica:").items():
            if runtime.alive(info["pid"]):
                runtime.stop_group(info["pid"], grace_s=5)
                n += 1
            self.store.delete_value(key)
        return n

    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            with self._lock:
                deployments = list(self.deployments.values())
            for d in deployments:
                if d.deploying:  # a replica dying while DeployModel waits fails the deploy instead
                    continue
                for r in list(d.replicas):
                    with d.lock:  # stop() marks replicas stopping under this lock: never relaunch those
                        if r.stopping or not r.pid or runtime.alive(r.pid):
                            continue
                        log.warning("deployed model %s replica %d (pid %d) exited; restarting it",
                                    d.id, r.index, r.pid)
                        r.ready = False
                        try:
                            self._launch(d, r)
                        except Exception:
                            log.exception("restarting deployed model %s replica %d failed", d.id, r.index)
                            continue
                    threading.Thread(target=self._ready_quietly, args=(d, r), daemon=True).start()

    # ---- routing
    def set_split(self, endpoint: str, split: dict[str, int]) -> None:
        with self._lock:
            self.splits[endpoint] = {k: int(v) for k, v in split.items() if int(v) > 0}

    def route(self, endpoint: str) -> tuple[Deployment, Replica]:
        # Split, deployment and replica are picked under the lock set_split() takes, and the replica's
        # in-flight count is raised before it is released: a model leaving the split is either not
        # chosen or drained by stop(), so promotion and undeploy never fail a request.
        with self._lock:
            split = dict(self.splits.get(endpoint) or {})
            if not split:
                # Vertex AI's answer (HTTP 400) for an endpoint whose split is empty.
                raise failed_precondition(f"Endpoint {endpoint} doesn't have traffic_split.")
            ids = list(split)
            chosen = random.choices(ids, weights=[split[i] for i in ids])[0]
            d = self.deployments.get((endpoint, chosen))
            replica = d.pick() if d else None
        if replica is None:
            raise RpcError(grpc.StatusCode.UNAVAILABLE,
                           f"Deployed model {chosen} of endpoint {endpoint} has no ready replica (starting or "
                           "restarting); retry")
        return d, replica

    def forward(self, d: Deployment, r: Replica, body: bytes, content_type: str = "application/json",
                raw: bool = False) -> tuple[int, bytes, str]:
        """POST ``body`` to the replica's predict route; (HTTP status, body, content type)."""
        spec = d.model.container_spec
        endpoint_id = d.endpoint.rsplit("/", 1)[-1]
        route = spec.predict_route or f"/v1/endpoints/{endpoint_id}/deployedModels/{d.id}:predict"
        url = f"http://{runtime.LOOPBACK}:{r.port}{route}"
        try:
            try:
                resp = _http.request("POST", url, body=body, headers={"Content-Type": content_type},
                                     timeout=self.cfg.predict_timeout_s)
            except urllib3.exceptions.ProtocolError:
                # Mostly a pooled keep-alive connection the model server had just closed (idle
                # timeout): send once more on a fresh connection (a prediction is idempotent).
                resp = _http.request("POST", url, body=body, headers={"Content-Type": content_type,
                                                                      "Connection": "close"},
                                     timeout=self.cfg.predict_timeout_s)
            return resp.status, resp.data, resp.headers.get("Content-Type", "application/json")
        except urllib3.exceptions.HTTPError as e:
            raise RpcError(grpc.StatusCode.UNAVAILABLE,
                           f"Deployed model {d.id} did not answer: {e}") from None
        finally:
            d.release(r)

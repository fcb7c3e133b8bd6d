"""Wiring: one process serving the gRPC API, the HTTP side and the background runtimes."""

from __future__ import annotations

import fcntl
import json
import logging
import os
from concurrent import futures

import grpc
from google.cloud.aiplatform_v1 import types

from localcloud.automl_models import AutoMLModelService, AutoMLServingRuntime
from localcloud.config import ServerConfig, StateDirBusy, lock_state_dir  # noqa: F401 - StateDirBusy re-exported
from localcloud.datasets import DATASET, DatasetService
from localcloud.endpoints import KIND as ENDPOINT
from localcloud.endpoints import EndpointService
from localcloud.errors import not_found
from localcloud.faults import Faults
from localcloud.gcs import Gcs
from localcloud.http_api import HttpApi
from localcloud.jobs import KIND as JOB
from localcloud.jobs import JobService
from localcloud.lro import Operations
from localcloud.models import KIND as MODEL_VERSION
from localcloud.models import ModelService
from localcloud.pipelines import KIND as TRAINING_PIPELINE
from localcloud.pipelines import PipelineService
from localcloud.prediction import PredictionService
from localcloud.remote_config import RemoteConfig
from localcloud.store import Store

log = logging.getLogger("localcloud")
MAX_MESSAGE_BYTES = 8 * 1024 * 1024  # above the 1.5 MB predict limit, so that limit answers, not gRPC's


class LocalCloud:
    def __init__(self, cfg: ServerConfig, lock_file=None):
        self.cfg = cfg
        # One server per state dir (held for the server's lifetime; __main__ takes it before the imports).
        self._lock_file = lock_file or lock_state_dir(cfg.state_dir)
        self.store = Store(cfg.state_dir / "localcloud.sqlite3")
        self.faults = Faults()
        self.operations = Operations(self.store, self.faults)
        self.models = ModelService(self.store, self.operations, self.faults)
        self.serving = AutoMLServingRuntime(cfg, self.store)  # a ServingRuntime that also serves AutoML models
        self.endpoints = EndpointService(cfg, self.store, self.operations, self.faults, self.models, self.serving)
        self.prediction = PredictionService(self.endpoints, self.serving, self.faults)
        self.jobs = JobService(cfg, self.store, self.operations, self.faults)
        self.remote_config = RemoteConfig(self.store)
        gcs = Gcs(cfg.storage_emulator_host)
        self.datasets = DatasetService(self.store, self.operations, self.faults, gcs)
        self.pipelines = PipelineService(cfg, self.store, self.operations, self.faults, self.datasets, self.models)
        self.automl_models = AutoMLModelService(self.store, self.operations, self.faults, self.models, gcs)
        self._grpc: grpc.Server | None = None
        self._http: HttpApi | None = None

    def start(self) -> None:
        aborted = self.operations.recover()
        leftovers = self.serving.kill_leftovers()
        resumed = self.jobs.recover() + self.pipelines.recover()
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="rpc"), options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ])
        for service in (self.jobs, self.models, self.automl_models, self.endpoints, self.prediction, self.operations,
                        self.datasets, self.pipelines):
            self._grpc.add_generic_rpc_handlers((service.handler(),))
        self.cfg.grpc_port = self._grpc.add_insecure_port(f"{self.cfg.host}:{self.cfg.grpc_port}")
        self._grpc.start()
        self._http = HttpApi(self, self.cfg.host, self.cfg.http_port)
        self.cfg.http_port = self._http.server_address[1]
        self._http.start()
        restored = self.endpoints.restore()
        self.serving.start_monitor()
        info = {"pid": os.getpid(), "grpc": f"{self.cfg.host}:{self.cfg.grpc_port}",
                "http": f"{self.cfg.host}:{self.cfg.http_port}", "state_dir": str(self.cfg.state_dir)}
        tmp = self.cfg.state_dir / "server.json.tmp"
        tmp.write_text(json.dumps(info))
        tmp.replace(self.cfg.state_dir / "server.json")
        log.info("local Vertex AI server: gRPC %s, HTTP %s, state %s (restored %d deployed models, resumed %d "
                 "jobs, aborted %d operations, stopped %d leftover processes)", info["grpc"], info["http"],
                 self.cfg.state_dir, restored, resumed, aborted, leftovers)

    def stop(self) -> None:
        """Graceful stop: cancel running jobs, drain and stop serving processes (deployments stay
        recorded and are served again on the next start)."""
        self.jobs.shutdown()
        self.pipelines.shutdown()
        self.serving.stop_all()
        if self._grpc:
            self._grpc.stop(grace=2).wait(5)
        if self._http:
            self._http.stop()
        self.operations.wait_all(timeout=5)
        (self.cfg.state_dir / "server.json").unlink(missing_ok=True)
        self.store.close()
        fcntl.flock(self._lock_file, fcntl.LOCK_UN)
        self._lock_file.close()

    # ---- admin helpers
    def find_job(self, job_id: str) -> str:
        for job in self.store.list(JOB, types.CustomJob):
            if job.name.rsplit("/", 1)[-1] == job_id:
                return job.name
        raise not_found("CustomJob", job_id)

    def find_pipeline(self, pipeline_id: str) -> str:
        for p in self.store.list(TRAINING_PIPELINE, types.TrainingPipeline):
            if p.name.rsplit("/", 1)[-1] == pipeline_id:
                return p.name
        raise not_found("TrainingPipeline", pipeline_id)

    def state(self) -> dict:
        def dump(kind, cls):
            return [type(m).to_dict(m, use_integers_for_enums=False) for m in self.store.list(kind, cls)]

        return {
            "custom_jobs": dump(JOB, types.CustomJob),
            "datasets": dump(DATASET, types.Dataset),
            "training_pipelines": dump(TRAINING_PIPELINE, types.TrainingPipeline),
            "model_versions": dump(MODEL_VERSION, types.Model),
            "endpoints": dump(ENDPOINT, types.Endpoint),
            "routing": {ep: split for ep, split in self.serving.splits.items()},
            "replicas": {f"{ep}/{dm}": [{"index": r.index, "pid": r.pid, "port": r.port, "ready": r.ready}
                                        for r in d.replicas] for (ep, dm), d in self.serving.deployments.items()},
        }

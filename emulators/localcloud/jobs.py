"""JobService: custom jobs as local processes.

Each worker pool's container command runs as ``replica_count`` processes with the environment Vertex
AI gives a custom job: AIP_MODEL_DIR / AIP_CHECKPOINT_DIR / AIP_TENSORBOARD_LOG_DIR under the base
output directory, CLOUD_ML_JOB_ID, and for several replicas TF_CONFIG / CLUSTER_SPEC (pool 0 is the
chief, pool 1 the workers, pool 2 parameter servers, pool 3 the evaluator) with a local port per
replica, so a 2-replica job really trains with MultiWorkerMirroredStrategy.

States follow Vertex: QUEUED -> PENDING -> RUNNING -> SUCCEEDED | FAILED | CANCELLING -> CANCELLED.
The job succeeds when the chief (workerpool0-0) exits 0; any replica exiting non-zero fails it with
Vertex's message ("The replica workerpool0-0 exited with a non-zero status of 2 ..."). A preempted
job (fault injection, or a restart of this server) restarts its replicas, which resume from their
checkpoints as on Vertex.
"""

from __future__ import annotations

import json
import logging
import threading
import time

import grpc
from google.cloud.aiplatform_v1 import types
from google.longrunning import operations_pb2
from google.protobuf import empty_pb2
from google.rpc import status_pb2

from localcloud import filters, rules, runtime
from localcloud.config import ServerConfig
from localcloud.errors import failed_precondition, not_found
from localcloud.lro import Operations, now
from localcloud.models import _order
from localcloud.rpc import paginate, service_handler
from localcloud.serving import free_port
from localcloud.store import Store

log = logging.getLogger("localcloud.jobs")
KIND = "custom_job"
SERVICE = "google.cloud.aiplatform.v1.JobService"
S = types.JobState
TERMINAL = {S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED, S.JOB_STATE_CANCELLED, S.JOB_STATE_EXPIRED}
POOL_ROLES = ("chief", "worker", "ps", "evaluator")


class _Run:
    """The live processes of one job attempt."""

    def __init__(self):
        self.procs: dict[str, object] = {}  # "workerpool0-0" -> Popen
        self.cancel = threading.Event()
        self.preempt = threading.Event()
        self.fail_message: str | None = None


class JobService:
    def __init__(self, cfg: ServerConfig, store: Store, operations: Operations, faults):
        self.cfg = cfg
        self.store = store
        self.operations = operations
        self.faults = faults
        self._runs: dict[str, _Run] = {}
        self._lock = threading.Lock()

    # ---- state helpers
    def job(self, name: str) -> types.CustomJob:
        rules.parse_name(name, "customJobs")
        found = self.store.get(KIND, name, types.CustomJob)
        if found is None:
            raise not_found("CustomJob", name)
        return found

    def _set_state(self, name: str, state, error: tuple[int, str] | None = None) -> types.CustomJob:
        with self.store.tx():
            job = self.job(name)
            if job.state in TERMINAL:
                return job
            if job.state == S.JOB_STATE_CANCELLING and state not in TERMINAL:
                return job  # a cancel wins over the supervisor's PENDING/RUNNING
            job.state = state
            ts = now()
            job.update_time = ts
            if state == S.JOB_STATE_RUNNING and not job.start_time:
                job.start_time = ts
            if state in TERMINAL:
                job.end_time = ts
            if error:
                job.error = status_pb2.Status(code=error[0], message=error[1])
            self.store.put(KIND, name, job, parent=name.rsplit("/customJobs/", 1)[0])
        log.info("custom job %s: %s%s", name.rsplit("/", 1)[-1], state.name, f" ({error[1]})" if error else "")
        return job

    # ---- RPCs
    def create_custom_job(self, request: types.CreateCustomJobRequest) -> types.CustomJob:
        rules.parse_parent(request.parent)
        job = types.CustomJob(request.custom_job)
        rules.display_name(job.display_name, "custom_job")
        rules.labels(dict(job.labels), "custom_job")
        spec = job.job_spec
        pools = list(spec.worker_pool_specs)
        if not pools or not any(p.replica_count for p in pools):
            raise rules.invalid("custom_job.job_spec.worker_pool_specs must have at least one worker pool")
        if pools[0].replica_count != 1:
            raise rules.invalid("custom_job.job_spec.worker_pool_specs[0].replica_count must be 1 (the chief)")
        for i, pool in enumerate(pools):
            if not pool.replica_count:
                continue
            if not pool.machine_spec.machine_type:
                raise rules.invalid(f"worker_pool_specs[{i}].machine_spec.machine_type is required")
            if not pool.container_spec.image_uri:
                raise rules.invalid(f"worker_pool_specs[{i}]: the local Vertex AI server runs container_spec "
                                    "jobs only (container_spec.image_uri is required)")
            if bool(pool.machine_spec.accelerator_count) != bool(pool.machine_spec.accelerator_type):
                raise rules.invalid(f"worker_pool_specs[{i}].machine_spec: accelerator_type and accelerator_count "
                                    "must be set together")
        if spec.base_output_directory.output_uri_prefix:
            rules.gcs_uri(spec.base_output_directory.output_uri_prefix,
                          "custom_job.job_spec.base_output_directory.output_uri_prefix")
        name = f"{request.parent}/customJobs/{self.store.next_id('custom_job') + 3_000_000_000_000_000}"
        ts = now()
        job.name = name
        job.state = S.JOB_STATE_QUEUED
        job.create_time = ts
        job.update_time = ts
        self.store.put(KIND, name, job, parent=request.parent)
        self._launch(name)
        return job

    def get_custom_job(self, request: types.GetCustomJobRequest) -> types.CustomJob:
        return self.job(request.name)

    def list_custom_jobs(self, request: types.ListCustomJobsRequest) -> types.ListCustomJobsResponse:
        rules.parse_parent(request.parent)
        terms = filters.parse(request.filter)
        found = [j for j in self.store.list(KIND, types.CustomJob, parent=request.parent)
                 if filters.matches(terms, {"display_name": j.display_name, "state": j.state.name}, dict(j.labels))]
        page, token = paginate(_order(found, getattr(request, "order_by", "")), request.page_size, request.page_token)
        return types.ListCustomJobsResponse(custom_jobs=page, next_page_token=token)

    def cancel_custom_job(self, request: types.CancelCustomJobRequest) -> empty_pb2.Empty:
        job = self.job(request.name)
        if job.state in TERMINAL:
            raise failed_precondition(f"CustomJob {request.name} is already in state {job.state.name}; "
                                      "only a running job can be cancelled")
        self._set_state(request.name, S.JOB_STATE_CANCELLING)
        run = self._runs.get(request.name)
        if run:
            run.cancel.set()
        else:
            self._set_state(request.name, S.JOB_STATE_CANCELLED, (grpc.StatusCode.CANCELLED.value[0], "CANCELED"))
        return empty_pb2.Empty()

    def delete_custom_job(self, request: types.DeleteCustomJobRequest):
        job = self.job(request.name)
        if job.state not in TERMINAL:
            raise failed_precondition(f"CustomJob {request.name} is {job.state.name}; cancel it before deleting")
        self.store.delete(KIND, request.name)
        return self.operations.start(request.name, "DeleteCustomJob", types.DeleteOperationMetadata(
            generic_metadata=types.GenericOperationMetadata(create_time=now(), update_time=now())), lambda: None)

    # ---- fault injection / lifecycle (admin API)
    def preempt(self, name: str) -> None:
        run = self._runs.get(name)
        if run is None or self.job(name).state != S.JOB_STATE_RUNNING:
            raise failed_precondition(f"CustomJob {name} is not running")
        run.preempt.set()

    def fail(self, name: str, message: str) -> None:
        run = self._runs.get(name)
        if run is None:
            raise failed_precondition(f"CustomJob {name} is not running")
        run.fail_message = message
        run.cancel.set()

    def recover(self) -> int:
        """After a (re)start: stop what a crashed server left running, then restart unfinished jobs
        (their replicas resume from checkpoints, as after a preemption on Vertex)."""
        n = 0
        for key, info in self.store.values_with_prefix("job-replica:").items():
            if runtime.alive(info["pid"]):
                runtime.stop_group(info["pid"], grace_s=5)
            self.store.delete_value(key)
        for job in self.store.list(KIND, types.CustomJob):
            if job.state == S.JOB_STATE_CANCELLING:
                self._set_state(job.name, S.JOB_STATE_CANCELLED, (grpc.StatusCode.CANCELLED.value[0], "CANCELED"))
            elif job.state not in TERMINAL:
                self._launch(job.name)
                n += 1
        return n

    def shutdown(self) -> None:
        """Server stop (``make stop``): cancel running jobs; nothing restarts them."""
        for name, run in list(self._runs.items()):
            self._set_state(name, S.JOB_STATE_CANCELLING)
            run.cancel.set()
        deadline = time.monotonic() + 20
        while self._runs and time.monotonic() < deadline:
            time.sleep(0.1)

    # ---- running
    def _launch(self, name: str) -> None:
        run = _Run()
        with self._lock:
            self._runs[name] = run
        threading.Thread(target=self._supervise, args=(name, run), name=f"job-{name.rsplit('/', 1)[-1]}",
                         daemon=True).start()

    def _replica_envs(self, job: types.CustomJob) -> dict[str, tuple[int, int, dict]]:
        """replica key -> (pool, index, Vertex environment)."""
        job_id = job.name.rsplit("/", 1)[-1]
        project = job.name.split("/")[1]
        location = job.name.split("/")[3]
        pools = list(job.job_spec.worker_pool_specs)
        base_env = {"CLOUD_ML_JOB_ID": job_id, "CLOUD_ML_PROJECT_ID": project, "CLOUD_ML_REGION": location,
                    "GOOGLE_CLOUD_PROJECT": project}
        prefix = job.job_spec.base_output_directory.output_uri_prefix.rstrip("/")
        if prefix:
            base_env.update(AIP_MODEL_DIR=f"{prefix}/model/", AIP_CHECKPOINT_DIR=f"{prefix}/checkpoints/",
                            AIP_TENSORBOARD_LOG_DIR=f"{prefix}/logs/")
        total = sum(p.replica_count for p in pools)
        addresses = {p: [f"{runtime.LOOPBACK}:{free_port(runtime.LOOPBACK)}" for _ in range(pool.replica_count)]
                     for p, pool in enumerate(pools)}
        out = {}
        for p, pool in enumerate(pools):
            for i in range(pool.replica_count):
                env = dict(base_env)
                if total > 1:
                    cluster = {POOL_ROLES[q]: addrs for q, addrs in addresses.items() if addrs}
                    env["TF_CONFIG"] = json.dumps({
                        "cluster": cluster, "task": {"type": POOL_ROLES[p], "index": i, "trial": ""},
                        "environment": "cloud", "job": {"job_name": job_id},
                    })
                    env["CLUSTER_SPEC"] = json.dumps({
                        "cluster": {f"workerpool{q}": addrs for q, addrs in addresses.items() if addrs},
                        "environment": "cloud", "task": {"type": f"workerpool{p}", "index": i},
                    })
                out[f"workerpool{p}-{i}"] = (p, i, env)
        return out

    def _start_replicas(self, job: types.CustomJob, run: _Run) -> None:
        pools = list(job.job_spec.worker_pool_specs)
        job_id = job.name.rsplit("/", 1)[-1]
        for key, (p, _, vertex_env) in self._replica_envs(job).items():
            spec = pools[p].container_spec
            argv, image_env = runtime.container_argv(self.cfg, spec.image_uri, list(spec.command), list(spec.args))
            env = runtime.container_env(self.cfg, image_env, {e.name: e.value for e in spec.env}, vertex_env)
            log_path = self.cfg.state_dir / "logs" / "customJobs" / job_id / f"{key}.log"
            proc = runtime.spawn(argv, env, log_path, cwd=self.cfg.root)
            run.procs[key] = proc
            self.store.set_value(f"job-replica:{job.name}/{key}", {"pid": proc.pid})

    def _stop_replicas(self, job_name: str, run: _Run, sig_grace: float = 10) -> None:
        for key, proc in run.procs.items():
            if proc.poll() is None:
                runtime.stop_group(proc.pid, grace_s=sig_grace)
            proc.wait()
            self.store.delete_value(f"job-replica:{job_name}/{key}")

    def _supervise(self, name: str, run: _Run) -> None:
        try:
            self._supervise_inner(name, run)
        except Exception as e:
            log.exception("custom job %s: supervisor failed", name)
            self._stop_replicas(name, run, 2)
            self._set_state(name, S.JOB_STATE_FAILED, (grpc.StatusCode.INTERNAL.value[0],
                                                       f"local Vertex AI server error: {e}"))
        finally:
            with self._lock:
                self._runs.pop(name, None)

    def _supervise_inner(self, name: str, run: _Run) -> None:
        job = self._set_state(name, S.JOB_STATE_PENDING)
        if job.state in TERMINAL:
            return
        if run.cancel.is_set():  # cancelled (or failed) before its replicas started
            self._set_state(name, S.JOB_STATE_FAILED if run.fail_message else S.JOB_STATE_CANCELLED,
                            (grpc.StatusCode.INTERNAL.value[0], run.fail_message) if run.fail_message
                            else (grpc.StatusCode.CANCELLED.value[0], "CANCELED"))
            return
        try:
            self._start_replicas(job, run)
        except runtime.ImageNotMapped as e:
            self._set_state(name, S.JOB_STATE_FAILED, (grpc.StatusCode.FAILED_PRECONDITION.value[0], str(e)))
            return
        self._set_state(name, S.JOB_STATE_RUNNING)
        job_id = name.rsplit("/", 1)[-1]
        while True:
            if run.cancel.wait(0.3):
                self._stop_replicas(name, run)
                if run.fail_message:
                    self._set_state(name, S.JOB_STATE_FAILED,
                                    (grpc.StatusCode.INTERNAL.value[0], run.fail_message))
                else:
                    self._set_state(name, S.JOB_STATE_CANCELLED, (grpc.StatusCode.CANCELLED.value[0], "CANCELED"))
                return
            if run.preempt.is_set():
                run.preempt.clear()
                log.warning("custom job %s: preempted; restarting its replicas", job_id)
                for proc in run.procs.values():
                    if proc.poll() is None:
                        runtime.stop_group(proc.pid, grace_s=0)
                self._stop_replicas(name, run, 0)
                run.procs.clear()
                self._start_replicas(self.job(name), run)
                continue
            codes = {key: proc.poll() for key, proc in run.procs.items()}
            failed = {k: c for k, c in codes.items() if c not in (None, 0)}
            if failed:
                key, code = sorted(failed.items())[0]
                self._stop_replicas(name, run, 5)
                log_path = self.cfg.state_dir / "logs" / "customJobs" / job_id / f"{key}.log"
                self._set_state(name, S.JOB_STATE_FAILED, (grpc.StatusCode.INTERNAL.value[0], (
                    f"The replica {key} exited with a non-zero status of {code}. To find out more about why "
                    f"your job exited please check the logs: {log_path}\nLast lines:\n{runtime.tail(log_path, 8)}")))
                return
            if codes.get("workerpool0-0") == 0:
                self._stop_replicas(name, run, 30)  # workers finish with the chief
                self._set_state(name, S.JOB_STATE_SUCCEEDED)
                return

    def handler(self) -> grpc.GenericRpcHandler:
        return service_handler(SERVICE, {
            "CreateCustomJob": (types.CreateCustomJobRequest, types.CustomJob, self.create_custom_job),
            "GetCustomJob": (types.GetCustomJobRequest, types.CustomJob, self.get_custom_job),
            "ListCustomJobs": (types.ListCustomJobsRequest, types.ListCustomJobsResponse, self.list_custom_jobs),
            "CancelCustomJob": (types.CancelCustomJobRequest, empty_pb2.Empty, self.cancel_custom_job),
            "DeleteCustomJob": (types.DeleteCustomJobRequest, operations_pb2.Operation, self.delete_custom_job),
        }, self.faults)


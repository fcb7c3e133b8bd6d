"""Local Vertex AI server running the real trainer image (``*/dual-deploy/trainer*`` -> ``python -m
dualml.trainer``, emulators/localcloud.yaml) as a CustomJob: a 2-replica job really trains with
MultiWorkerMirroredStrategy from the TF_CONFIG the server sets, and a preempted job resumes from the
checkpoints it synced to AIP_CHECKPOINT_DIR. Tiny data (60 images at 48 px), 32 px model, few epochs.
"""

from __future__ import annotations

import json
import re
import time
import uuid

import pytest

from dualml import sample_data, storage

PROJECT, REGION = "local-project", "us-central1"
TRAINER_IMAGE = "us-central1-docker.pkg.dev/local-project/dual-deploy/trainer-cpu:test"
TINY = ["--architecture", "mobilenet_v3_small", "--image-size", "32", "--batch-size", "8", "--weights", "none"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def flowers(tmp_path_factory):
    root = tmp_path_factory.mktemp("flowers")
    sample_data.generate(root, per_class=12, size=48)
    return root


@pytest.fixture
def bucket(gcs_emulator):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage as gcs

    name = f"lc-trainer-{uuid.uuid4().hex[:10]}"
    gcs.Client(project=PROJECT, credentials=AnonymousCredentials()).create_bucket(name)
    return name


@pytest.fixture(scope="module")
def hook(localcloud):
    from airflow.providers.google.cloud.hooks.vertex_ai.custom_job import CustomJobHook

    return CustomJobHook()


def _pool(args: list[str]) -> dict:
    return {"machine_spec": {"machine_type": "n1-standard-4"}, "replica_count": 1,
            "container_spec": {"image_uri": TRAINER_IMAGE, "args": args}}


def _wait(hook, job_id: str, states: set[str], timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        job = hook.get_custom_job(project_id=PROJECT, region=REGION, custom_job=job_id)
        if job.state.name in states or time.monotonic() > deadline:
            return job
        time.sleep(1)


def _log(localcloud, job_id: str, replica: str = "workerpool0-0") -> str:
    path = localcloud.state_dir / "logs" / "customJobs" / job_id / f"{replica}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def test_two_replica_job_trains_with_multi_worker_mirrored_strategy(hook, localcloud, flowers, bucket):
    base = f"gs://{bucket}/jobs/mwms"
    args = TINY + ["--data-uri", str(flowers), "--epochs", "1"]
    job = hook.create_custom_job(project_id=PROJECT, region=REGION, custom_job={
        "display_name": "lc-mwms", "labels": {"test": "mwms"},
        "job_spec": {"worker_pool_specs": [_pool(args), _pool(args)], "base_output_directory": {"output_uri_prefix": base}},
    })
    job_id = job.name.rsplit("/", 1)[-1]
    done = _wait(hook, job_id, {"JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED"}, timeout=600)
    chief, worker = _log(localcloud, job_id), _log(localcloud, job_id, "workerpool1-0")
    # The server's part: both replicas ran with a TF_CONFIG that formed one 2-replica cluster.
    assert "strategy=multi_worker_mirrored replicas=2 chief=True" in chief, chief[-3000:]
    assert "strategy=multi_worker_mirrored replicas=2 chief=False" in worker, worker[-3000:]
    assert done.state.name == "JOB_STATE_SUCCEEDED", f"{done.error.message}\n--- chief\n{chief[-3000:]}\n--- worker\n{worker[-3000:]}"
    # One model trained in step: both workers log the same all-reduced loss and accuracy each epoch.
    epoch_logs = [re.findall(r"accuracy: [0-9.]+ - loss: [0-9.]+ - val_accuracy: [0-9.]+ - val_loss: [0-9.]+", log)
                  for log in (chief, worker)]
    assert len(epoch_logs[0]) == 1 and epoch_logs[0] == epoch_logs[1], epoch_logs
    config = json.loads(storage.read_text(f"{base}/model/training_config.json"))
    assert (config["strategy"], config["replicas"]) == ("multi_worker_mirrored", 2)
    assert config["config"]["model_dir"] == f"{base}/model/"  # AIP_MODEL_DIR
    metrics = json.loads(storage.read_text(f"{base}/model/metrics.json"))
    assert metrics["num_examples"] == 10 and 0.0 <= metrics["accuracy"] <= 1.0
    assert any(u.endswith("/saved_model.pb") for u in storage.list_files(f"{base}/model/"))


def test_preempted_job_resumes_from_its_checkpoint(hook, localcloud, flowers, bucket):
    base = f"gs://{bucket}/jobs/preempt"
    epochs = 4
    job = hook.create_custom_job(project_id=PROJECT, region=REGION, custom_job={
        "display_name": "lc-preempt", "job_spec": {
            "worker_pool_specs": [_pool(TINY + ["--data-uri", str(flowers), "--epochs", str(epochs)])],
            "base_output_directory": {"output_uri_prefix": base}},
    })
    job_id = job.name.rsplit("/", 1)[-1]

    # Preempt once the first epoch's checkpoint (weights and epoch counter) is synced to GCS.
    wanted = {"latest.weights.h5", "training_metadata.json"}
    deadline = time.monotonic() + 420
    while time.monotonic() < deadline:
        try:
            names = {u.rsplit("/", 1)[-1] for u in storage.list_files(f"{base}/checkpoints/")}
        except storage.StorageError:
            names = set()
        if wanted <= names:
            break
        state = hook.get_custom_job(project_id=PROJECT, region=REGION, custom_job=job_id).state.name
        assert state in ("JOB_STATE_QUEUED", "JOB_STATE_PENDING", "JOB_STATE_RUNNING"), _log(localcloud, job_id)[-3000:]
        time.sleep(0.2)
    else:
        pytest.fail(f"no checkpoint synced within 420 s:\n{_log(localcloud, job_id)[-3000:]}")
    time.sleep(0.5)  # let the sync of that epoch finish
    localcloud.preempt(job_id)

    done = _wait(hook, job_id, {"JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED"}, timeout=600)
    log = _log(localcloud, job_id)
    assert done.state.name == "JOB_STATE_SUCCEEDED", f"{done.error.message}\n{log[-4000:]}"
    assert log.count("strategy=default replicas=1") == 2  # started twice: before and after the preemption
    assert f"restored checkpoints from {base}/checkpoints/" in log
    history = json.loads(storage.read_text(f"{base}/model/history.json"))
    # Keras' BackupAndRestore resumed after the epochs done before the preemption: this attempt ran fewer.
    assert 1 <= len(history["loss"]) < epochs, history

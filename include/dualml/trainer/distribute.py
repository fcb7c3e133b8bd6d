"""Pick the tf.distribute strategy from the cluster Vertex AI gives the job.

One replica, no GPU -> default strategy; one GPU -> OneDeviceStrategy; several GPUs on one
machine -> MirroredStrategy; several workers (TF_CONFIG with more than one task) ->
MultiWorkerMirroredStrategy. Only the chief writes the exported model.
"""

from __future__ import annotations

import json
import os


def read_tf_config(environ=os.environ) -> dict:
    raw = environ.get("TF_CONFIG") or ""
    return json.loads(raw) if raw.strip() else {}


def num_workers(tf_config: dict) -> int:
    cluster = tf_config.get("cluster", {})
    return sum(len(cluster.get(role, [])) for role in ("chief", "worker"))


def strategy_kind(tf_config: dict, num_gpus: int) -> str:
    if num_workers(tf_config) > 1:
        return "multi_worker_mirrored"
    if num_gpus > 1:
        return "mirrored"
    if num_gpus == 1:
        return "one_device_gpu"
    return "default"


def is_chief(tf_config: dict) -> bool:
    """Chief = task 'chief', or worker 0 when the cluster has no chief, or no cluster at all."""
    task = tf_config.get("task", {})
    if not task:
        return True
    if task.get("type") == "chief":
        return True
    has_chief = bool(tf_config.get("cluster", {}).get("chief"))
    return task.get("type") == "worker" and task.get("index", 0) == 0 and not has_chief


def make_strategy(kind: str):
    import tensorflow as tf

    if kind == "multi_worker_mirrored":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if kind == "mirrored":
        return tf.distribute.MirroredStrategy()
    if kind == "one_device_gpu":
        return tf.distribute.OneDeviceStrategy("/gpu:0")
    return tf.distribute.get_strategy()

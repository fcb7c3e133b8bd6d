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


def allow_keras_fit_multi_worker(model, strategy, element_spec) -> None:
    """Make Keras 3's ``fit`` run under ``MultiWorkerMirroredStrategy`` (call it before ``fit``).

    Keras 3 (3.15 here, keras-team/keras#20585, tensorflow/tensorflow#72388) breaks on a
    multi-worker cluster in two places, each fixed here without changing what is trained:

    - before the first step it builds the model's metrics from a *data batch* it all-reduces
      eagerly across workers (``strategy.reduce`` of a PerReplica batch: "Attempt to convert a
      value (PerReplica ...) to a Tensor"). Only shapes and dtypes are needed, so this model
      builds from the dataset's ``element_spec`` instead;
    - each step's scalar logs (loss, metrics) are averaged across workers with ``axis=0``
      ("Invalid reduction dimension 0 for input with 0 dimensions"): averaged with
      ``axis=None``, which is what a scalar needs.
    """
    from keras.src.backend.tensorflow import trainer as tf_trainer

    def symbolic_build(iterator=None, data_batch=None):
        with strategy.scope():
            model._symbolic_build(data_batch=element_spec)

    model._maybe_symbolic_build = symbolic_build
    if getattr(tf_trainer.reduce_per_replica, "_dualml_multi_worker", False):
        return
    original = tf_trainer.reduce_per_replica

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and tf_trainer._collective_all_reduce_multi_worker(strategy):
            from keras.src import tree

            return tree.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
        return original(values, strategy, reduction)

    reduce_per_replica._dualml_multi_worker = True
    tf_trainer.reduce_per_replica = reduce_per_replica

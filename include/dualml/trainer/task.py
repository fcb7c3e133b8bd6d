"""Trainer entrypoint: data -> model -> train (+ optional fine-tune) -> evaluate -> export.

Writes into ``model_dir`` (AIP_MODEL_DIR on Vertex; any local or gs:// dir elsewhere):

- ``saved_model.pb`` + ``variables/``: the serving SavedModel (see export.py)
- ``model.keras``: the Keras model, for TFLite conversion and re-evaluation
- ``labels.txt``: class names, line number = class index
- ``metrics.json``: test-split metrics, ``history.json``: per-epoch curves
- ``split.json``: the exact train/val/test assignment, ``training_config.json``: arguments, strategy, timings
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time

from dualml import dataset, storage
from dualml.trainer.config import TrainConfig, parse_args

log = logging.getLogger("dualml.trainer")


def load_or_make_split(cfg: TrainConfig) -> dataset.SplitManifest:
    if cfg.split_uri:
        return dataset.SplitManifest.from_json(storage.read_text(cfg.split_uri))
    files, report = dataset.validate(dataset.list_image_folder(cfg.data_uri))
    for w in report.warnings:
        log.warning(w)
    return dataset.stratified_split(
        files, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=cfg.seed, data_root=cfg.data_uri
    )


def _is_tfrecord(cfg: TrainConfig) -> bool:
    if cfg.data_format != "auto":
        return cfg.data_format == "tfrecord"
    if cfg.split_uri or not cfg.data_uri:
        return False
    return any(f.endswith((".tfrecord", ".tfrec")) for f in storage.list_files(cfg.data_uri))


class _SyncDir:
    """Keras callback factory: mirror a local folder to a remote one after each epoch."""

    @staticmethod
    def make(local: str, remote: str | None):
        import keras

        class SyncDir(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                if remote and os.path.isdir(local):
                    storage.upload_dir(local, remote)

        return SyncDir()


def _callbacks(cfg: TrainConfig, work: str, phase: str, chief: bool = True):
    """Early stopping, resumable epochs, TensorBoard; the chief alone mirrors checkpoints and logs
    to the job's folders (every worker of a multi-worker job holds the same weights)."""
    import keras

    ckpt_local = os.path.join(work, "checkpoints", phase)
    tb_local = os.path.join(work, "tensorboard")
    cbs = [
        keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=cfg.early_stopping_patience, restore_best_weights=True, verbose=1
        ),
        # Resumes an interrupted phase (e.g. a preempted Spot VM) from its last epoch.
        keras.callbacks.BackupAndRestore(backup_dir=ckpt_local),
        keras.callbacks.TensorBoard(log_dir=tb_local, write_graph=False, profile_batch=0),
    ]
    if cfg.checkpoint_dir and chief:
        cbs.append(_SyncDir.make(ckpt_local, storage.join(cfg.checkpoint_dir, phase)))
    if cfg.tensorboard_dir and chief:
        cbs.append(_SyncDir.make(tb_local, cfg.tensorboard_dir))
    return cbs


def _restore_checkpoints(cfg: TrainConfig, work: str) -> None:
    """Fetch checkpoints a previous attempt of this job left, so BackupAndRestore resumes."""
    if not cfg.checkpoint_dir:
        return
    try:
        if storage.list_files(cfg.checkpoint_dir):
            storage.download_dir(cfg.checkpoint_dir, os.path.join(work, "checkpoints"))
            log.info("restored checkpoints from %s", cfg.checkpoint_dir)
    except storage.StorageError:
        pass  # nothing saved yet: a fresh start


class _Phases:
    """Wall and CPU seconds per phase of the job, written to training_config.json and logged,
    so a slow job shows where its time went (CPU = this process, all threads)."""

    def __init__(self):
        self.t0 = self._last = (time.perf_counter(), time.process_time())
        self.phases: dict[str, dict[str, float]] = {}

    def mark(self, name: str) -> None:
        """Close phase ``name``: the time since the previous mark."""
        now = (time.perf_counter(), time.process_time())
        self.phases[name] = {"wall_s": round(now[0] - self._last[0], 3), "cpu_s": round(now[1] - self._last[1], 3)}
        self._last = now
        log.info("phase %s: %.1f s (cpu %.1f s)", name, self.phases[name]["wall_s"], self.phases[name]["cpu_s"])

    def since_start(self) -> float:
        return time.perf_counter() - self.t0[0]


def _epoch_timer():
    """Keras callback: wall and CPU seconds of each epoch (training steps + validation + the other
    callbacks' epoch-end work when it is last in the list)."""
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.epochs: list[dict[str, float]] = []

        def on_epoch_begin(self, epoch, logs=None):
            self._t = (time.perf_counter(), time.process_time())
            self._v = None

        def on_test_begin(self, logs=None):
            self._v = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            now = (time.perf_counter(), time.process_time())
            self.epochs.append({"wall_s": round(now[0] - self._t[0], 3), "cpu_s": round(now[1] - self._t[1], 3),
                                "validation_wall_s": round(now[0] - (self._v or now[0]), 3)})

    return EpochTimer()


def run(cfg: TrainConfig) -> dict:
    """Train, evaluate and export; the job's scratch folder (~80 MB) is removed however it ends."""
    work = tempfile.mkdtemp(prefix="dualml-train-")
    try:
        return _run(cfg, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(cfg: TrainConfig, work: str) -> dict:
    from dualml.quiet_tf import import_tensorflow

    tf = import_tensorflow()  # before keras, which imports it noisily on a machine without a GPU
    import keras

    from dualml.trainer import data_pipeline as dp
    from dualml.trainer.distribute import (
        allow_keras_fit_multi_worker,
        is_chief,
        make_strategy,
        read_tf_config,
        strategy_kind,
    )
    from dualml.trainer.evaluate import classification_metrics, predict_batches
    from dualml.trainer.export import export_serving_model, inference_fn
    from dualml.trainer.models import build_classifier, compile_classifier, set_backbone_trainable

    phases = _Phases()
    keras.utils.set_random_seed(cfg.seed)
    if cfg.deterministic:
        # Same data + seed -> same model: a re-run ties with its champion instead of drifting.
        tf.config.experimental.enable_op_determinism()
    tf_config = read_tf_config()
    kind = strategy_kind(tf_config, len(tf.config.list_physical_devices("GPU")))
    strategy = make_strategy(kind)
    chief = is_chief(tf_config)
    replicas = strategy.num_replicas_in_sync
    log.info("strategy=%s replicas=%d chief=%s", kind, replicas, chief)
    global_batch = cfg.batch_size * replicas

    # ---- data
    manifest = None
    steps = None  # None: one pass of a finite dataset per epoch
    common = dict(image_size=cfg.image_size, batch_size=global_batch, seed=cfg.seed, cache_dir=cfg.cache_dir)
    if _is_tfrecord(cfg):
        shards = dp.tfrecord_shards(cfg.data_uri)
        labels = dataset.parse_labels(storage.read_text(storage.join(cfg.data_uri, "labels.txt")))
        train_ds = dp.tfrecord_dataset(shards["train"], training=True, augment=cfg.augment, **common)
        val_ds = dp.tfrecord_dataset(shards["val"], training=False, **common)
        test_ds = dp.tfrecord_dataset(shards["test"], training=False, **common)
        counts = {s: None for s in shards}
    else:
        manifest = load_or_make_split(cfg)
        labels = manifest.labels
        # Endless training dataset + steps_per_epoch: one iterator for the whole fit.
        train_ds = dp.image_dataset(manifest.files["train"], training=True, augment=cfg.augment, repeat=True, **common)
        steps = dp.steps_per_epoch(len(manifest.files["train"]), global_batch)
        val_ds = dp.image_dataset(manifest.files["val"], training=False, **common)
        test_ds = dp.image_dataset(manifest.files["test"], training=False, **common)
        counts = manifest.counts()
    log.info("classes=%s split=%s", labels, counts)
    phases.mark("data")

    # ---- model
    bn_momentum = cfg.bn_momentum if cfg.bn_momentum is not None else (None if cfg.pretrained else 0.9)
    with strategy.scope():
        model, backbone = build_classifier(
            cfg.architecture, len(labels), cfg.image_size, cfg.weights, cfg.dropout, bn_momentum
        )
        # Pretrained: train the head on a frozen backbone first. Random init: everything trains.
        set_backbone_trainable(backbone, trainable=not cfg.pretrained, freeze_batchnorm=False)
        compile_classifier(model, cfg.learning_rate)
    if kind == "multi_worker_mirrored":
        allow_keras_fit_multi_worker(model, strategy, train_ds.element_spec)
    _restore_checkpoints(cfg, work)
    phases.mark("build")

    # ---- train (the first epoch includes tracing the train and validation steps)
    timer = _epoch_timer()
    hist = model.fit(train_ds, validation_data=val_ds, epochs=cfg.epochs, steps_per_epoch=steps, shuffle=False,
                     callbacks=[*_callbacks(cfg, work, "train", chief), timer], verbose=2)
    history = {k: [float(v) for v in vals] for k, vals in hist.history.items()}
    history["phase"] = ["train"] * len(history.get("loss", []))
    phases.mark("train")
    if cfg.fine_tune_epochs and cfg.pretrained:
        with strategy.scope():
            set_backbone_trainable(backbone, trainable=True, fine_tune_at=cfg.fine_tune_at)
            compile_classifier(model, cfg.fine_tune_learning_rate)
        ft = model.fit(
            train_ds, validation_data=val_ds, epochs=cfg.fine_tune_epochs, steps_per_epoch=steps, shuffle=False,
            callbacks=[*_callbacks(cfg, work, "fine_tune", chief), timer], verbose=2,
        )
        for k, vals in ft.history.items():
            history.setdefault(k, []).extend(float(v) for v in vals)
        history["phase"] += ["fine_tune"] * len(ft.history.get("loss", []))
        phases.mark("fine_tune")
    elif cfg.fine_tune_epochs:
        log.info("skipping fine-tune phase: weights=None already trains the whole backbone")

    # ---- evaluate on the held-out test split (one trace, shared with the serving export)
    infer = inference_fn(model, cfg.image_size)
    y_true, probs = predict_batches(infer, test_ds)
    metrics = classification_metrics(y_true, probs.argmax(axis=-1), labels)
    metrics.update(architecture=cfg.architecture, image_size=cfg.image_size, split_counts=counts)
    if manifest is not None:
        metrics["split_fingerprint"] = manifest.fingerprint()
    log.info("test accuracy=%.4f macro_f1=%.4f on %d examples", metrics["accuracy"], metrics["macro_f1"], len(y_true))
    phases.mark("evaluate")

    # ---- export (only the chief's copy is published; other workers write to scratch)
    out = os.path.join(work, "export")
    export_serving_model(model, labels, cfg.image_size, out, infer=infer)
    phases.mark("export_savedmodel")
    keras.saving.save_model(model, os.path.join(out, "model.keras"))
    phases.mark("export_keras")
    metrics["export_check"] = _check_export(out, manifest, probs, cfg.cache_dir) if manifest else None
    phases.mark("export_check")
    timings = {
        "phases": phases.phases,
        "epochs": timer.epochs,
        # Totals kept from earlier versions of this file.
        "data_seconds": phases.phases["data"]["wall_s"],
        "train_seconds": sum(p["wall_s"] for k, p in phases.phases.items() if k in ("train", "fine_tune")),
        "evaluate_seconds": phases.phases["evaluate"]["wall_s"],
        "export_seconds": sum(p["wall_s"] for k, p in phases.phases.items() if k.startswith("export")),
        "total_seconds": round(phases.since_start(), 3),
    }
    _write_json(out, "metrics.json", metrics)
    _write_json(out, "history.json", history)
    _write_json(out, "training_config.json", {
        "config": json.loads(cfg.to_json()), "strategy": kind, "replicas": replicas,
        "timings": timings, "tensorflow": tf.__version__, "keras": keras.__version__,
    })
    if manifest is not None:
        with open(os.path.join(out, "split.json"), "w") as f:
            f.write(manifest.to_json())
    if chief:
        storage.upload_dir(out, cfg.model_dir)
        log.info("exported to %s", cfg.model_dir)
    phases.mark("write")

    return {"metrics": metrics, "timings": timings, "model_dir": cfg.model_dir, "labels": labels}


def _check_export(export_dir: str, manifest, expected_probs, cache_dir: str | None = None, n: int = 16) -> dict:
    """The served SavedModel must give the Keras model's answers, or nothing is published.

    The SavedModel is loaded back from disk and fed the first ``n`` test images' encoded bytes
    (decoding inside its signature); the Keras model's answers for the same images are the
    evaluation's (``expected_probs``, the test split in manifest order through the training
    input pipeline), so the check needs no other inference run.
    """
    import numpy as np
    import tensorflow as tf

    from dualml.trainer import data_pipeline as dp
    from dualml.trainer.export import load_serving_fn

    files = dp.localize([u for u, _ in manifest.files["test"][:n]], cache_dir)  # cached by the pipeline
    raw = [storage.read_bytes(u) for u in files]
    served = load_serving_fn(export_dir)(image_bytes=tf.constant(raw))
    diff = float(np.max(np.abs(served["probabilities"].numpy() - expected_probs[: len(raw)])))
    if diff > 1e-4:
        raise RuntimeError(f"exported SavedModel disagrees with the Keras model (max |diff| {diff:.2e}); not exporting")
    return {"examples": len(files), "max_abs_diff": diff}


def _write_json(folder: str, name: str, obj) -> None:
    with open(os.path.join(folder, name), "w") as f:
        json.dump(obj, f, indent=1)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    from dualml.trainer.config import ConfigError

    try:
        cfg = parse_args(argv)
    except ConfigError as e:
        log.error("%s", e)
        return 2
    try:
        result = run(cfg)
    except (dataset.DatasetError, storage.StorageError) as e:
        log.error("data problem: %s", e)
        return 3
    print(json.dumps({"model_dir": result["model_dir"], "accuracy": result["metrics"]["accuracy"]}), flush=True)
    return 0


def exit_process(rc: int) -> None:
    """End the trainer process now, once its output is flushed.

    Everything the job produces is written and uploaded before ``main`` returns; what remains is
    the interpreter tearing down TensorFlow's graphs and thread pools, which took 5-15 s on 2 busy
    cores. ``python -m dualml.trainer`` skips it; library callers of ``run``/``main`` are unaffected.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)

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


def _callbacks(cfg: TrainConfig, work: str, phase: str):
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
    if cfg.checkpoint_dir:
        cbs.append(_SyncDir.make(ckpt_local, storage.join(cfg.checkpoint_dir, phase)))
    if cfg.tensorboard_dir:
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


def run(cfg: TrainConfig) -> dict:
    """Train, evaluate and export; the job's scratch folder (~80 MB) is removed however it ends."""
    work = tempfile.mkdtemp(prefix="dualml-train-")
    try:
        return _run(cfg, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(cfg: TrainConfig, work: str) -> dict:
    import keras
    import numpy as np
    import tensorflow as tf

    from dualml.trainer import data_pipeline as dp
    from dualml.trainer.distribute import is_chief, make_strategy, read_tf_config, strategy_kind
    from dualml.trainer.evaluate import classification_metrics
    from dualml.trainer.export import export_serving_model
    from dualml.trainer.models import build_classifier, set_backbone_trainable

    t0 = time.time()
    timings: dict[str, float] = {}
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
        train_ds = dp.image_dataset(manifest.files["train"], training=True, augment=cfg.augment, **common)
        val_ds = dp.image_dataset(manifest.files["val"], training=False, **common)
        test_ds = dp.image_dataset(manifest.files["test"], training=False, **common)
        counts = manifest.counts()
    log.info("classes=%s split=%s", labels, counts)
    timings["data_seconds"] = time.time() - t0

    # ---- model
    bn_momentum = cfg.bn_momentum if cfg.bn_momentum is not None else (None if cfg.pretrained else 0.9)
    with strategy.scope():
        model, backbone = build_classifier(
            cfg.architecture, len(labels), cfg.image_size, cfg.weights, cfg.dropout, bn_momentum
        )
        # Pretrained: train the head on a frozen backbone first. Random init: everything trains.
        set_backbone_trainable(backbone, trainable=not cfg.pretrained, freeze_batchnorm=False)
        model.compile(
            optimizer=keras.optimizers.Adam(cfg.learning_rate),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )

    _restore_checkpoints(cfg, work)
    t1 = time.time()
    hist = model.fit(train_ds, validation_data=val_ds, epochs=cfg.epochs, callbacks=_callbacks(cfg, work, "train"), verbose=2)
    history = {k: [float(v) for v in vals] for k, vals in hist.history.items()}
    history["phase"] = ["train"] * len(history.get("loss", []))
    if cfg.fine_tune_epochs and cfg.pretrained:
        with strategy.scope():
            set_backbone_trainable(backbone, trainable=True, fine_tune_at=cfg.fine_tune_at)
            model.compile(
                optimizer=keras.optimizers.Adam(cfg.fine_tune_learning_rate),
                loss="sparse_categorical_crossentropy",
                metrics=["accuracy"],
            )
        ft = model.fit(
            train_ds, validation_data=val_ds, epochs=cfg.fine_tune_epochs,
            callbacks=_callbacks(cfg, work, "fine_tune"), verbose=2,
        )
        for k, vals in ft.history.items():
            history.setdefault(k, []).extend(float(v) for v in vals)
        history["phase"] += ["fine_tune"] * len(ft.history.get("loss", []))
    elif cfg.fine_tune_epochs:
        log.info("skipping fine-tune phase: weights=None already trains the whole backbone")
    timings["train_seconds"] = time.time() - t1

    # ---- evaluate on the held-out test split
    t2 = time.time()
    y_true = np.concatenate([y.numpy() for _, y in test_ds])
    probs = model.predict(test_ds, verbose=0)
    metrics = classification_metrics(y_true, probs.argmax(axis=-1), labels)
    metrics.update(architecture=cfg.architecture, image_size=cfg.image_size, split_counts=counts)
    if manifest is not None:
        metrics["split_fingerprint"] = manifest.fingerprint()
    timings["evaluate_seconds"] = time.time() - t2
    log.info("test accuracy=%.4f macro_f1=%.4f on %d examples", metrics["accuracy"], metrics["macro_f1"], len(y_true))

    # ---- export (only the chief's copy is published; other workers write to scratch)
    t3 = time.time()
    out = os.path.join(work, "export")
    export_serving_model(model, labels, cfg.image_size, out)
    keras.saving.save_model(model, os.path.join(out, "model.keras"))
    export_check = _check_export(out, model, manifest, cfg.image_size) if manifest else None
    metrics["export_check"] = export_check
    timings["export_seconds"] = time.time() - t3
    timings["total_seconds"] = time.time() - t0
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

    return {"metrics": metrics, "timings": timings, "model_dir": cfg.model_dir, "labels": labels}


def _check_export(export_dir: str, model, manifest, image_size: int, n: int = 8) -> dict:
    """The served SavedModel must give the Keras model's answers, or nothing is published."""
    import numpy as np
    import tensorflow as tf

    from dualml.preprocess import load_image
    from dualml.trainer.export import load_serving_fn

    files = [u for u, _ in manifest.files["test"][:n]]
    raw = [storage.read_bytes(u) for u in files]
    served = load_serving_fn(export_dir)(image_bytes=tf.constant(raw))
    expected = model.predict(np.stack([load_image(b, image_size) for b in raw]), verbose=0)
    diff = float(np.max(np.abs(served["probabilities"].numpy() - expected)))
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

"""Training throughput through the real input pipeline vs the same model's train steps on an
in-memory tensor.

For MobileNetV3Small and DenseNet121 at the local platform's image sizes (weights=None, batch 16,
compiled as the trainer compiles them): ``model.fit`` over ``dualml.trainer.data_pipeline.image_dataset``
(the training split of the generated sample data: read, decode, resize, cache, shuffle, augment,
batch, prefetch) vs ``model.fit`` of the same model on one in-memory batch of the same shape
repeated (``tf.data.Dataset.from_tensors(...).repeat()``: no decode, no augmentation).

Warm-up excluded: one in-memory epoch (traces the train step), then the pipeline's first epoch
(decodes and fills the cache; reported separately as ``pipeline_first_epoch_s``), then ``rounds``
of (pipeline epochs, in-memory epochs) side by side, each lasting about 6 s (several epochs of
one ``fit`` call; 3 s with ``--quick``). Images/s is an epoch's images over its mean
duration (epoch begin to end: iterator creation and every batch fetch included); medians are
reported, with the ratio pipeline / in-memory.

``python bench/training_throughput.py [--data DIR] [--rounds N] [--quick] [--out FILE]``
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import benchlib

BATCH = 16
ARCHITECTURES = ("mobilenet_v3_small", "densenet121")


def _epoch_timer():
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.durations: list[float] = []
            self.steps = 0

        def on_epoch_begin(self, epoch, logs=None):
            self._t0 = time.perf_counter()
            self.steps = 0

        def on_train_batch_end(self, batch, logs=None):
            self.steps += 1

        def on_epoch_end(self, epoch, logs=None):
            self.durations.append(time.perf_counter() - self._t0)

    return EpochTimer()


def bench_model(architecture: str, image_size: int, train_files, num_classes: int, *, rounds: int,
                batch_size: int = BATCH, min_measure_s: float = 6.0) -> dict:
    import keras
    import tensorflow as tf

    from dualml.trainer import data_pipeline as dp
    from dualml.trainer.models import build_classifier, set_backbone_trainable

    keras.utils.set_random_seed(0)
    t_build = time.perf_counter()
    # As the trainer builds a weights=None model: BN momentum 0.9, whole backbone trainable.
    model, backbone = build_classifier(architecture, num_classes, image_size, None, 0.2, 0.9)
    set_backbone_trainable(backbone, trainable=True, freeze_batchnorm=False)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    build_s = time.perf_counter() - t_build

    n = len(train_files)
    pipeline = dp.image_dataset(train_files, image_size, batch_size, training=True, augment=True, seed=42)
    x = tf.random.uniform((batch_size, image_size, image_size, 3), 0.0, 255.0, seed=1)
    y = tf.random.uniform((batch_size,), 0, num_classes, dtype=tf.int32, seed=2)
    in_memory = tf.data.Dataset.from_tensors((x, y)).repeat()
    mem_steps = math.ceil(n / batch_size)
    mem_images = mem_steps * batch_size

    def epoch(ds, steps=None, epochs=1) -> tuple[float, int]:
        """Seconds per epoch (mean over ``epochs`` epochs of one fit call) and steps per epoch."""
        timer = _epoch_timer()
        model.fit(ds, epochs=epochs, steps_per_epoch=steps, callbacks=[timer], verbose=0)
        return statistics.fmean(timer.durations), timer.steps

    t_warm = time.perf_counter()
    epoch(in_memory, mem_steps)  # traces the train step
    warmup_s = time.perf_counter() - t_warm
    first_s, _ = epoch(pipeline)  # decode + cache fill (+ a retrace for the last, partial batch)
    # Each measurement spans several epochs so that it lasts about min_measure_s (a 210-image
    # epoch of a small model is ~1 s: too short to time on a shared machine).
    probe, _ = epoch(pipeline)
    epochs_per_round = max(1, math.ceil(min_measure_s / max(probe, 1e-3)))
    pipe_s, mem_s, pipe_steps = [], [], 0
    for r in range(rounds):
        d, pipe_steps = epoch(pipeline, epochs=epochs_per_round)
        pipe_s.append(d)
        d, _ = epoch(in_memory, mem_steps, epochs=epochs_per_round)
        mem_s.append(d)
        benchlib.log(f"training_throughput: {architecture} round {r + 1}/{rounds}: "
                     f"pipeline {n / pipe_s[-1]:.1f} img/s, in-memory {mem_images / mem_s[-1]:.1f} img/s")
    pipe_rates = [n / d for d in pipe_s]
    mem_rates = [mem_images / d for d in mem_s]
    pipe_med, mem_med = statistics.median(pipe_rates), statistics.median(mem_rates)
    return {
        "architecture": architecture,
        "image_size": image_size,
        "batch_size": batch_size,
        "weights": None,
        "params": int(model.count_params()),
        "train_images_per_epoch": n,
        "pipeline_steps_per_epoch": pipe_steps,
        "in_memory_images_per_epoch": mem_images,
        "rounds": rounds,
        "epochs_per_round": epochs_per_round,
        "build_s": build_s,
        "warmup_s": warmup_s,
        "pipeline_first_epoch_s": first_s,
        "pipeline_first_epoch_img_s": n / first_s,
        "pipeline_epoch_s": pipe_s,
        "in_memory_epoch_s": mem_s,
        "pipeline_img_s": pipe_med,
        "in_memory_img_s": mem_med,
        "pipeline_steps_s": pipe_steps / statistics.median(pipe_s),
        "in_memory_steps_s": mem_steps / statistics.median(mem_s),
        "ratio_pipeline_vs_in_memory": benchlib.ratio(pipe_med, mem_med),
        "ratio_per_round": [p / m for p, m in zip(pipe_rates, mem_rates, strict=True)],
    }


def run(data_dir: str | None = None, rounds: int = 3, architectures=ARCHITECTURES, min_measure_s: float = 6.0) -> dict:
    benchlib.setup_paths()
    import tensorflow as tf

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        data_dir = benchlib.ensure_sample_data(data_dir or Path(tmp) / "flowers")
        manifest = benchlib.local_split(data_dir)
        sizes = benchlib.local_image_sizes()
        models = []
        for arch in architectures:
            benchlib.log(f"training_throughput: {arch} at {sizes.get(arch, 96)} px")
            models.append(bench_model(arch, sizes.get(arch, 96), manifest.files["train"], len(manifest.labels),
                                      rounds=rounds, min_measure_s=min_measure_s))
    return {
        "method": "model.fit epochs, median of rounds, pipeline and in-memory alternated; warm-up excluded",
        "data": "dualml.sample_data (5 classes, 60 per class, 128 px JPEG), local split train",
        "tf_intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "models": models,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="image folder (default: generate the sample data in a temp dir)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="2 rounds")
    p.add_argument("--out")
    a = p.parse_args(argv)
    res = run(a.data, rounds=2 if a.quick else a.rounds, min_measure_s=3.0 if a.quick else 6.0)
    benchlib.emit(res, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Training throughput through the trainer's input pipeline vs the same model's train steps on
in-memory tensors.

For MobileNetV3Small and DenseNet121 at the local platform's image sizes (weights=None, batch 16,
compiled as the trainer compiles them), ``model.fit`` epochs over:

- ``pipeline``: ``dualml.trainer.data_pipeline.image_dataset`` exactly as the trainer uses it (the
  training split of the generated sample data: read, decode, resize, cache, shuffle, batch, augment
  the batch, prefetch; endless, ``steps_per_epoch`` = one pass);
- ``no augmentation``: the same without augmentation (so augmentation is measured separately);
- ``in-memory``: the same number of batches of the same shapes (full batches and the last, partial
  one) from tensors already in memory (``tf.data.Dataset.from_tensors``): no decode, no augmentation.

Warm-up excluded: one in-memory epoch (traces the train step), then one epoch of each pipeline
(decodes and fills its cache; the first is reported as ``pipeline_first_epoch_s``), then ``rounds``
of the three side by side (order rotated each round), each lasting about 6 s (several epochs of one
``fit`` call; 3 s with ``--quick``). Images/s is an epoch's images over its mean duration; medians
are reported with the ratio pipeline / in-memory (same batches, so it is also the step-rate ratio).
The pipeline alone (batches pulled without training) gives its own rate and CPU seconds per epoch,
the CPU the input side competes for with training on a machine of ``nproc`` cores; the 1-minute load
average is recorded before and after each model.

``python bench/training_throughput.py [--data DIR] [--rounds N] [--quick] [--out FILE]``
"""

from __future__ import annotations

import argparse
import math
import os
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
    from dualml.trainer.models import build_classifier, compile_classifier, set_backbone_trainable

    load_before = os.getloadavg()[0]
    keras.utils.set_random_seed(0)
    t_build = time.perf_counter()
    # As the trainer builds a weights=None model: BN momentum 0.9, whole backbone trainable.
    model, backbone = build_classifier(architecture, num_classes, image_size, None, 0.2, 0.9)
    set_backbone_trainable(backbone, trainable=True, freeze_batchnorm=False)
    compile_classifier(model, 1e-3)
    build_s = time.perf_counter() - t_build

    n = len(train_files)
    steps = dp.steps_per_epoch(n, batch_size)
    datasets = {
        "pipeline": dp.image_dataset(train_files, image_size, batch_size, training=True, augment=True, seed=42,
                                     repeat=True),
        "no_augmentation": dp.image_dataset(train_files, image_size, batch_size, training=True, augment=False,
                                            seed=42, repeat=True),
    }
    x = tf.random.uniform((batch_size, image_size, image_size, 3), 0.0, 255.0, seed=1)
    y = tf.random.uniform((batch_size,), 0, num_classes, dtype=tf.int32, seed=2)
    last = n - (steps - 1) * batch_size  # the partial last batch of a pass, as the pipeline has
    one_pass = tf.data.Dataset.from_tensors((x, y)).repeat(steps - 1).concatenate(
        tf.data.Dataset.from_tensors((x[:last], y[:last])))
    datasets["in_memory"] = one_pass.repeat()

    def epochs(name: str, count: int = 1) -> tuple[float, float]:
        """Mean wall and CPU seconds per epoch over ``count`` epochs of one fit call."""
        timer = _epoch_timer()
        cpu = time.process_time()
        model.fit(datasets[name], epochs=count, steps_per_epoch=steps, callbacks=[timer], verbose=0, shuffle=False)
        return statistics.fmean(timer.durations), (time.process_time() - cpu) / count

    t_warm = time.perf_counter()
    epochs("in_memory")  # traces the train step
    warmup_s = time.perf_counter() - t_warm
    first_s, _ = epochs("pipeline")  # decode + cache fill
    epochs("no_augmentation")
    # Each measurement spans several epochs so that it lasts about min_measure_s (a 210-image
    # epoch of a small model is ~1 s: too short to time on a shared machine).
    probe, _ = epochs("pipeline")
    per_round = max(1, math.ceil(min_measure_s / max(probe, 1e-3)))
    wall: dict[str, list[float]] = {k: [] for k in datasets}
    cpu: dict[str, list[float]] = {k: [] for k in datasets}
    names = list(datasets)
    for r in range(rounds):
        for name in names[r % 3:] + names[: r % 3]:
            w, c = epochs(name, per_round)
            wall[name].append(w)
            cpu[name].append(c)
        benchlib.log(f"training_throughput: {architecture} round {r + 1}/{rounds}: "
                     + ", ".join(f"{k} {n / wall[k][-1]:.1f} img/s" for k in names))

    # The input side alone: batches pulled as fast as the pipeline makes them, no training.
    alone = {}
    for name in ("pipeline", "no_augmentation"):
        it = iter(datasets[name])
        next(it)
        t, c = time.perf_counter(), time.process_time()
        for _ in range(steps * per_round):
            next(it)
        alone[name] = {"epoch_s": (time.perf_counter() - t) / per_round, "cpu_s": (time.process_time() - c) / per_round}

    rate = {k: n / statistics.median(v) for k, v in wall.items()}
    mem_epoch = statistics.median(wall["in_memory"])
    return {
        "architecture": architecture,
        "image_size": image_size,
        "batch_size": batch_size,
        "weights": None,
        "params": int(model.count_params()),
        "train_images_per_epoch": n,
        "steps_per_epoch": steps,
        "rounds": rounds,
        "epochs_per_round": per_round,
        "build_s": build_s,
        "warmup_s": warmup_s,
        "pipeline_first_epoch_s": first_s,
        "pipeline_first_epoch_img_s": n / first_s,
        "epoch_s": wall,
        "epoch_cpu_s": cpu,
        "pipeline_img_s": rate["pipeline"],
        "no_augmentation_img_s": rate["no_augmentation"],
        "in_memory_img_s": rate["in_memory"],
        "pipeline_steps_s": steps / statistics.median(wall["pipeline"]),
        "in_memory_steps_s": steps / mem_epoch,
        "ratio_pipeline_vs_in_memory": benchlib.ratio(rate["pipeline"], rate["in_memory"]),
        "ratio_no_augmentation_vs_in_memory": benchlib.ratio(rate["no_augmentation"], rate["in_memory"]),
        "ratio_per_round": [p / m for p, m in zip(wall["in_memory"], wall["pipeline"], strict=True)],
        # CPU the input side needs per epoch, alone, next to what a training epoch takes.
        "input_alone": {k: {"img_s": n / v["epoch_s"], "cpu_s_per_epoch": v["cpu_s"]} for k, v in alone.items()},
        "augmentation_cpu_s_per_epoch": alone["pipeline"]["cpu_s"] - alone["no_augmentation"]["cpu_s"],
        "in_memory_cpu_s_per_epoch": statistics.median(cpu["in_memory"]),
        "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
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
        "method": "model.fit epochs (steps_per_epoch = one pass), median of rounds, pipeline / no augmentation / "
                  "in-memory rotated; warm-up excluded",
        "data": "dualml.sample_data (5 classes, 60 per class, 128 px JPEG), local split train",
        "tf_intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "nproc": os.cpu_count(),
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

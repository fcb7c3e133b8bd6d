"""Each TFLite mode's size, latency and accuracy vs the Keras model it was converted from.

A MobileNetV3Small at the local mobile image size (96 px, weights=None) is trained briefly on the
sample data's training split (or ``--model model.keras`` is reused), converted with every mode in
``dualml.tflite.MODES`` (int8 calibrated on training images) and validated with
``dualml.tflite.validate`` on the test split: size, mean/p95 batch-1 latency (LiteRT interpreter,
1 thread, as the DAG validates), accuracy and top-1 agreement with the Keras model. The Keras
reference is measured in the same run: accuracy on the same images, size of ``model.keras`` and
batch-1 latency of the model called through ``tf.function`` (TensorFlow's own thread pool); its
size is its float32 weights (parameters x 4 bytes; ``model.keras`` also holds the optimizer state).

``python bench/tflite_modes.py [--data DIR] [--model model.keras] [--epochs N] [--quick] [--out FILE]``
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import benchlib

ARCHITECTURE = "mobilenet_v3_small"
MB = 1_000_000


def train_small(manifest, image_size: int, epochs: int):
    import keras

    from dualml.trainer import data_pipeline as dp
    from dualml.trainer.models import build_classifier, set_backbone_trainable

    keras.utils.set_random_seed(42)
    model, backbone = build_classifier(ARCHITECTURE, len(manifest.labels), image_size, None, 0.2, 0.9)
    set_backbone_trainable(backbone, trainable=True, freeze_batchnorm=False)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    train = dp.image_dataset(manifest.files["train"], image_size, 16, training=True, seed=42)
    val = dp.image_dataset(manifest.files["val"], image_size, 16, training=False)
    # As the trainer: early stopping on val_loss, best weights restored.
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=3, restore_best_weights=True)
    model.fit(train, validation_data=val, epochs=epochs, callbacks=[stop], verbose=0)
    return model


def keras_latency(model, image, runs: int, warmup: int = 5) -> dict:
    import tensorflow as tf

    fn = tf.function(lambda x: model(x, training=False))
    x = tf.constant(image[None])
    for _ in range(warmup):
        fn(x).numpy()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn(x).numpy()
        times.append(time.perf_counter() - t0)
    s = benchlib.summarize_ms(times)
    return {"latency_ms_mean": s["mean_ms"], "latency_ms_p95": s["p95_ms"], "latency_runs": runs}


def run(data_dir: str | None = None, model_path: str | None = None, epochs: int = 6,
        latency_runs: int = 200, modes=None) -> dict:
    benchlib.setup_paths()
    import keras
    import numpy as np

    from dualml import tflite
    from dualml.preprocess import load_image

    modes = tuple(modes or tflite.MODES)
    with tempfile.TemporaryDirectory(prefix="bench-tflite-") as tmp:
        data_dir = benchlib.ensure_sample_data(data_dir or Path(tmp) / "flowers")
        manifest = benchlib.local_split(data_dir)
        if model_path:
            model = tflite.load_keras_model(model_path)
            image_size = int(model.inputs[0].shape[1])
            trained = f"reused {model_path}"
            train_s = 0.0
        else:
            image_size = benchlib.local_image_sizes().get(ARCHITECTURE, 96)
            benchlib.log(f"tflite_modes: training {ARCHITECTURE} {image_size} px for {epochs} epochs")
            t0 = time.perf_counter()
            model = train_small(manifest, image_size, epochs)
            train_s = time.perf_counter() - t0
            trained = f"trained {epochs} epochs on the sample data (weights=None), {train_s:.0f} s"
        keras_file = os.path.join(tmp, "model.keras")
        keras.saving.save_model(model, keras_file)
        test = manifest.files["test"]
        images = np.stack([load_image(u, image_size) for u, _ in test]).astype(np.float32)
        labels = np.array([i for _, i in test])
        keras_probs = model.predict(images, batch_size=32, verbose=0)
        params = int(model.count_params())
        keras_ref = {
            # float32 weights; model.keras also holds the optimizer state.
            "size_bytes": params * 4,
            "size_mb": params * 4 / MB,
            "params": params,
            "keras_file_bytes": os.path.getsize(keras_file),
            "accuracy": float((keras_probs.argmax(1) == labels).mean()),
            **keras_latency(model, images[0], latency_runs),
        }
        reps = tflite.representative_images_from_manifest(manifest, image_size, num=100)
        results = []
        for mode in modes:
            benchlib.log(f"tflite_modes: converting and validating {mode}")
            try:
                t0 = time.perf_counter()
                data = tflite.convert(model, mode, reps if mode == "int8" else None)
                convert_s = time.perf_counter() - t0
                rep = tflite.validate(data, model, images, labels, mode=mode, latency_runs=latency_runs,
                                      class_names=manifest.labels, raise_on_failure=False)
            except Exception as e:  # one mode failing must not hide the others
                results.append({"mode": mode, "error": f"{type(e).__name__}: {e}"[:500]})
                continue
            results.append({
                "mode": mode,
                "size_bytes": rep["size_bytes"],
                "size_mb": rep["size_bytes"] / MB,
                "convert_s": convert_s,
                "latency_ms_mean": rep["latency_ms_mean"],
                "latency_ms_p95": rep["latency_ms_p95"],
                "accuracy": rep["tflite_accuracy"],
                "keras_accuracy": rep["keras_accuracy"],
                "accuracy_delta": rep["accuracy_delta"],
                "agreement": rep["top1_agreement"],
                "max_abs_probability_diff": rep["max_abs_probability_diff"],
                "input_dtype": rep["input_dtype"],
                "num_threads": rep["num_threads"],
                "passed_default_thresholds": rep["passed"],
                "failures": rep["failures"],
            })
    f32 = next((r for r in results if r["mode"] == "float32" and "size_bytes" in r), None)
    for r in results:
        if "size_bytes" not in r:
            continue
        r["size_ratio_vs_float32"] = benchlib.ratio(r["size_bytes"], f32 and f32["size_bytes"])
        r["size_ratio_vs_keras_weights"] = benchlib.ratio(r["size_bytes"], keras_ref["size_bytes"])
        r["latency_ratio_vs_keras"] = benchlib.ratio(r["latency_ms_mean"], keras_ref["latency_ms_mean"])
        r["latency_ratio_vs_float32"] = benchlib.ratio(r["latency_ms_mean"], f32 and f32["latency_ms_mean"])
    return {
        "architecture": ARCHITECTURE,
        "image_size": image_size,
        "model": trained,
        "train_s": train_s,
        "num_examples": len(labels),
        "latency_runs": latency_runs,
        "keras": keras_ref,
        "modes": results,
        "note": "TFLite latency: LiteRT interpreter, 1 thread, batch 1 (as the DAG validates); Keras: "
                "tf.function batch 1 on TensorFlow's default thread pool (all cores).",
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="image folder (default: generate the sample data in a temp dir)")
    p.add_argument("--model", help="reuse this model.keras (or its directory) instead of training")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--latency-runs", type=int, default=200)
    p.add_argument("--quick", action="store_true", help="50 latency runs")
    p.add_argument("--out")
    a = p.parse_args(argv)
    res = run(a.data, a.model, epochs=a.epochs, latency_runs=50 if a.quick else a.latency_runs)
    benchlib.emit(res, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

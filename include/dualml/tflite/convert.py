"""Keras classifier -> TFLite flatbuffer.

Modes (what ships to phones is a trade of size against fidelity, so it is a parameter):

- ``float32``: no optimisation; the numerical reference for the other modes.
- ``dynamic``: dynamic-range quantisation (int8 weights, float activations); ~4x smaller
  weights, no calibration data needed.
- ``float16``: float16 weights; ~2x smaller, near-lossless, fast on mobile GPUs.
- ``int8``: full integer (weights and activations) calibrated on training images, with
  uint8 input/output so the app feeds raw 0..255 pixels (MobileNetV3 rescales inside the
  model). Needed for integer-only accelerators (Edge TPU, many NPUs/DSPs).

Models take float32 RGB in [0, 255] (see ``dualml.preprocess``); calibration images must
come through the same preprocessing, which is why the manifest helper uses
``preprocess.load_image``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import logging
import os
import random
import tempfile
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from dualml import storage
from dualml.dataset import SplitManifest

log = logging.getLogger(__name__)

MODES = ("float32", "dynamic", "float16", "int8")
MODEL_FILENAME = "model.keras"
# Bytes 4..8 of every TFLite flatbuffer (the FlatBuffers file identifier of the schema).
TFLITE_FILE_IDENTIFIER = b"TFL3"


def check_mode(mode: str) -> str:
    """Return ``mode`` if known; otherwise a ValueError listing the modes."""
    if mode not in MODES:
        raise ValueError(f"unknown TFLite mode {mode!r}; choose one of {', '.join(MODES)}")
    return mode


def is_tflite_flatbuffer(data: bytes) -> bool:
    """Cheap sanity check (file identifier) before shipping or loading bytes as a model."""
    return len(data) > 8 and data[4:8] == TFLITE_FILE_IDENTIFIER


def load_keras_model(model: Any):
    """Return a keras.Model from a model, a ``model.keras`` path/URI or the directory holding it.

    gs:// files are downloaded first because Keras cannot open them through the emulator
    (TensorFlow's gs:// filesystem ignores STORAGE_EMULATOR_HOST). Loaded without compiling:
    conversion and validation only run inference.
    """
    if not isinstance(model, str | os.PathLike):
        return model
    import keras

    uri = str(model)
    if not uri.endswith(".keras"):
        uri = storage.join(uri, MODEL_FILENAME)
    if storage.is_gcs(uri):
        with tempfile.TemporaryDirectory() as tmp:
            local = storage.download_file(uri, os.path.join(tmp, os.path.basename(uri)))
            return keras.saving.load_model(local, compile=False)
    if not os.path.isfile(uri):
        raise storage.StorageError(f"Keras model {uri} does not exist")
    return keras.saving.load_model(uri, compile=False)


def _input_image_shape(model) -> tuple | None:
    shape = tuple(model.inputs[0].shape[1:])
    return None if any(d is None for d in shape) else shape


def _calibration_samples(images: Iterable, num: int, image_shape: tuple | None) -> list[np.ndarray]:
    """Materialise up to ``num`` images as [1, s, s, 3] float32 arrays, checking their shape.

    Materialised (not streamed) because the converter may iterate the dataset more than once
    and a generator given by the caller can only be consumed once.
    """
    if num < 1:
        raise ValueError(f"num_calibration must be >= 1, got {num}")
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = images[:num]
    samples = []
    for i, img in enumerate(itertools.islice(images, num)):
        a = np.asarray(img, dtype=np.float32)
        if a.ndim == 4 and a.shape[0] == 1:
            a = a[0]
        if image_shape is not None and a.shape != image_shape:
            raise ValueError(f"representative image {i} has shape {a.shape}; the model takes {image_shape}")
        samples.append(a[np.newaxis])
    if not samples:
        raise ValueError("representative_images is empty; int8 calibration needs training images")
    if max(float(s.max()) for s in samples) <= 1.0:
        # The usual mistake: images scaled to [0, 1]. Calibration would then set activation
        # ranges for inputs 255x too dark and the int8 model would be badly off.
        log.warning("representative images are all within [0, 1]; the model expects pixels in [0, 255]")
    return samples


def convert(
    model,
    mode: str,
    representative_images: Iterable | None = None,
    num_calibration: int = 100,
) -> bytes:
    """Convert a Keras classifier (or a path/URI to ``model.keras``) to TFLite bytes.

    ``representative_images``: float32 [s, s, 3] images in [0, 255] from the *training* split
    (an array [N, s, s, 3] or any iterable); the first ``num_calibration`` are used. Required
    for ``int8``, ignored by the other modes (giving it to ``dynamic`` would silently turn it
    into integer quantisation with float fallback).
    """
    check_mode(mode)
    if mode == "int8" and representative_images is None:
        raise ValueError(
            "mode 'int8' (full integer) needs representative_images: ~100 training images, float32 "
            "[s, s, 3] in [0, 255], e.g. from representative_images_from_manifest(); or choose "
            "'dynamic' or 'float16', which need no calibration data"
        )
    import tensorflow as tf

    model = load_keras_model(model)
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if mode != "float32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "float16":
        converter.target_spec.supported_types = [tf.float16]
    elif mode == "int8":
        samples = _calibration_samples(representative_images, num_calibration, _input_image_shape(model))
        converter.representative_dataset = lambda: ([s] for s in samples)
        # Builtin int8 ops only: conversion fails rather than leaving float ops that an
        # integer-only accelerator could not run.
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8
        converter.inference_output_type = tf.uint8
    elif representative_images is not None:
        log.info("mode %r ignores representative_images", mode)

    # The Keras-3 path exports a temporary SavedModel and prints every captured variable
    # to stdout (hundreds of lines per conversion in a task log); keep it at debug level.
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured), warnings.catch_warnings():
        # Emitted for every uint8-input conversion although the input scale comes from the
        # calibration data (scale 1, zero point 0 for a 0..255 input); not actionable.
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs were expected")
        data = converter.convert()
    log.debug("converter output:\n%s", captured.getvalue())
    if not is_tflite_flatbuffer(data):  # pragma: no cover - the converter raises instead
        raise RuntimeError(f"TFLite converter returned {len(data)} bytes that are not a TFLite flatbuffer")
    log.info("converted %s to TFLite (%s): %d bytes", getattr(model, "name", "model"), mode, len(data))
    return data


def representative_images_from_manifest(
    manifest: SplitManifest | str,
    image_size: int,
    num: int = 100,
    seed: int = 0,
    split: str = "train",
) -> np.ndarray:
    """Seeded sample of ``num`` images from a split (default train) as float32 [n, s, s, 3].

    Calibrating on training images keeps the test split untouched for validation. The sample
    is deterministic (manifest order + seed) so a re-run yields the same int8 model.
    ``manifest`` may be a SplitManifest or the URI of its ``split.json``.
    """
    from dualml.preprocess import load_image

    if isinstance(manifest, str):
        manifest = SplitManifest.from_json(storage.read_text(manifest))
    files = manifest.files.get(split) or []
    if not files:
        raise ValueError(f"split {split!r} of the manifest has no files to calibrate on")
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    chosen = random.Random(seed).sample(files, min(num, len(files)))
    return np.stack([load_image(uri, image_size) for uri, _ in chosen]).astype(np.float32)


@dataclass
class ConversionResult:
    """What ``convert_file`` wrote; ``to_dict`` is JSON/XCom friendly."""

    uri: str
    mode: str
    size_bytes: int
    sha256: str
    num_calibration_images: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def convert_file(
    model,
    output_uri: str,
    mode: str,
    *,
    representative_images: Iterable | None = None,
    manifest: SplitManifest | str | None = None,
    num_calibration: int = 100,
    seed: int = 0,
) -> ConversionResult:
    """Convert ``model`` (keras.Model, ``model.keras`` path/URI, or its directory) and write it.

    For ``int8`` without ``representative_images``, ``manifest`` (a SplitManifest or the URI of
    the trainer's ``split.json``) supplies a seeded sample of training images.
    """
    check_mode(mode)
    model = load_keras_model(model)
    n_cal = 0
    if mode == "int8":
        if representative_images is None and manifest is not None:
            shape = _input_image_shape(model)
            if shape is None:
                raise ValueError("model input has no fixed image size; pass representative_images")
            representative_images = representative_images_from_manifest(
                manifest, image_size=shape[0], num=num_calibration, seed=seed
            )
        if representative_images is not None:
            representative_images = _calibration_samples(
                representative_images, num_calibration, _input_image_shape(model)
            )
            n_cal = len(representative_images)
    data = convert(model, mode, representative_images, num_calibration)
    storage.write_bytes(output_uri, data, content_type="application/octet-stream")
    result = ConversionResult(
        uri=output_uri,
        mode=mode,
        size_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        num_calibration_images=n_cal,
    )
    log.info("wrote %s (%s, %d bytes)", output_uri, mode, len(data))
    return result

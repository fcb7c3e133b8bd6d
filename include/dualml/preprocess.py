"""The one image preprocessing used everywhere: training, evaluation, the serving
signature and TFLite validation. Models take float32 RGB in [0, 255] at ``size x size``;
any model-specific scaling (DenseNet normalisation, MobileNetV3 rescaling) lives inside
the model, so every consumer feeds the same tensor.
"""

from __future__ import annotations

import tensorflow as tf


def decode_and_resize(image_bytes: tf.Tensor, size: int) -> tf.Tensor:
    """Encoded JPEG/PNG bytes (scalar string) -> float32 [size, size, 3] in [0, 255]."""
    img = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    img = tf.image.resize(img, (size, size), method="bilinear", antialias=False)
    img.set_shape((size, size, 3))
    return tf.clip_by_value(img, 0.0, 255.0)


def load_image(path_or_bytes, size: int):
    """numpy float32 [size, size, 3] from a local path / gs:// URI / raw bytes (eager helper)."""
    from dualml import storage

    data = path_or_bytes if isinstance(path_or_bytes, bytes) else storage.read_bytes(path_or_bytes)
    return decode_and_resize(tf.constant(data), size).numpy()

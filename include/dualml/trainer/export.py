"""Serving export: a SavedModel whose ``serving_default`` takes encoded images.

Signature (the contract the serving app and any TF Serving client rely on)::

    serving_default(image_bytes: tf.string [batch])  # JPEG or PNG bytes, any size
      -> probabilities: float32 [batch, num_classes]  (class order = labels.txt)
         label:         string  [batch]               top-1 class name
         class_index:   int32   [batch]
         confidence:    float32 [batch]               probability of the top-1 class

Preprocessing (decode, resize) is inside, so clients send raw image bytes; on Vertex they
send ``{"instances": [{"b64": "..."}]}``.
"""

from __future__ import annotations

import os

import keras
import tensorflow as tf

from dualml.dataset import labels_text
from dualml.preprocess import decode_and_resize

SIGNATURE_NAME = "serving_default"
INPUT_NAME = "image_bytes"


def export_serving_model(model: keras.Model, labels: list[str], image_size: int, export_dir: str) -> str:
    """Write the serving SavedModel (plus labels.txt) into ``export_dir``."""
    label_table = tf.constant(labels)

    archive = keras.export.ExportArchive()
    archive.track(model)

    def serve(image_bytes):
        images = tf.map_fn(
            lambda b: decode_and_resize(b, image_size),
            image_bytes,
            fn_output_signature=tf.TensorSpec((image_size, image_size, 3), tf.float32),
        )
        probs = model(images, training=False)
        idx = tf.argmax(probs, axis=-1, output_type=tf.int32)
        return {
            "probabilities": probs,
            "label": tf.gather(label_table, idx),
            "class_index": idx,
            "confidence": tf.reduce_max(probs, axis=-1),
        }

    archive.add_endpoint(
        name=SIGNATURE_NAME,
        fn=serve,
        input_signature=[tf.TensorSpec((None,), tf.string, name=INPUT_NAME)],
    )
    archive.write_out(export_dir, verbose=False)
    with open(os.path.join(export_dir, "labels.txt"), "w") as f:
        f.write(labels_text(labels))
    return export_dir


def load_serving_fn(export_dir: str):
    """Load the exported SavedModel and return its serving signature."""
    loaded = tf.saved_model.load(export_dir)
    return loaded.signatures[SIGNATURE_NAME]

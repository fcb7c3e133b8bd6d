"""The formats Vertex AI exports an AutoML Edge image classification model in (``ExportModel``).

- ``tf-saved-model`` (the edge model "for a Docker container")::

      serving_default(image_bytes: tf.string [batch], key: tf.string [batch])
        -> scores: float32 [batch, classes], labels: string [batch, classes], key: string [batch]

  ``image_bytes`` are encoded JPEG/PNG images of any size (decoded and resized inside); ``labels``
  names each score's class. The same SavedModel backs online prediction of a deployed AutoML model
  locally (``dualml.automl.serve``).
- ``tflite``: ``model.tflite`` (full-integer quantized, uint8 input ``[1, s, s, 3]`` of raw 0..255
  pixels and uint8 scores: what runs on phones' integer accelerators), ``dict.txt`` (one label per
  line, in output order) and ``tflite_metadata.json``.

Models take float32 RGB in [0, 255] (``dualml.preprocess``), as the custom trainer's do.
"""

from __future__ import annotations

import json
import os

SIGNATURE_NAME = "serving_default"
SAVED_MODEL_DIR = "saved_model"
TFLITE_DIR = "tflite"
TFLITE_FILES = ("model.tflite", "dict.txt", "tflite_metadata.json")
SPECS_FILE = "annotation_specs.json"  # beside the SavedModel: label -> annotation spec id (serving's ids)


def export_saved_model(model, labels: list[str], image_size: int, out_dir: str) -> str:
    """Write the edge SavedModel into ``out_dir``."""
    import tensorflow as tf

    from dualml.preprocess import decode_and_resize

    infer = tf.function(lambda images: model(images, training=False), autograph=False,
                        input_signature=[tf.TensorSpec((None, image_size, image_size, 3), tf.float32)])
    infer = infer.get_concrete_function()
    label_table = tf.constant(labels)

    @tf.function(input_signature=[tf.TensorSpec((None,), tf.string, name="image_bytes"),
                                  tf.TensorSpec((None,), tf.string, name="key")], autograph=False)
    def serve(image_bytes, key):
        images = tf.map_fn(lambda b: decode_and_resize(b, image_size), image_bytes,
                           fn_output_signature=tf.TensorSpec((image_size, image_size, 3), tf.float32))
        scores = infer(images)
        names = tf.tile(label_table[tf.newaxis, :], [tf.shape(scores)[0], 1])
        return {"scores": scores, "labels": names, "key": key}

    module = tf.Module(name="automl_edge")
    module.model_variables = list(model.variables)
    module.serve = serve
    tf.saved_model.save(module, out_dir, signatures={SIGNATURE_NAME: serve.get_concrete_function()})
    return out_dir


def export_tflite(model, labels: list[str], image_size: int, calibration_images, out_dir: str) -> str:
    """Write ``model.tflite`` (full integer, uint8 in/out), ``dict.txt`` and ``tflite_metadata.json``."""
    from dualml.tflite.convert import convert

    data = convert(model, "int8", calibration_images, num_calibration=len(calibration_images))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "model.tflite"), "wb") as f:
        f.write(data)
    with open(os.path.join(out_dir, "dict.txt"), "w") as f:
        f.write("".join(f"{label}\n" for label in labels))
    with open(os.path.join(out_dir, "tflite_metadata.json"), "w") as f:
        json.dump({"inferenceType": "QUANTIZED_UINT8", "inputShape": [1, image_size, image_size, 3],
                   "inputType": "QUANTIZED_UINT8", "outputType": "QUANTIZED_UINT8", "labels": "dict.txt"}, f)
    return out_dir

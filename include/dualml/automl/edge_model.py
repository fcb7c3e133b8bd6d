"""An exported AutoML edge SavedModel (``tf-saved-model``) as a reference classifier.

Where a custom-trained model is checked through its ``model.keras``, an AutoML model is only
available as what Vertex AI exports: this adapter gives its SavedModel the small surface the
TFLite validation (``dualml.tflite.validate``) and the champion gate use, with scores in the
caller's class order (the model names each score's class in its ``labels`` output).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dualml import storage


def find_saved_model(uri: str) -> str:
    """The folder holding the one ``saved_model.pb`` under ``uri`` (local or gs://)."""
    base = uri.rstrip("/")
    files = storage.list_files(base) if storage.is_gcs(base) else [str(p) for p in Path(base).rglob("*") if p.is_file()]
    roots = sorted({f.rpartition("/")[0] for f in files if f.endswith("/saved_model.pb")})
    if len(roots) != 1:
        raise FileNotFoundError(f"expected one saved_model.pb under {uri}, found {len(roots)}: {roots[:5]}")
    return roots[0]


def fetch(uri: str, local_dir: str) -> str:
    """Local copy of the SavedModel under ``uri`` (downloaded when on gs://)."""
    root = find_saved_model(uri)
    if not storage.is_gcs(root):
        return root
    return storage.download_dir(root, os.path.join(local_dir, "saved_model"))


class EdgeSavedModel:
    """``predict(images)``: float32 [N, s, s, 3] in [0, 255] -> scores [N, len(class_names)].

    Images are handed to the model as PNG bytes of the same pixels (rounded to uint8, what an
    image file holds and what a uint8 TFLite model is fed), so the model's own decode-and-resize
    sees exactly the validated pixels. ``predict_bytes`` takes encoded images as they are.
    """

    def __init__(self, saved_model_dir: str, class_names: list[str]):
        import tensorflow as tf

        self._tf = tf
        self._loaded = tf.saved_model.load(saved_model_dir)
        self._fn = self._loaded.signatures["serving_default"]
        self.class_names = list(class_names)
        probe = self._fn(image_bytes=tf.constant([tf.io.encode_png(tf.zeros((8, 8, 3), tf.uint8)).numpy()]),
                         key=tf.constant(["probe"]))
        labels = [x.decode() for x in probe["labels"].numpy()[0]]
        missing = sorted(set(self.class_names) - set(labels))
        if missing or len(labels) != len(self.class_names):
            raise ValueError(f"the SavedModel in {saved_model_dir} scores classes {labels}, not {self.class_names}")
        self.model_labels = labels
        self._order = [labels.index(c) for c in self.class_names]

    def predict_bytes(self, images: list[bytes], batch_size: int = 32) -> np.ndarray:
        tf = self._tf
        out = []
        for i in range(0, len(images), batch_size):
            chunk = images[i: i + batch_size]
            scores = self._fn(image_bytes=tf.constant(chunk), key=tf.constant([str(k) for k in range(len(chunk))]))
            out.append(scores["scores"].numpy()[:, self._order])
        return np.concatenate(out).astype(np.float32)

    def predict(self, images, batch_size: int = 32, verbose: int = 0) -> np.ndarray:
        tf = self._tf
        pixels = np.clip(np.round(np.asarray(images, dtype=np.float32)), 0, 255).astype(np.uint8)
        return self.predict_bytes([tf.io.encode_png(p).numpy() for p in pixels], batch_size)


def evaluate(saved_model_dir: str, files: list[tuple[str, int]], class_names: list[str]) -> dict:
    """Accuracy, macro F1, per-class figures and confusion matrix on (image path/URI, class index) pairs,
    the images given to the model as stored (the model resizes them itself)."""
    from dualml.trainer.evaluate import classification_metrics

    model = EdgeSavedModel(saved_model_dir, class_names)
    probs = model.predict_bytes([storage.read_bytes(p) if storage.is_gcs(p) else Path(p).read_bytes()
                                 for p, _ in files])
    return classification_metrics([i for _, i in files], probs.argmax(axis=1), class_names)

"""Load the exported serving SavedModel and run predictions (imports TensorFlow lazily).

The SavedModel contract is the one ``dualml.trainer.export`` writes::

    serving_default(image_bytes: tf.string [batch]) -> probabilities, label, class_index, confidence

with ``labels.txt`` (one class per line, line number = class index) beside ``saved_model.pb`` and
an optional ``model_version.txt``. The names are repeated here rather than imported so the serving
image needs only this package, ``dualml.storage`` and TensorFlow (a test checks they agree).
"""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from dualml.serving.protocol import prediction_json

log = logging.getLogger("dualml.serving")

SIGNATURE_NAME = "serving_default"
INPUT_NAME = "image_bytes"
LABELS_FILE = "labels.txt"
VERSION_FILE = "model_version.txt"


class ModelLoadError(RuntimeError):
    """The model directory cannot be served; the message says what is missing."""


def _find_saved_model(root: Path) -> Path:
    if (root / "saved_model.pb").is_file():
        return root
    found = sorted(p.parent for p in root.rglob("saved_model.pb"))
    if len(found) == 1:
        return found[0]
    listing = ", ".join(sorted(p.name for p in root.iterdir())[:20]) if root.is_dir() else "not a directory"
    if not found:
        raise ModelLoadError(
            f"no saved_model.pb under {root} (contents: {listing or 'empty'}); point AIP_STORAGE_URI / "
            "--model-dir at the directory written by dualml.trainer.export.export_serving_model"
        )
    raise ModelLoadError(
        f"several SavedModels under {root} ({', '.join(map(str, found))}); point at one of them"
    )


def fetch_model_dir(uri: str) -> tuple[str, str | None]:
    """Return (local directory holding saved_model.pb, temp dir to delete on exit or None).

    ``gs://`` URIs are downloaded (through dualml.storage, which honours STORAGE_EMULATOR_HOST).
    """
    from dualml import storage

    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if storage.is_gcs(uri):
        tmp = tempfile.mkdtemp(prefix="dualml-serving-")
        try:
            storage.download_dir(uri, tmp)
            return str(_find_saved_model(Path(tmp))), tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    root = Path(uri)
    if not root.is_dir():
        raise ModelLoadError(f"model directory {uri} does not exist")
    return str(_find_saved_model(root)), None


def _read_labels(model_dir: str) -> list[str]:
    path = Path(model_dir) / LABELS_FILE
    if not path.is_file():
        raise ModelLoadError(
            f"{path} is missing: the exported model must have {LABELS_FILE} beside saved_model.pb"
        )
    labels = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(labels) < 2:
        raise ModelLoadError(f"{path} lists {len(labels)} label(s); a classifier needs at least 2")
    return labels


def resolve_version(model_dir: str, override: str | None = None) -> str | None:
    """--model-version, else model_version.txt, else $MODEL_VERSION, else $AIP_DEPLOYED_MODEL_ID, else None."""
    if override:
        return override
    path = Path(model_dir) / VERSION_FILE
    if path.is_file():
        text = path.read_text(encoding="utf-8").strip()
        if text:
            return text
    return os.environ.get("MODEL_VERSION") or os.environ.get("AIP_DEPLOYED_MODEL_ID") or None


class Predictor:
    """The loaded model. Thread-safe: concurrent requests call the same concrete function."""

    def __init__(self, model_dir: str, version: str | None = None, max_image_pixels: int = 40_000_000):
        import tensorflow as tf

        self._tf = tf
        self.model_dir = model_dir
        self.labels = _read_labels(model_dir)
        self.version = resolve_version(model_dir, version)
        self.max_image_pixels = max_image_pixels
        try:
            loaded = tf.saved_model.load(model_dir)
        except Exception as e:  # reported with the path
            raise ModelLoadError(f"cannot load the SavedModel in {model_dir}: {e}") from e
        self._loaded = loaded  # keep the trackable objects alive
        if SIGNATURE_NAME not in loaded.signatures:
            raise ModelLoadError(
                f"SavedModel in {model_dir} has no {SIGNATURE_NAME!r} signature "
                f"(has: {', '.join(loaded.signatures) or 'none'})"
            )
        self._fn = loaded.signatures[SIGNATURE_NAME]
        inputs = self._fn.structured_input_signature[1]
        if len(inputs) != 1:
            raise ModelLoadError(f"{SIGNATURE_NAME} takes inputs {sorted(inputs)}; expected one string input")
        self._input_name = next(iter(inputs))
        self._warm_up()

    def _warm_up(self) -> None:
        """Run one tiny image through the model: fails fast on a labels/model mismatch."""
        tf = self._tf
        png = tf.io.encode_png(tf.zeros((8, 8, 3), tf.uint8)).numpy()
        out = self._fn(**{self._input_name: tf.constant([png])})
        missing = {"probabilities", "label", "class_index", "confidence"} - set(out)
        if missing:
            raise ModelLoadError(f"{SIGNATURE_NAME} lacks outputs {sorted(missing)}; re-export the model")
        width = int(out["probabilities"].shape[-1])
        if width != len(self.labels):
            raise ModelLoadError(
                f"{LABELS_FILE} lists {len(self.labels)} labels but the model outputs {width} classes"
            )

    def check_image(self, data: bytes) -> str | None:
        """None if ``data`` decodes the way the model will decode it, else the reason it does not."""
        if self.max_image_pixels:
            problem = _check_pixels(data, self.max_image_pixels)
            if problem:
                return problem
        tf = self._tf
        try:
            tf.io.decode_image(data, channels=3, expand_animations=False)
        except (tf.errors.OpError, ValueError) as e:
            return f"not a decodable image (JPEG or PNG expected): {_tf_reason(e)}"
        return None

    def predict(self, images: list[bytes]) -> list[dict]:
        tf = self._tf
        out = self._fn(**{self._input_name: tf.constant(images, dtype=tf.string)})
        probs = out["probabilities"].numpy()
        labels = out["label"].numpy()
        idx = out["class_index"].numpy()
        conf = out["confidence"].numpy()
        return [
            prediction_json(self.labels, probs[i].tolist(), labels[i].decode("utf-8"), idx[i], conf[i])
            for i in range(len(images))
        ]


def _tf_reason(e: Exception) -> str:
    """The readable part of a TensorFlow op error (drops the function-node prefix and op suffix)."""
    text = (getattr(e, "message", None) or str(e)).strip()
    text = re.sub(r"^\{\{[^}]*\}\}\s*", "", text)
    text = re.sub(r"\s*\[Op:\w+\].*$", "", text, flags=re.S)
    return (text.splitlines() or ["unknown decoder error"])[0][:200]


def _check_pixels(data: bytes, max_pixels: int) -> str | None:
    """Reject decompression bombs from the image header alone, before any pixel is decoded."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a serving dependency
        return None
    too_big = "image is {} pixels, more than the limit of {}; downscale it before sending"
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
    except Image.DecompressionBombError:
        return too_big.format(f"over {2 * (Image.MAX_IMAGE_PIXELS or 0)}", max_pixels)
    except Exception:  # not readable by PIL: TensorFlow's decoder gives the verdict
        return None
    if width * height > max_pixels:
        return too_big.format(f"{width}x{height}", max_pixels)
    return None

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


# What serving reads from a model directory; the trainer also writes model.keras (as large again as
# the SavedModel), metrics, history and the split there, which a serving replica never needs.
SERVING_FILES = ("saved_model.pb", "saved_model.pbtxt", "fingerprint.pb", LABELS_FILE, VERSION_FILE)
SERVING_DIRS = ("variables/", "assets/", "assets.extra/")


def _saved_model_root(rel_paths: list[str], where: str) -> str:
    """The directory (relative, "" = top) holding the one saved_model.pb among ``rel_paths``."""
    roots = sorted({p.rpartition("/")[0] for p in rel_paths if p.rpartition("/")[2] == "saved_model.pb"})
    if len(roots) == 1:
        return roots[0]
    if "" in roots:  # the top-level model wins over nested copies (as a local directory does)
        return ""
    if not roots:
        listing = ", ".join(sorted({p.split("/")[0] for p in rel_paths})[:20]) or "empty"
        raise ModelLoadError(
            f"no saved_model.pb under {where} (contents: {listing}); point AIP_STORAGE_URI / "
            "--model-dir at the directory written by dualml.trainer.export.export_serving_model"
        )
    raise ModelLoadError(f"several SavedModels under {where} ({', '.join(roots)}); point at one of them")


def serving_files(rel_paths: list[str], where: str) -> tuple[str, list[str]]:
    """(SavedModel root, the files under it that serving needs) from a model directory listing."""
    root = _saved_model_root(rel_paths, where)
    prefix = f"{root}/" if root else ""
    wanted = []
    for path in rel_paths:
        if not path.startswith(prefix):
            continue
        rel = path[len(prefix) :]
        if rel in SERVING_FILES or rel.startswith(SERVING_DIRS):
            wanted.append(path)
    return root, wanted


def _find_saved_model(root: Path) -> Path:
    if (root / "saved_model.pb").is_file():
        return root
    if not root.is_dir():
        raise ModelLoadError(f"model directory {root} is not a directory")
    rel = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
    return root / _saved_model_root(rel, str(root))


def fetch_model_dir(uri: str, download_to: str | None = None) -> tuple[str, str | None]:
    """Return (local directory holding saved_model.pb, temp dir to delete on exit or None).

    ``gs://`` URIs: only the files serving needs (SERVING_FILES, SERVING_DIRS) are downloaded,
    through dualml.storage (which honours STORAGE_EMULATOR_HOST), into ``download_to`` (the
    caller deletes it) or a new temp dir. Local directories are used in place.
    """
    from dualml import storage

    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if storage.is_gcs(uri):
        base = uri.rstrip("/")
        listed = storage.list_files(base)
        rel_paths = [u[len(base) + 1 :] for u in listed if u.startswith(base + "/")]
        root, wanted = serving_files(rel_paths, uri)
        tmp = download_to or tempfile.mkdtemp(prefix="dualml-serving-")
        try:
            for rel in wanted:
                storage.download_file(f"{base}/{rel}", os.path.join(tmp, rel))
            log.info(
                "downloaded %d serving file(s) from %s (skipped %d others, e.g. model.keras)",
                len(wanted), uri, len(rel_paths) - len(wanted),
            )
            return (os.path.join(tmp, root) if root else tmp), (None if download_to else tmp)
        except BaseException:
            if not download_to:
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

    def __init__(
        self,
        model_dir: str,
        version: str | None = None,
        max_image_pixels: int = 40_000_000,
        intra_op_threads: int | None = None,
    ):
        import tensorflow as tf

        self._tf = tf
        if intra_op_threads:
            set_intra_op_threads(intra_op_threads)
        self.intra_op_threads = tf.config.threading.get_intra_op_parallelism_threads()  # 0: TF's default
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

    def warm_up(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        """Run each batch size once with a realistic image, so the first requests after the health
        route turns 200 do not pay for graph optimisation and memory allocation."""
        tf = self._tf
        noise = tf.random.stateless_uniform((128, 128, 3), seed=(1, 2), maxval=256, dtype=tf.int32)
        jpeg = tf.io.encode_jpeg(tf.cast(noise, tf.uint8)).numpy()
        for size in sorted(set(batch_sizes)):
            self.predict([jpeg] * size)

    def check_image(self, data: bytes, thorough: bool = False) -> str | None:
        """None if ``data`` can be served, else the reason (for a 400).

        By default only the header is read (format, size: decompression bombs are refused before
        any pixel is decoded); TensorFlow's decoder runs only when the header is unreadable. The
        model decodes every image anyway, and a request whose images fail there is re-checked with
        ``thorough=True`` (a full decode) to name the image: decoding twice on every request cost
        more than the HTTP layer itself (`make bench`).
        """
        size = _header_size(data, self.max_image_pixels)
        if isinstance(size, str):
            return size
        if size is not None:
            if self.max_image_pixels and size[0] * size[1] > self.max_image_pixels:
                return _too_many_pixels(f"{size[0]}x{size[1]}", self.max_image_pixels)
            if not thorough:
                return None
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


def set_intra_op_threads(n: int) -> None:
    """Threads one TensorFlow op may use. Must run before TensorFlow's first op in the process."""
    import tensorflow as tf

    if tf.config.threading.get_intra_op_parallelism_threads() == n:
        return
    try:
        tf.config.threading.set_intra_op_parallelism_threads(n)
    except RuntimeError as e:  # the runtime is already initialised (e.g. a test process)
        log.warning("cannot set TensorFlow's intra-op threads to %d: %s", n, e)


def _tf_reason(e: Exception) -> str:
    """The readable part of a TensorFlow op error (drops the function-node prefix and op suffix)."""
    text = (getattr(e, "message", None) or str(e)).strip()
    text = re.sub(r"^\{\{[^}]*\}\}\s*", "", text)
    text = re.sub(r"\s*\[Op:\w+\].*$", "", text, flags=re.S)
    return (text.splitlines() or ["unknown decoder error"])[0][:200]


def _too_many_pixels(size: str, max_pixels: int) -> str:
    return f"image is {size} pixels, more than the limit of {max_pixels}; downscale it before sending"


def _header_size(data: bytes, max_pixels: int) -> tuple[int, int] | str | None:
    """(width, height) from the image header, a reason to refuse it, or None when PIL cannot
    read the header (TensorFlow's decoder gives the verdict then)."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a serving dependency
        return None
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Image.DecompressionBombError:
        return _too_many_pixels(f"over {2 * (Image.MAX_IMAGE_PIXELS or 0)}", max_pixels or Image.MAX_IMAGE_PIXELS)
    except Exception:
        return None

"""Images as an online prediction request carries them (Vertex AI: 1.5 MB per request).

A 40 MP phone photo (2 MB+ of JPEG, ~2.8 MB as base64) trains fine but cannot be sent to an
endpoint as it is: the request is refused with 413. Every client of the endpoint (the deploy
step's smoke test, the ``curl`` example ``make run`` prints, user code) prepares images with
:func:`prepare_image`, and dataset validation uses :func:`serving_issue` to list the images
that would be resized, so the validation and serving sides agree on one rule.

The model resizes every input to its own ``image_size`` square, so a downscaled copy loses
nothing it would use. Pixels keep the file's stored orientation (EXIF rotation is *not*
applied), exactly as training and the serving signature decode them. Pure Pillow: no TensorFlow.
"""

from __future__ import annotations

import base64
import io

VERTEX_MAX_REQUEST_BYTES = 1_500_000  # Vertex AI online prediction request limit
MAX_SIDE = 1024  # longest side sent; far above any image_size the models train at
MAX_IMAGE_BYTES = 384 * 1024  # encoded image; as base64 ~512 KB, a third of the request limit
JPEG_QUALITY = 90
_MIN_QUALITY = 60


def max_side_for(image_size: int | None = None) -> int:
    """Longest side to send: :data:`MAX_SIDE`, or 4x the model's input size when that is smaller."""
    return MAX_SIDE if not image_size else min(MAX_SIDE, max(4 * int(image_size), 256))


def serving_issue(width: int, height: int, num_bytes: int, fmt: str | None = None,
                  image_size: int | None = None, max_bytes: int = MAX_IMAGE_BYTES) -> str | None:
    """Why an image cannot go into a prediction request as it is (``prepare_image`` resizes it), or None."""
    side = max_side_for(image_size)
    reasons = []
    if max(width, height) > side:
        reasons.append(f"{width}x{height} px is above the {side} px sent per image")
    if num_bytes > max_bytes:
        reasons.append(f"{num_bytes / 1e6:.2f} MB is above the {max_bytes / 1e6:.2f} MB sent per image "
                       f"(a request carries at most {VERTEX_MAX_REQUEST_BYTES / 1e6:.1f} MB, as base64)")
    if fmt and fmt not in ("JPEG", "PNG"):
        reasons.append(f"format {fmt} is re-encoded as JPEG")
    return "; ".join(reasons) or None


def prepare_image(data: bytes, image_size: int | None = None, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """Encoded image bytes ready for a prediction instance: unchanged when they already fit,
    else decoded, downscaled to at most ``max_side_for(image_size)`` px and re-encoded as JPEG
    of at most ``max_bytes``. Raises ValueError for data that is not an image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, (width, height) = im.format, im.size
            if serving_issue(width, height, len(data), fmt, image_size, max_bytes) is None:
                return data
            side = max_side_for(image_size)
            if fmt == "JPEG":
                im.draft("RGB", (side, side))  # decode a 40 MP JPEG at 1/2..1/8 scale directly
            rgb = im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"not a readable image ({e})") from None
    quality = JPEG_QUALITY
    while True:
        small = rgb.copy()
        small.thumbnail((side, side), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        small.save(buf, format="JPEG", quality=quality)
        if buf.tell() <= max_bytes:
            return buf.getvalue()
        if quality > _MIN_QUALITY:
            quality -= 10
        elif side > 64:
            side = int(side * 0.75)
        else:
            raise ValueError(f"cannot encode the image under {max_bytes} bytes")


def prediction_instance(data: bytes, image_size: int | None = None) -> dict:
    """One Vertex AI instance, ``{"b64": ...}``, for an image prepared with :func:`prepare_image`."""
    return {"b64": base64.b64encode(prepare_image(data, image_size)).decode("ascii")}

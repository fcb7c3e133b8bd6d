"""Smoke prediction helpers: held-out test images in Vertex's request format, and the answer check."""

from __future__ import annotations

from dualml.request_image import prediction_instance


class SmokeTestFailed(RuntimeError):
    """The endpoint did not answer a valid prediction request correctly."""


def build_request(images: list[bytes], image_size: int | None = None) -> dict:
    """``{"instances": [{"b64": ...}]}`` with each image prepared as serving clients send it
    (downscaled and re-encoded when it would not fit Vertex's 1.5 MB request limit)."""
    return {"instances": [prediction_instance(b, image_size) for b in images]}


def check_response(body: dict, labels: list[str], expected: int) -> list[dict]:
    preds = body.get("predictions")
    if not isinstance(preds, list) or len(preds) != expected:
        raise SmokeTestFailed(f"expected {expected} predictions, got {str(body)[:300]}")
    for p in preds:
        if not isinstance(p, dict):
            raise SmokeTestFailed(f"prediction {str(p)[:100]} is not an object")
        if p.get("label") not in labels:
            raise SmokeTestFailed(f"label {p.get('label')!r} is not one of the model's labels {labels}")
        try:
            confidence = float(p.get("confidence", -1))
        except (TypeError, ValueError):
            confidence = -1
        if not 0.0 <= confidence <= 1.0:
            raise SmokeTestFailed(f"confidence {p.get('confidence')!r} is not a probability")
    return preds

"""Smoke prediction helpers: held-out test images in Vertex's request format, and the answer check."""

from __future__ import annotations

from dualml.request_image import prediction_instance


class SmokeTestFailed(RuntimeError):
    """The endpoint did not answer a valid prediction request correctly."""


# Request formats: "b64" ({"b64": ...}, the serving app of custom-trained models) and "automl_image"
# ({"content": ...}, Vertex AI's AutoML image classification models).
INSTANCE_FORMATS = ("b64", "automl_image")


def build_request(images: list[bytes], image_size: int | None = None, instance_format: str = "b64") -> dict:
    """``{"instances": [{"b64": ...}]}`` (or ``{"content": ...}`` for AutoML) with each image prepared as
    serving clients send it (downscaled and re-encoded when it would not fit Vertex's 1.5 MB request limit)."""
    if instance_format not in INSTANCE_FORMATS:
        raise ValueError(f"instance_format must be one of {INSTANCE_FORMATS}, got {instance_format!r}")
    instances = [prediction_instance(b, image_size) for b in images]
    if instance_format == "automl_image":
        instances = [{"content": i["b64"]} for i in instances]
    return {"instances": instances}


def _automl_prediction(p: dict) -> dict:
    """An AutoML classification prediction ({ids, displayNames, confidences}) with its top label and
    confidence as ``label`` / ``confidence``, the keys the custom serving app answers with."""
    names, confidences = p.get("displayNames"), p.get("confidences")
    if not isinstance(names, list) or not isinstance(confidences, list) or not names or len(names) != len(confidences):
        raise SmokeTestFailed(f"AutoML prediction {str(p)[:200]} lacks matching displayNames and confidences")
    best = max(range(len(names)), key=lambda i: float(confidences[i]))
    return {**p, "label": names[best], "confidence": confidences[best]}


def check_response(body: dict, labels: list[str], expected: int) -> list[dict]:
    preds = body.get("predictions")
    if not isinstance(preds, list) or len(preds) != expected:
        raise SmokeTestFailed(f"expected {expected} predictions, got {str(body)[:300]}")
    for p in preds:
        if not isinstance(p, dict):
            raise SmokeTestFailed(f"prediction {str(p)[:100]} is not an object")
    preds = [_automl_prediction(p) if "displayNames" in p else p for p in preds]
    for p in preds:
        if p.get("label") not in labels:
            raise SmokeTestFailed(f"label {p.get('label')!r} is not one of the model's labels {labels}")
        try:
            confidence = float(p.get("confidence", -1))
        except (TypeError, ValueError):
            confidence = -1
        if not 0.0 <= confidence <= 1.0:
            raise SmokeTestFailed(f"confidence {p.get('confidence')!r} is not a probability")
    return preds

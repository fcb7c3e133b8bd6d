"""Request parsing and response building for the prediction server (pure Python, no TensorFlow).

Request (Vertex AI online prediction, ``POST <AIP_PREDICT_ROUTE>``)::

    {"instances": [{"b64": "<base64 JPEG/PNG>"}, ...], "parameters": {...}}   # parameters ignored
    {"instances": [{"image_bytes": {"b64": "<base64 JPEG/PNG>"}}, ...]}        # AutoML style, also accepted

Response 200::

    {"predictions": [{"label": "roses", "confidence": 0.91, "class_index": 2,
                      "probabilities": {"daisy": 0.01, ..., "roses": 0.91, ...}}, ...]}

Only ``predictions``: Vertex AI passes that field through and adds its own (``deployedModelId``,
``model`` as a resource-name string, ...), so a top-level ``model`` object here would collide with
``PredictResponse.model``. The model version travels in the ``X-Model-Version`` response header.

Client errors: 4xx with ``{"error": "<what is wrong, and the expected format>"}``.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence

EXPECTED_FORMAT = '{"instances": [{"b64": "<base64-encoded JPEG or PNG>"}, ...]}'


class RequestError(Exception):
    """A client error: ``status`` is the HTTP status, ``message`` says what to fix; ``close``: the
    connection cannot be reused (part of the request was left unread); ``linger``: answer at once,
    then read and drop the rest of the body before the request ends."""

    def __init__(self, status: int, message: str, close: bool = False, linger: bool = False):
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close
        self.linger = linger


def _decode_b64(value: object, where: str) -> bytes:
    if not isinstance(value, str):
        raise RequestError(400, f'{where}: "b64" must be a base64 string, got {type(value).__name__}')
    # Tolerate line-wrapped output (``base64 file.jpg``) and the URL-safe alphabet.
    text = "".join(value.split()).translate(str.maketrans("-_", "+/"))
    if not text:
        raise RequestError(
            400, f'{where}: "b64" is empty; expected the base64-encoded bytes of a JPEG or PNG'
        )
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(400, f'{where}: "b64" is not valid base64 ({e})') from None
    if not data:
        raise RequestError(400, f'{where}: "b64" decodes to zero bytes; expected a JPEG or PNG')
    return data


def _instance_bytes(instance: object, index: int) -> bytes:
    where = f"instance {index}"
    if isinstance(instance, dict):
        if "b64" in instance:
            return _decode_b64(instance["b64"], where)
        inner = instance.get("image_bytes")
        if isinstance(inner, dict) and "b64" in inner:
            return _decode_b64(inner["b64"], f"{where} image_bytes")
        keys = ", ".join(sorted(map(str, instance))) or "none"
        raise RequestError(
            400,
            f'{where} has no "b64" field (keys: {keys}); each instance must be {{"b64": "<base64 image>"}} '
            f'or {{"image_bytes": {{"b64": "<base64 image>"}}}}',
        )
    if isinstance(instance, str):
        raise RequestError(
            400,
            f'{where} is a bare string; wrap the base64 image as {{"b64": "..."}} so it is not read as text',
        )
    raise RequestError(
        400, f'{where} is a {type(instance).__name__}; each instance must be {{"b64": "<base64 image>"}}'
    )


def parse_predict_body(body: bytes, max_instances: int) -> list[bytes]:
    """Validate a predict request body; return the encoded image bytes of each instance.

    Raises RequestError (400, or 413 for more than ``max_instances``) naming the problem.
    Image decodability is checked separately (it needs the image decoder).
    """
    if not body:
        raise RequestError(400, f"request body is empty; expected {EXPECTED_FORMAT}")
    try:
        payload = json.loads(body)
    except UnicodeDecodeError:
        raise RequestError(400, f"request body is not UTF-8 JSON; expected {EXPECTED_FORMAT}") from None
    except json.JSONDecodeError as e:
        raise RequestError(400, f"request body is not valid JSON ({e}); expected {EXPECTED_FORMAT}") from None
    except RecursionError:  # hostile nesting ([[[[...]]]]) must be a client error, not a 500
        raise RequestError(
            400, f"request body is nested too deeply to be a prediction request; expected {EXPECTED_FORMAT}"
        ) from None
    except ValueError as e:  # e.g. an integer beyond sys.get_int_max_str_digits() (4300 digits)
        reason = str(e).split(";")[0]  # drop Python's advice to call sys.set_int_max_str_digits()
        raise RequestError(400, f"request body is not acceptable JSON ({reason}); expected {EXPECTED_FORMAT}") from None
    if not isinstance(payload, dict):
        raise RequestError(
            400,
            f"request body must be a JSON object, got a {type(payload).__name__}; expected {EXPECTED_FORMAT}",
        )
    if "instances" not in payload:
        keys = ", ".join(sorted(payload)) or "none"
        raise RequestError(
            400, f'request has no "instances" field (keys: {keys}); expected {EXPECTED_FORMAT}'
        )
    instances = payload["instances"]
    if not isinstance(instances, list):
        raise RequestError(
            400, f'"instances" must be a list, got a {type(instances).__name__}; expected {EXPECTED_FORMAT}'
        )
    if not instances:
        raise RequestError(400, f'"instances" is empty: send at least one image; expected {EXPECTED_FORMAT}')
    if len(instances) > max_instances:
        raise RequestError(
            413,
            f"too many instances: {len(instances)} in one request, the limit is {max_instances}; "
            "split them over several requests",
        )
    return [_instance_bytes(inst, i) for i, inst in enumerate(instances)]


def prediction_json(
    labels: Sequence[str], probabilities: Sequence[float], label: str, class_index: int, confidence: float
) -> dict:
    return {
        "label": label,
        "confidence": float(confidence),
        "class_index": int(class_index),
        "probabilities": {name: float(p) for name, p in zip(labels, probabilities, strict=True)},
    }


def error_json(message: str) -> dict:
    return {"error": message}

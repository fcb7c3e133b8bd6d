"""Smoke prediction: send held-out test images in Vertex's request format and check the answer."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request

from dualml.dataset import SplitManifest


class SmokeTestFailed(RuntimeError):
    """The endpoint did not answer a valid prediction request correctly."""


def build_request(images: list[bytes]) -> dict:
    return {"instances": [{"b64": base64.b64encode(b).decode("ascii")} for b in images]}


def check_response(body: dict, labels: list[str], expected: int) -> list[dict]:
    preds = body.get("predictions")
    if not isinstance(preds, list) or len(preds) != expected:
        raise SmokeTestFailed(f"expected {expected} predictions, got {str(body)[:300]}")
    for p in preds:
        if p.get("label") not in labels:
            raise SmokeTestFailed(f"label {p.get('label')!r} is not one of the model's labels {labels}")
        if not 0.0 <= float(p.get("confidence", -1)) <= 1.0:
            raise SmokeTestFailed(f"confidence {p.get('confidence')!r} is not a probability")
    return preds


def smoke_test(url: str, split_uri: str, io, n: int = 2, timeout_s: float = 60) -> dict:
    """POST ``n`` test-split images to ``url``; returns a small report, raises SmokeTestFailed."""
    manifest = SplitManifest.from_json(io.read_bytes(split_uri).decode())
    samples = manifest.files["test"][:n]
    request = build_request([io.read_bytes(u) for u, _ in samples])
    req = urllib.request.Request(url, data=json.dumps(request).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            body = json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise SmokeTestFailed(f"HTTP {e.code} from {url}: {e.read()[:300]!r}") from None
    except (urllib.error.URLError, TimeoutError, json.JSONDecodeError) as e:
        raise SmokeTestFailed(f"no valid answer from {url}: {e}") from None
    preds = check_response(body, manifest.labels, len(samples))
    return {
        "url": url,
        "instances": len(samples),
        "predictions": [p["label"] for p in preds],
        "expected": [manifest.labels[i] for _, i in samples],
    }

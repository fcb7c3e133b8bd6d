"""Vertex AI's resource-name formats and validation rules, as the service applies them.

Every violation raises ``RpcError`` with the status code Vertex AI answers with (mostly
INVALID_ARGUMENT), so clients see the same failures locally as on Google Cloud.
"""

from __future__ import annotations

import re

import grpc

from localcloud.errors import RpcError

PARENT = re.compile(r"^projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)$")
COLLECTIONS = ("customJobs", "models", "endpoints", "datasets", "trainingPipelines")

DISPLAY_NAME_MAX = 128
LABEL_KEY = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
LABEL_VALUE = re.compile(r"^[a-z0-9_-]{0,63}$")
MAX_LABELS = 64
# ModelService: "The format is [a-z][a-zA-Z0-9-]{0,126}[a-z0-9] to distinguish from version_id."
VERSION_ALIAS = re.compile(r"^[a-z][a-zA-Z0-9-]{0,126}[a-z0-9]$")
# DeployedModel.id: "1-10 characters, and valid characters are /[0-9]/" (when given by the caller).
DEPLOYED_MODEL_ID = re.compile(r"^[0-9]{1,10}$")
# Online prediction: "The maximum request size is 1.5 MB."
MAX_PREDICT_REQUEST_BYTES = 1_572_864


def invalid(message: str) -> RpcError:
    return RpcError(grpc.StatusCode.INVALID_ARGUMENT, message)


def parse_parent(parent: str) -> tuple[str, str]:
    m = PARENT.match(parent or "")
    if not m:
        raise invalid(f"Invalid parent '{parent}': expected projects/{{project}}/locations/{{location}}")
    return m["project"], m["location"]


def parse_name(name: str, collection: str) -> tuple[str, str, str, str | None]:
    """``projects/p/locations/l/<collection>/<id>[@<version or alias>]`` -> (project, location, id, at)."""
    m = re.match(rf"^projects/([^/]+)/locations/([^/]+)/{collection}/([^/@]+)(?:@([^/]+))?$", name or "")
    if not m:
        raise invalid(f"Invalid resource name '{name}': expected projects/{{project}}/locations/"
                      f"{{location}}/{collection}/{{id}}")
    return m[1], m[2], m[3], m[4]


def display_name(value: str, what: str) -> str:
    if not value:
        raise invalid(f"{what}.display_name is required")
    if len(value.encode()) > DISPLAY_NAME_MAX:
        raise invalid(f"{what}.display_name '{value[:40]}...' is {len(value.encode())} bytes long; "
                      f"the maximum is {DISPLAY_NAME_MAX}")
    return value


def labels(values: dict[str, str], what: str) -> None:
    if len(values) > MAX_LABELS:
        raise invalid(f"{what}.labels has {len(values)} entries; at most {MAX_LABELS} are allowed")
    for key, value in values.items():
        if not LABEL_KEY.match(key):
            raise invalid(f"{what}.labels key '{key}' is invalid: 1-63 characters, lowercase letters, digits, "
                          "'_' and '-', starting with a lowercase letter")
        if not LABEL_VALUE.match(value):
            raise invalid(f"{what}.labels['{key}'] value '{value}' is invalid: at most 63 characters, "
                          "lowercase letters, digits, '_' and '-'")


def version_alias(alias: str) -> str:
    if not VERSION_ALIAS.match(alias):
        raise invalid(f"Version alias '{alias}' is invalid: it must match [a-z][a-zA-Z0-9-]{{0,126}}[a-z0-9]")
    return alias


def traffic_split(split: dict[str, int], allowed_ids: set[str]) -> dict[str, int]:
    """A traffic split names only ``allowed_ids``, has no negative share and sums to 100 (or is empty
    when nothing is deployed)."""
    split = {str(k): int(v) for k, v in split.items()}
    unknown = sorted(set(split) - allowed_ids)
    if unknown:
        # Vertex AI's wording, plus what is deployed.
        raise invalid(f"The following DeployedModel ID(s) {unknown} do not exist. "
                      f"(deployed on the endpoint: {sorted(allowed_ids - {'0'})})")
    negative = {k: v for k, v in split.items() if v < 0}
    if negative:
        raise invalid(f"traffic_split values must be non-negative, got {negative}")
    total = sum(split.values())
    if split and total != 100:
        raise invalid(f"The sum of traffic_split values must be 100, got {total} ({split})")
    return {k: v for k, v in split.items()}


def gcs_uri(uri: str, what: str) -> str:
    if not uri.startswith("gs://") or len(uri) <= len("gs://"):
        raise invalid(f"{what} must be a Cloud Storage URI (gs://bucket/path), got '{uri}'")
    return uri

"""Names Vertex AI and Firebase accept: valid by construction when derived from a run id, checked with a
clear message when configured. No Airflow imports (config.py and the hooks use it too).

The services' rules:
- Vertex AI model version alias: ``[a-z][a-zA-Z0-9-]{0,126}[a-z0-9]`` (so at most 128 characters, never
  ending in ``-``).
- Vertex AI display names (CustomJob, Model, Endpoint, DeployedModel): at most 128 characters.
- Labels (Vertex AI, Cloud Storage): values at most 63 characters of ``[a-z0-9_-]``.
- Firebase ML model display name: 1-32 characters, ASCII letters, digits and ``_``, starting with a letter
  (firebaseml v1beta2 ``Model.displayName``; firebase_admin.ml's own ``_DISPLAY_NAME_PATTERN``,
  ``[A-Za-z0-9_-]{1,32}``, is looser: the API rejects what it lets through). Tags: ``[A-Za-z0-9_-]{1,32}``
  (firebase_admin.ml ``_TAG_PATTERN``).

A derived name that has to be shortened keeps its start and ends in 8 hex digits of the SHA-256 of the
full run id, so two long run ids that share a prefix still get different names.
"""

from __future__ import annotations

import hashlib
import re

VERTEX_DISPLAY_NAME_MAX = 128
VERTEX_ALIAS_PATTERN = re.compile(r"^[a-z][a-zA-Z0-9-]{0,126}[a-z0-9]$")
LABEL_VALUE_PATTERN = re.compile(r"^[a-z0-9_-]{0,63}$")
FIREBASE_ML_DISPLAY_NAME_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,31}$")
FIREBASE_TAG_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,32}$")

RUN_ALIAS_PREFIX = "run-"
_HASH_LEN = 8
_SLUG_MAX = 100  # run folders and names made before the hash suffix existed used 100 characters


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:_HASH_LEN]


def slug(value: str, max_len: int = _SLUG_MAX) -> str:
    """``manual__2026-01-01T00:00:00+00:00`` -> ``manual-2026-01-01t00-00-00-00-00``: lowercase letters,
    digits and single-run hyphens, never starting or ending with ``-``, at most ``max_len`` characters.

    Values whose slug fits are unchanged from earlier releases (same run folders); longer ones are cut and
    end in ``-<8 hex digits of the full value's hash>``; a value with no letter or digit is its hash."""
    if max_len < _HASH_LEN:
        raise ValueError(f"slug max_len must be at least {_HASH_LEN}, got {max_len}")
    value = str(value)
    s = re.sub(r"[^a-z0-9]+", "-", value.lower()).strip("-")
    if not s:
        return _digest(value)
    if len(s) <= max_len:
        return s
    room = max_len - _HASH_LEN - 1  # what is left of the slug before "-<hash>"
    head = s[:room].rstrip("-") if room > 0 else ""
    return f"{head}-{_digest(value)}" if head else _digest(value)


def run_alias(run_id: str) -> str:
    """Model Registry version alias of a run: ``run-<slug>``, at most 128 characters, valid for Vertex."""
    return RUN_ALIAS_PREFIX + slug(run_id, VERTEX_DISPLAY_NAME_MAX - len(RUN_ALIAS_PREFIX))


def run_label(run_id: str) -> str:
    """Label value identifying a run (e.g. ``labels={"run": ...}`` on a CustomJob): at most 63 characters."""
    return slug(run_id, 63)


def display_name(prefix: str, run_id: str, max_len: int = VERTEX_DISPLAY_NAME_MAX) -> str:
    """``<prefix><slug of run_id>`` cut to ``max_len`` characters (Vertex AI display names: 128).

    ``prefix`` is kept whole; it must leave room for at least 8 characters of the run part."""
    room = max_len - len(prefix)
    if room < _HASH_LEN:
        raise ValueError(f"display name prefix {prefix!r} leaves {room} of {max_len} characters for the run id; "
                         f"shorten it to at most {max_len - _HASH_LEN} characters")
    return prefix + slug(run_id, room)


# ---- configured names: ValueError naming the rule (config.py adds the key)


def check_vertex_display_name(name: str, reserve: int = 0) -> str:
    """A configured Vertex AI display name; ``reserve`` characters are kept free for a suffix we add."""
    limit = VERTEX_DISPLAY_NAME_MAX - reserve
    if not name or not name.strip() or len(name) > limit:
        extra = f" ({reserve} are kept for the suffix added to it)" if reserve else ""
        raise ValueError(f"{name!r} must be 1-{limit} characters{extra}: Vertex AI display names are at most "
                         f"{VERTEX_DISPLAY_NAME_MAX}")
    return name


def check_firebase_ml_display_name(name: str) -> str:
    if not FIREBASE_ML_DISPLAY_NAME_PATTERN.match(name or ""):
        raise ValueError(f"{name!r} is not a valid Firebase ML model name: 1-32 characters from letters, digits "
                         f"and '_', starting with a letter (e.g. {suggest_firebase_ml_name(name)!r})")
    return name


def check_firebase_tags(tags: list[str]) -> list[str]:
    bad = [t for t in tags if not FIREBASE_TAG_PATTERN.match(t or "")]
    if bad:
        raise ValueError(f"tags {bad} are invalid: each 1-32 characters from letters, digits, '_' and '-' "
                         "(Firebase ML's rule)")
    return tags


def suggest_firebase_ml_name(name: str) -> str:
    """A valid Firebase ML name close to ``name``, for error messages."""
    s = re.sub(r"[^A-Za-z0-9_]+", "_", str(name or "")).strip("_") or "model"
    if not s[0].isalpha():
        s = "m_" + s
    return s[:32].rstrip("_") or "model"

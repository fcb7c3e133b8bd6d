"""Read-modify-write of one JSON object in GCS that several runs update (the training ledger,
the champion records), safe against concurrent writers.

Each write carries a generation precondition (``ifGenerationMatch``: the generation that was
read, 0 when the object did not exist); a concurrent write in between makes GCS answer 412,
and the update is re-read and re-applied, with a jittered backoff. ``mutate`` must therefore be
a pure function of what was read, and idempotent (a retried upload whose first try did land
re-applies the same change to its own result).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

from dual_deploy.hooks.gcs_io import GcsIO

DEFAULT_ATTEMPTS = 16


class ConcurrentUpdateError(RuntimeError):
    """Other writers kept winning: the object was not updated."""


def update_json(io: GcsIO, uri: str, mutate: Callable[[Any | None], Any], attempts: int = DEFAULT_ATTEMPTS,
                base_delay_s: float = 0.05, max_delay_s: float = 2.0) -> Any:
    """Apply ``mutate(current or None) -> new`` to the JSON object at ``uri``; returns ``new``."""
    from google.api_core.exceptions import PreconditionFailed

    for attempt in range(attempts):
        current, generation = io.read_json_with_generation(uri)
        new = mutate(current)
        try:
            io.write_json_if_generation(uri, new, generation)
            return new
        except PreconditionFailed:
            # Someone else wrote in between: back off (full jitter) and re-apply on their result.
            time.sleep(random.uniform(0, min(max_delay_s, base_delay_s * 2**attempt)))
    raise ConcurrentUpdateError(f"could not update {uri}: {attempts} concurrent writes won in a row")

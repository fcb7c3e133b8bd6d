"""The deferrable wait on a Vertex AI custom job, as the triggerer runs it.

``CustomJobRunTrigger`` is the provider's ``CustomJobTrigger`` with three changes a paying user
needs:

- its event says *why* it ended: ``job_failed`` (the job reached FAILED / CANCELLED / EXPIRED:
  deterministic, never resubmitted) or a polling error (transient: the task retries and re-attaches
  to the same job);
- GetCustomJob polls retry transient errors (UNAVAILABLE, DEADLINE_EXCEEDED, ...) with backoff
  before giving up (the provider's async hook has no default retry);
- ``on_kill``: clearing or marking the deferred task failed/succeeded cancels the job, so no GPU
  keeps running for a task nobody waits for (Airflow 3 calls it only on such user actions, not on a
  triggerer restart).

Importing this module imports ``dual_deploy`` (and so installs ``VERTEX_AI_EMULATOR_HOST`` in the
triggerer when it is set).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from airflow.providers.google.cloud.triggers.vertex_ai import CustomJobTrigger
from airflow.triggers.base import TriggerEvent
from google.api_core import exceptions as gexc
from google.api_core.retry_async import AsyncRetry
from google.cloud.aiplatform_v1 import types

import dual_deploy  # noqa: F401 - installs the emulator switch in the triggerer process

TRANSIENT = (gexc.ServiceUnavailable, gexc.DeadlineExceeded, gexc.InternalServerError, gexc.TooManyRequests,
             gexc.BadGateway, gexc.GatewayTimeout, gexc.Aborted)



class CustomJobRunTrigger(CustomJobTrigger):
    """``poll_retry_timeout_s``: how long one poll retries transient errors (default 2 minutes: a
    blip is absorbed here; a longer outage fails the poll, and the task's own retries re-attach)."""

    def __init__(self, *args, poll_retry_timeout_s: float = 120.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.poll_retry_timeout_s = poll_retry_timeout_s

    def serialize(self) -> tuple[str, dict[str, Any]]:
        _, kwargs = super().serialize()
        kwargs["poll_retry_timeout_s"] = self.poll_retry_timeout_s
        return f"{type(self).__module__}.{type(self).__qualname__}", kwargs

    async def run(self) -> AsyncIterator[TriggerEvent]:
        base = {"custom_job_id": self.custom_job_id}
        try:
            job = await self.async_hook.wait_for_custom_job(
                project_id=self.project_id, location=self.location, job_id=self.custom_job_id,
                poll_interval=self.poll_interval,
                retry=AsyncRetry(predicate=lambda e: isinstance(e, TRANSIENT), initial=1.0, maximum=30.0,
                                 multiplier=2.0, timeout=self.poll_retry_timeout_s),
            )
        except RuntimeError as e:  # the provider raises RuntimeError for FAILED / CANCELLED / EXPIRED / ...
            yield TriggerEvent({**base, "status": "error", "job_failed": True, "message": str(e)})
            return
        except Exception as e:  # polling failed (AirflowException wrapping the API error)
            yield TriggerEvent({**base, "status": "error", "job_failed": False,
                                "message": f"polling custom job {self.custom_job_id} failed: {e}"})
            return
        yield TriggerEvent({**base, "status": "success", "job_failed": False,
                            "message": f"Custom Job {job.name} completed with status {job.state.name}",
                            "custom_job": types.CustomJob.to_dict(job)})

    async def on_kill(self) -> None:
        client = await self.async_hook.get_job_service_client(region=self.location)
        name = client.custom_job_path(self.project_id, self.location, self.custom_job_id)
        try:
            await client.cancel_custom_job(request={"name": name}, timeout=30)
            self.log.info("cancelled custom job %s (the deferred task was cleared or marked)", name)
        except gexc.FailedPrecondition:
            self.log.info("custom job %s had already finished; nothing to cancel", name)

"""Carry a failed task's error message to the run summary.

Tasks run through the Task SDK and have no database access, so the summary cannot read
another task's log or exception. Instead every task gets ``record_failure`` as its
``on_failure_callback`` (``dag_helpers.DEFAULT_ARGS``): it runs in the failing task's own
process after its last try failed (``context["exception"]`` is the error) and pushes a small
record to that task's XCom under ``FAILURE_XCOM_KEY``. The task runner reports the FAILED
state only after the callback returned, so the summary (trigger rule all_done) always finds
it; a task that is cleared and re-run starts with its XComs cleared. Retried tries call
``on_retry_callback`` instead, and tasks that never ran (upstream_failed, skipped) call
nothing, so only real causes are recorded.

Light on purpose: the DAG files import this module at parse time.
"""

from __future__ import annotations

from datetime import UTC, datetime

FAILURE_XCOM_KEY = "dual_deploy_failure"
MAX_MESSAGE_CHARS = 4000


def failure_message(error: BaseException | str | None) -> str:
    """The text a user needs: the exception's message (our operators write it to name the thing
    and the fix), else its type; bounded so a huge message cannot bloat XCom."""
    if error is None:
        return "failed without an exception (killed or timed out?): see the task log"
    if isinstance(error, str):
        text = error.strip()
    else:
        text = str(error).strip() or type(error).__name__
        # An exception wrapping another with no text of its own: show the cause.
        cause = error.__cause__ or error.__context__
        if cause is not None and str(error).strip() == "" and str(cause).strip():
            text = f"{type(error).__name__}: {str(cause).strip()}"
    if len(text) > MAX_MESSAGE_CHARS:
        text = text[: MAX_MESSAGE_CHARS - 20].rstrip() + " … (truncated)"
    return text


def failure_record(task_id: str, error: BaseException | str | None, try_number: int | None = None) -> dict:
    """The ``FailureRecord`` (contracts.py) for ``task_id`` failing with ``error``."""
    return {
        "task_id": task_id,
        "message": failure_message(error),
        "exception": type(error).__name__ if isinstance(error, BaseException) else "",
        "try_number": try_number,
        "failed_at": datetime.now(UTC).isoformat(timespec="microseconds"),
    }


def record_failure(context) -> None:
    """``on_failure_callback``: push this task's error for the run summary. Never raises (a
    callback error would only be logged by Airflow, hiding nothing but adding noise)."""
    ti = context.get("ti")
    if ti is None:
        return
    try:
        record = failure_record(ti.task_id, context.get("exception"), getattr(ti, "try_number", None))
        ti.xcom_push(key=FAILURE_XCOM_KEY, value=record)
    except Exception as e:  # noqa: BLE001 - the summary then says "no message recorded"
        log = getattr(ti, "log", None)
        if log is not None:
            log.warning("could not record the failure of %s for the run summary: %s", ti.task_id, e)

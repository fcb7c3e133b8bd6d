"""The training ledger: which data each run trained on, and how each attempt ended.

One JSON object in GCS, ``{fingerprint: LedgerEntry}`` (contracts.py): the data's URI, the
latest run and status, and every attempt ``{run_id, status, at, failure}``. Updated with
generation preconditions (``json_records.update_json``), so concurrent writers never lose
each other's entries.

What the new-data trigger does with a fingerprint (``plan``):
- an attempt succeeded: never train it again;
- an attempt is still in flight (triggered): wait for it;
- the data itself was rejected (validation failed on it): never retry the same bytes;
- otherwise retry failed data, at most ``max_attempts`` tries in all, each under its own run id
  (``newdata__<fingerprint>``, then ``newdata__<fingerprint>__a2``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from dual_deploy.contracts import LedgerAttempt, LedgerEntry, StepFailure
from dual_deploy.hooks.gcs_io import GcsIO
from dual_deploy.hooks.json_records import update_json

DEFAULT_MAX_ATTEMPTS = 3
IN_FLIGHT = ("triggered",)
# Bounded history: enough to explain a give-up, small enough to keep the ledger one small object.
MAX_ATTEMPTS_KEPT = 20


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def attempts_of(entry: LedgerEntry | None) -> list[LedgerAttempt]:
    """The entry's attempts; an entry written before attempts were tracked counts as one."""
    if not entry:
        return []
    if "attempts" in entry:
        return list(entry["attempts"])
    return [{"run_id": entry.get("run_id", ""), "status": entry.get("status", ""), "at": entry.get("updated_at", "")}]


def run_id_for(fingerprint: str, attempt: int) -> str:
    """The dual_deployment run id of a data-triggered attempt: unique per attempt."""
    return f"newdata__{fingerprint}" if attempt <= 1 else f"newdata__{fingerprint}__a{attempt}"


@dataclass(frozen=True)
class Plan:
    """What to do with a fingerprint now. ``action``: train | skip | wait."""

    action: str
    attempt: int  # the attempt to start (train), or the last one made
    max_attempts: int
    reason: str


def plan(entry: LedgerEntry | None, max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> Plan:
    """Pure: the decision for one fingerprint given its ledger entry."""
    attempts = attempts_of(entry)
    failed = [a for a in attempts if a.get("status") == "failed"]
    done = len(failed)
    for a in attempts:
        if a.get("status") == "success":
            return Plan("skip", done + 1, max_attempts, f"already success (trained by run {a.get('run_id')})")
    if attempts and attempts[-1].get("status") in IN_FLIGHT:
        return Plan("wait", done + 1, max_attempts, f"already triggered: run {attempts[-1].get('run_id')} is still in progress")
    last = failed[-1] if failed else None
    why = ""
    if last:
        f = last.get("failure") or {}
        why = f" (last: run {last.get('run_id')} failed" + (f" at {f['task_id']}: {f.get('message', '')[:300]})"
                                                               if f.get("task_id") else ")")
    if last and last.get("permanent"):
        return Plan("skip", done, max_attempts, f"gave up: the data was rejected{why}; fix it and upload it as a "
                                                "new batch")
    if done >= max_attempts:
        return Plan("skip", done, max_attempts, f"gave up after {done} failed attempt(s) of {max_attempts}{why}")
    if done:
        return Plan("train", done + 1, max_attempts, f"retrying: attempt {done + 1} of {max_attempts}{why}")
    return Plan("train", 1, max_attempts, f"new data: attempt 1 of {max_attempts}")


def result_note(entry: LedgerEntry, run_id: str, default_max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> dict:
    """For the run summary: which attempt ``run_id`` was and what happens to its data next."""
    max_attempts = int(entry.get("max_attempts") or default_max_attempts)
    attempts = attempts_of(entry)
    idx = next((i for i, a in enumerate(attempts) if a.get("run_id") == run_id), len(attempts))
    attempt = 1 + sum(1 for a in attempts[:idx] if a.get("status") == "failed")
    status = attempts[idx].get("status", "") if idx < len(attempts) else ""
    nxt = plan(entry, max_attempts)
    if status == "success":
        note = f"attempt {attempt} of {max_attempts} succeeded: the new-data trigger will not train this data again"
    elif nxt.action == "train":
        note = f"attempt {attempt} of {max_attempts} failed: the new-data trigger will retry it ({nxt.reason})"
    else:
        note = f"attempt {attempt} of {max_attempts} failed; {nxt.reason}"
    return {"status": status, "attempt": attempt, "max_attempts": max_attempts, "note": note}


def with_attempt(entry: LedgerEntry | None, attempt: LedgerAttempt, **fields) -> LedgerEntry:
    """Pure: ``entry`` with ``attempt`` recorded (replacing the one with the same run id, so
    re-recording is idempotent) and the top-level fields updated."""
    new: LedgerEntry = dict(entry or {})  # type: ignore[assignment]
    attempts = [a for a in attempts_of(entry) if a.get("run_id") != attempt["run_id"]]
    previous = next((a for a in attempts_of(entry) if a.get("run_id") == attempt["run_id"]), {})
    attempts.append({**previous, **attempt, "at": _now()})  # type: ignore[typeddict-item]
    new["attempts"] = attempts[-MAX_ATTEMPTS_KEPT:]
    new.update({k: v for k, v in fields.items() if v is not None})  # type: ignore[typeddict-item]
    new["run_id"] = attempt["run_id"]
    new["status"] = attempt["status"]
    new["updated_at"] = _now()
    return new


class TrainingLedgerHook:
    def __init__(self, ledger_uri: str, gcp_conn_id: str = "google_cloud_default"):
        self.uri = ledger_uri
        self.io = GcsIO(gcp_conn_id)

    def entries(self) -> dict[str, LedgerEntry]:
        data, _ = self.io.read_json_with_generation(self.uri)
        return data or {}

    def get(self, fingerprint: str) -> LedgerEntry | None:
        return self.entries().get(fingerprint)

    def record_attempt(self, fingerprint: str, run_id: str, status: str, *, data_uri: str | None = None,
                       failure: StepFailure | None = None, permanent: bool = False,
                       summary_uri: str | None = None, max_attempts: int | None = None) -> LedgerEntry:
        """Record how attempt ``run_id`` on ``fingerprint`` stands (read-modify-write, preconditions)."""
        attempt: LedgerAttempt = {"run_id": run_id, "status": status}
        if failure:
            attempt["failure"] = failure
        if permanent:
            attempt["permanent"] = True
        if summary_uri:
            attempt["summary_uri"] = summary_uri

        def mutate(data):
            data = dict(data or {})
            data[fingerprint] = with_attempt(data.get(fingerprint), attempt, data_uri=data_uri,
                                             summary_uri=summary_uri, max_attempts=max_attempts)
            return data

        return update_json(self.io, self.uri, mutate)[fingerprint]

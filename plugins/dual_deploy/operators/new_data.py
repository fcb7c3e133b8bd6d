"""Pick the next complete dataset batch to train: new data, or failed data still worth a retry."""

from __future__ import annotations

from collections.abc import Sequence

from airflow.sdk.exceptions import AirflowSkipException

from dual_deploy.contracts import LedgerEntry, NewDatasetResult
from dual_deploy.hooks.gcs_io import GcsIO
from dual_deploy.hooks.ledger import DEFAULT_MAX_ATTEMPTS, TrainingLedgerHook, attempts_of, plan, run_id_for
from dual_deploy.operators.base import DictOutputOperator
from dual_deploy.operators.dataset import dataset_fingerprint

# Runs the ledger says were triggered but whose result never reached it end in one of these.
_ACTIVE = ["queued", "running"]
_MAX_RUN_ID_PROBES = 50


class FindNewDatasetOperator(DictOutputOperator):
    """Find the oldest batch ``<incoming_uri>/<batch>/`` whose completion marker exists and whose
    content (fingerprint) the training ledger says to train (``hooks.ledger.plan``): never
    trained, or failed fewer than ``max_attempts`` times for a reason other than the data being
    rejected. Records the attempt as ``triggered``.

    An attempt still ``triggered`` in the ledger is checked against Airflow (the DAG run
    ``trigger_dag_id``/its run id): still queued/running: wait; never created (the trigger
    task failed): not an attempt; ended without recording its result: failed (or success).

    Skips (AirflowSkipException, so nothing downstream runs) when there is nothing to train,
    with one log line per batch saying why: upload in progress (no marker), already trained,
    run in progress, or gave up (after how many attempts, and the last failure).

    XCom (``NewDatasetResult``): ``{"data_uri", "fingerprint", "batch", "run_id", "attempt",
    "max_attempts"}``; ``run_id`` is unique per attempt: ``newdata__<fingerprint>`` for the
    first, ``newdata__<fingerprint>__a<k>`` for attempt k.
    """

    template_fields: Sequence[str] = ("incoming_uri", "ledger_uri")

    def __init__(self, *, incoming_uri: str, ledger_uri: str, marker_name: str = "_COMPLETE",
                 max_attempts: int = DEFAULT_MAX_ATTEMPTS, trigger_dag_id: str = "dual_deployment",
                 gcp_conn_id: str = "google_cloud_default", **kwargs):
        super().__init__(**kwargs)
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self.incoming_uri = incoming_uri
        self.ledger_uri = ledger_uri
        self.marker_name = marker_name
        self.max_attempts = max_attempts
        self.trigger_dag_id = trigger_dag_id
        self.gcp_conn_id = gcp_conn_id

    def execute(self, context) -> NewDatasetResult:
        ti = context.get("ti")
        io = GcsIO(self.gcp_conn_id)
        ledger = TrainingLedgerHook(self.ledger_uri, self.gcp_conn_id)
        base = self.incoming_uri.rstrip("/")
        files = io.list_files(base)
        batches = sorted({f[len(base) + 1 :].split("/", 1)[0] for f in files if "/" in f[len(base) + 1 :]})
        known = ledger.entries()
        candidates = []
        for batch in batches:
            marker = f"{base}/{batch}/{self.marker_name}"
            if marker not in files:
                self.log.info("skip %s/%s: no %s marker yet (upload in progress)", base, batch, self.marker_name)
                continue
            fp = dataset_fingerprint(io, f"{base}/{batch}")
            entry = self._reconcile(ledger, fp, known.get(fp), ti)
            decision = plan(entry, self.max_attempts)
            if decision.action != "train":
                self.log.info("skip %s/%s: same data (fingerprint %s) %s", base, batch, fp, decision.reason)
                continue
            candidates.append((self._updated(io, marker), batch, fp, decision))
        if not candidates:
            raise AirflowSkipException(f"no complete dataset to train under {base}")
        _, batch, fp, decision = min(candidates, key=lambda c: (c[0], c[1]))
        data_uri = f"{base}/{batch}"
        attempt, run_id = self._free_run_id(ti, fp, decision.attempt)
        ledger.record_attempt(fp, run_id, "triggered", data_uri=data_uri, max_attempts=self.max_attempts)
        self.log.info("dataset %s (fingerprint %s): %s; triggering %s run %s", data_uri, fp, decision.reason,
                      self.trigger_dag_id, run_id)
        return {"data_uri": data_uri, "fingerprint": fp, "batch": batch, "run_id": run_id, "attempt": attempt,
                "max_attempts": self.max_attempts}

    def _reconcile(self, ledger: TrainingLedgerHook, fp: str, entry: LedgerEntry | None, ti) -> LedgerEntry | None:
        """Settle an attempt the ledger still calls ``triggered`` from the DAG run's real state."""
        attempts = attempts_of(entry)
        if not attempts or attempts[-1].get("status") != "triggered" or not hasattr(ti, "get_dr_count"):
            return entry
        run_id = attempts[-1]["run_id"]

        def count(states=None) -> int:
            return ti.get_dr_count(dag_id=self.trigger_dag_id, run_ids=[run_id], states=states)

        if count() == 0:
            self.log.info("run %s was recorded as triggered but never created: not counted as an attempt", run_id)
            return ledger.record_attempt(fp, run_id, "not_started")
        if count(_ACTIVE):
            return entry
        if count(["success"]):
            return ledger.record_attempt(fp, run_id, "success")
        self.log.warning("run %s ended without recording its result in the ledger: counting it as failed", run_id)
        return ledger.record_attempt(fp, run_id, "failed", failure={
            "task_id": "", "message": f"{self.trigger_dag_id} run {run_id} ended without recording its result"})

    def _free_run_id(self, ti, fp: str, attempt: int) -> tuple[int, str]:
        """The attempt's run id, moved past ids Airflow already has (a ledger lost or reset), since
        the trigger would silently skip an existing run (skip_when_already_exists)."""
        for _ in range(_MAX_RUN_ID_PROBES):
            run_id = run_id_for(fp, attempt)
            if not hasattr(ti, "get_dr_count") or ti.get_dr_count(dag_id=self.trigger_dag_id, run_ids=[run_id]) == 0:
                return attempt, run_id
            self.log.warning("run %s already exists but the ledger does not know it: using the next attempt", run_id)
            attempt += 1
        raise RuntimeError(f"no free run id for fingerprint {fp} after {_MAX_RUN_ID_PROBES} attempts")

    @staticmethod
    def _updated(io: GcsIO, uri: str):
        bucket, name = io.parse(uri)
        return io.hook.get_blob_update_time(bucket, name)

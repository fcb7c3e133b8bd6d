"""Pick the next complete, never-trained dataset batch from the incoming prefix."""

from __future__ import annotations

from collections.abc import Sequence

from airflow.sdk.exceptions import AirflowSkipException

from dual_deploy.hooks.gcs_io import GcsIO
from dual_deploy.hooks.ledger import TrainingLedgerHook
from dual_deploy.operators.base import DictOutputOperator
from dual_deploy.operators.dataset import dataset_fingerprint


class FindNewDatasetOperator(DictOutputOperator):
    """Find the oldest batch ``<incoming_uri>/<batch>/`` whose completion marker exists and whose
    content (fingerprint) is not in the training ledger; record it as ``triggered``.

    Skips (AirflowSkipException, so nothing downstream runs) when there is nothing new, with
    one log line per batch saying why: upload still in progress (no marker) or already trained.

    XCom: ``{"data_uri", "fingerprint", "batch", "run_id"}`` where ``run_id`` is the
    deterministic run id to give dual_deployment (``newdata__<fingerprint>``).
    """

    template_fields: Sequence[str] = ("incoming_uri", "ledger_uri")

    def __init__(self, *, incoming_uri: str, ledger_uri: str, marker_name: str = "_COMPLETE",
                 gcp_conn_id: str = "google_cloud_default", **kwargs):
        super().__init__(**kwargs)
        self.incoming_uri = incoming_uri
        self.ledger_uri = ledger_uri
        self.marker_name = marker_name
        self.gcp_conn_id = gcp_conn_id

    def execute(self, context) -> dict:
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
            if fp in known:
                e = known[fp]
                self.log.info("skip %s/%s: same data (fingerprint %s) already %s by run %s", base, batch, fp,
                              e.get("status"), e.get("run_id"))
                continue
            candidates.append((self._updated(io, marker), batch, fp))
        if not candidates:
            raise AirflowSkipException(f"no new complete dataset under {base}: nothing to train")
        _, batch, fp = min(candidates)
        data_uri = f"{base}/{batch}"
        run_id = f"newdata__{fp}"
        ledger.record(fp, data_uri=data_uri, run_id=run_id, status="triggered")
        self.log.info("new dataset %s (fingerprint %s): triggering dual_deployment run %s", data_uri, fp, run_id)
        return {"data_uri": data_uri, "fingerprint": fp, "batch": batch, "run_id": run_id}

    @staticmethod
    def _updated(io: GcsIO, uri: str):
        bucket, name = io.parse(uri)
        return io.hook.get_blob_update_time(bucket, name)

"""The training ledger: which data each run trained on, so the same data is never trained twice.

One JSON object in GCS, ``{fingerprint: {data_uri, run_id, status, updated_at}}``, updated with
a generation precondition so concurrent writers cannot lose each other's entries.
"""

from __future__ import annotations

from datetime import UTC, datetime

from dual_deploy.hooks.gcs_io import GcsIO


class TrainingLedgerHook:
    def __init__(self, ledger_uri: str, gcp_conn_id: str = "google_cloud_default"):
        self.uri = ledger_uri
        self.io = GcsIO(gcp_conn_id)

    def entries(self) -> dict[str, dict]:
        data, _ = self.io.read_json_with_generation(self.uri)
        return data or {}

    def get(self, fingerprint: str) -> dict | None:
        return self.entries().get(fingerprint)

    def record(self, fingerprint: str, attempts: int = 5, **fields) -> dict:
        from google.api_core.exceptions import PreconditionFailed

        for _ in range(attempts):
            data, generation = self.io.read_json_with_generation(self.uri)
            data = data or {}
            entry = {**data.get(fingerprint, {}), **fields, "updated_at": datetime.now(UTC).isoformat(timespec="seconds")}
            data[fingerprint] = entry
            try:
                self.io.write_json_if_generation(self.uri, data, generation)
                return entry
            except PreconditionFailed:
                continue  # someone else wrote in between: re-read and retry
        raise RuntimeError(f"could not update the training ledger {self.uri} after {attempts} attempts")

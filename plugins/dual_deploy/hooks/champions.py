"""Champion records: ``<champions prefix>/<target>.json`` says which model a target's channel
serves now (written by the run summary when a delivery succeeded; read by the next run's
champion gate and by the summary's channel check).

Written read-modify-write with generation preconditions (``json_records.update_json``): the
record keeps the champions it replaces (``previous``, newest first, bounded), so concurrent
writers lose nothing and retention can tell which old artifacts a record still points to.
"""

from __future__ import annotations

from dual_deploy.contracts import ChampionRecord
from dual_deploy.hooks.gcs_io import GcsIO
from dual_deploy.hooks.json_records import update_json

MAX_PREVIOUS = 20
_PREVIOUS_KEYS = ("model_dir", "run_id", "labels", "written_at")


def with_champion(current: ChampionRecord | None, record: ChampionRecord) -> ChampionRecord:
    """Pure: ``record`` as the new champion, ``current`` (if another run's) pushed onto ``previous``.

    Re-recording the same run (a retried summary) replaces it in place instead of listing it twice."""
    current = current or {}
    previous = [p for p in current.get("previous", []) if p.get("run_id") != record.get("run_id")]
    if current.get("model_dir") and current.get("run_id") != record.get("run_id"):
        previous.insert(0, {k: current.get(k) for k in _PREVIOUS_KEYS})
    return {**record, "previous": previous[:MAX_PREVIOUS]}  # type: ignore[typeddict-item]


class ChampionRecords:
    def __init__(self, prefix: str, gcp_conn_id: str = "google_cloud_default"):
        self.prefix = prefix.rstrip("/")
        self.io = GcsIO(gcp_conn_id)

    def uri(self, target: str) -> str:
        return f"{self.prefix}/{target}.json"

    def read(self, target: str) -> ChampionRecord | None:
        record, _ = self.io.read_json_with_generation(self.uri(target))
        return record  # type: ignore[return-value]

    def record(self, target: str, record: ChampionRecord) -> ChampionRecord:
        return update_json(self.io, self.uri(target), lambda current: with_champion(current, record))

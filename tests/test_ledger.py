"""The training ledger and the new-data trigger's retry rules (issue 15 items 7 and 8).

- ``plan``: only a success blocks retraining; failed data is retried up to max_attempts, each
  attempt under its own run id; data rejected by validation is never retried.
- ``FindNewDatasetOperator`` against the GCS emulator, with Airflow's DAG-run table stood in for
  by ``_Runs`` (the one Task SDK query the operator makes, ``get_dr_count``).
- Ledger and champion records under concurrent writers (threads), with GCS's generation
  preconditions (``gcs_generation_match``; the emulator ignores ifGenerationMatch).
"""

from __future__ import annotations

import io
import json
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from airflow.sdk.exceptions import AirflowSkipException
from google.api_core.exceptions import PreconditionFailed
from google.cloud import storage
from PIL import Image

from dual_deploy.hooks.champions import ChampionRecords, with_champion
from dual_deploy.hooks.gcs_io import GcsIO
from dual_deploy.hooks.ledger import TrainingLedgerHook, plan, result_note, run_id_for
from dual_deploy.operators.dataset import dataset_fingerprint
from dual_deploy.operators.new_data import FindNewDatasetOperator

ANON_CONN = json.dumps({"conn_type": "google_cloud_platform", "extra": {"is_anonymous": True, "project": "local-project"}})


def _failed(run_id, task="cluster.train", permanent=False):
    a = {"run_id": run_id, "status": "failed", "failure": {"task_id": task, "message": "UNAVAILABLE"}}
    return {**a, "permanent": True} if permanent else a


# ------------------------------------------------------------------ plan(): pure


def test_new_data_is_attempt_one_under_the_historic_run_id():
    p = plan(None, 3)
    assert (p.action, p.attempt) == ("train", 1)
    assert run_id_for("abc", 1) == "newdata__abc" and run_id_for("abc", 2) == "newdata__abc__a2"


def test_failed_data_is_retried_with_a_new_run_id_per_attempt():
    entry = {"attempts": [_failed("newdata__fp")]}
    p = plan(entry, 3)
    assert (p.action, p.attempt) == ("train", 2) and "attempt 2 of 3" in p.reason and "UNAVAILABLE" in p.reason
    entry["attempts"].append(_failed("newdata__fp__a2"))
    assert plan(entry, 3).attempt == 3 and run_id_for("fp", 3) not in {a["run_id"] for a in entry["attempts"]}


def test_gives_up_after_max_attempts_and_says_so():
    entry = {"attempts": [_failed("a"), _failed("b"), _failed("c")]}
    p = plan(entry, 3)
    assert p.action == "skip" and p.reason.startswith("gave up after 3 failed attempt(s) of 3")


def test_legacy_entry_that_failed_is_retried():
    # Ledgers written before attempts were tracked: one entry, status failed. It used to block forever.
    p = plan({"data_uri": "gs://b/x", "run_id": "newdata__fp", "status": "failed"}, 3)
    assert (p.action, p.attempt) == ("train", 2)


def test_success_blocks_and_in_flight_waits_and_rejected_data_is_not_retried():
    assert plan({"attempts": [_failed("a"), {"run_id": "b", "status": "success"}]}, 3).action == "skip"
    assert plan({"attempts": [{"run_id": "a", "status": "triggered"}]}, 3).action == "wait"
    p = plan({"attempts": [_failed("a", task="validate_dataset", permanent=True)]}, 3)
    assert p.action == "skip" and "rejected" in p.reason and "new batch" in p.reason
    # A trigger that never created its run is not an attempt: the same attempt (and run id) again.
    p = plan({"attempts": [{"run_id": "newdata__fp", "status": "not_started"}]}, 3)
    assert (p.action, p.attempt) == ("train", 1)


def test_result_note_says_attempt_k_of_n():
    entry = {"max_attempts": 3, "attempts": [_failed("r1")]}
    assert result_note(entry, "r1")["note"].startswith("attempt 1 of 3 failed: the new-data trigger will retry")
    entry["attempts"] += [_failed("r2"), _failed("r3")]
    note = result_note(entry, "r3")
    assert note["attempt"] == 3 and "gave up after 3" in note["note"]
    entry = {"attempts": [_failed("r1"), {"run_id": "r2", "status": "success"}]}
    assert result_note(entry, "r2", 5)["note"].startswith("attempt 2 of 5 succeeded")


# ------------------------------------------------------------------ on the GCS emulator


@pytest.fixture
def gcs(gcs_emulator, monkeypatch) -> GcsIO:
    monkeypatch.setenv("AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT", ANON_CONN)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator)
    return GcsIO()


@pytest.fixture
def bucket(gcs) -> str:
    name = f"ledger-{uuid.uuid4().hex[:10]}"
    gcs.hook.get_conn().create_bucket(name)
    return name


class _Runs:
    """Airflow's DAG runs as the Task SDK reports them: ``get_dr_count(dag_id, run_ids, states)``."""

    def __init__(self, runs: dict[str, str] | None = None):
        self.runs = dict(runs or {})

    def get_dr_count(self, dag_id, logical_dates=None, run_ids=None, states=None):
        assert dag_id == "dual_deployment"
        return sum(1 for r, s in self.runs.items() if (run_ids is None or r in run_ids)
                   and (states is None or s in states))


def _batch(gcs: GcsIO, bucket: str, name: str = "batch-1", marker: bool = True) -> tuple[str, str]:
    base = f"gs://{bucket}/incoming/{name}"
    for cls, color in (("red", (250, 0, 0)), ("blue", (0, 0, 250))):
        buf = io.BytesIO()
        Image.new("RGB", (4, 4), color).save(buf, format="PNG")
        gcs.write_bytes(f"{base}/{cls}/0.png", buf.getvalue())
    if marker:
        gcs.write_bytes(f"{base}/_COMPLETE", b"")
    return base, dataset_fingerprint(gcs, base)


def _find(bucket: str, runs: _Runs, max_attempts: int = 3) -> dict:
    op = FindNewDatasetOperator(task_id="find_new_dataset", incoming_uri=f"gs://{bucket}/incoming",
                                ledger_uri=f"gs://{bucket}/ledger.json", max_attempts=max_attempts)
    return op.execute({"ti": runs})


def test_a_failed_batch_is_retried_under_a_new_run_id(gcs, bucket, capsys):
    data_uri, fp = _batch(gcs, bucket)
    ledger = TrainingLedgerHook(f"gs://{bucket}/ledger.json")
    runs = _Runs()
    first = _find(bucket, runs)
    assert (first["run_id"], first["attempt"], first["max_attempts"]) == (f"newdata__{fp}", 1, 3)
    assert ledger.get(fp)["status"] == "triggered"
    # The run fails for a transient reason; its summary records that.
    runs.runs[first["run_id"]] = "failed"
    ledger.record_attempt(fp, first["run_id"], "failed", failure={"task_id": "cloud.train", "message": "UNAVAILABLE"})
    capsys.readouterr()
    second = _find(bucket, runs)
    assert (second["run_id"], second["attempt"]) == (f"newdata__{fp}__a2", 2)
    assert second["data_uri"] == data_uri
    assert "attempt 2 of 3" in capsys.readouterr().out
    entry = ledger.get(fp)
    assert [(a["run_id"], a["status"]) for a in entry["attempts"]] == [(first["run_id"], "failed"),
                                                                       (second["run_id"], "triggered")]


def test_gives_up_after_max_attempts(gcs, bucket, capsys):
    _, fp = _batch(gcs, bucket)
    ledger = TrainingLedgerHook(f"gs://{bucket}/ledger.json")
    runs = _Runs()
    for k in (1, 2):
        out = _find(bucket, runs, max_attempts=2)
        assert out["attempt"] == k
        runs.runs[out["run_id"]] = "failed"
        ledger.record_attempt(fp, out["run_id"], "failed", failure={"task_id": "mobile.publish", "message": "503"})
    capsys.readouterr()
    with pytest.raises(AirflowSkipException):
        _find(bucket, runs, max_attempts=2)
    out = capsys.readouterr().out
    assert "gave up after 2 failed attempt(s) of 2" in out and "mobile.publish: 503" in out


def test_a_success_is_never_retrained(gcs, bucket, capsys):
    _, fp = _batch(gcs, bucket)
    runs = _Runs()
    out = _find(bucket, runs)
    runs.runs[out["run_id"]] = "success"
    TrainingLedgerHook(f"gs://{bucket}/ledger.json").record_attempt(fp, out["run_id"], "success")
    capsys.readouterr()
    with pytest.raises(AirflowSkipException):
        _find(bucket, runs)
    assert f"same data (fingerprint {fp}) already success (trained by run {out['run_id']})" in capsys.readouterr().out


def test_in_flight_attempts_are_settled_from_the_dag_run(gcs, bucket, capsys):
    _, fp = _batch(gcs, bucket)
    ledger = TrainingLedgerHook(f"gs://{bucket}/ledger.json")
    runs = _Runs()
    out = _find(bucket, runs)
    # The trigger task failed: the run was never created. Not an attempt: same run id again.
    assert _find(bucket, runs)["run_id"] == out["run_id"]
    # Now it exists and runs: wait for it.
    runs.runs[out["run_id"]] = "running"
    with pytest.raises(AirflowSkipException):
        _find(bucket, runs)
    # It ended failed without its summary recording anything (killed): counted as a failed attempt.
    runs.runs[out["run_id"]] = "failed"
    capsys.readouterr()
    assert _find(bucket, runs)["attempt"] == 2
    assert ledger.get(fp)["attempts"][0]["status"] == "failed"
    assert "ended without recording its result" in capsys.readouterr().out


def test_an_existing_run_id_the_ledger_does_not_know_is_not_reused(gcs, bucket):
    _, fp = _batch(gcs, bucket)
    out = _find(bucket, _Runs({f"newdata__{fp}": "success"}))  # e.g. the ledger object was deleted
    assert out["run_id"] == f"newdata__{fp}__a2"


def test_batches_without_marker_are_ignored(gcs, bucket):
    _batch(gcs, bucket, marker=False)
    with pytest.raises(AirflowSkipException):
        _find(bucket, _Runs())


# ------------------------------------------------------------------ GCS preconditions
# gcp-storage-emulator ignores ifGenerationMatch. This fixture gives uploads through
# google-cloud-storage (and so GCSHook / GcsIO) GCS's semantics: an upload with
# if_generation_match=G succeeds only if the object is at generation G (0: absent), else
# PreconditionFailed (412). Check and write happen under one lock, as GCS applies them atomically,
# so it holds for concurrent writers in threads. Returns a dict: "failed" counts the 412s answered.


@pytest.fixture
def gcs_generation_match(monkeypatch):
    lock = threading.Lock()
    state = {"failed": 0}

    def guarded(real):
        def upload(self, data, *args, **kwargs):
            expected = kwargs.get("if_generation_match")
            with lock:
                if expected is not None:
                    current = self.bucket.get_blob(self.name)
                    actual = 0 if current is None else int(current.generation)
                    if actual != int(expected):
                        state["failed"] += 1
                        raise PreconditionFailed(
                            f"ifGenerationMatch={expected}, but gs://{self.bucket.name}/{self.name} is at {actual}"
                        )
                return real(self, data, *args, **kwargs)

        return upload

    monkeypatch.setattr(storage.Blob, "upload_from_string", guarded(storage.Blob.upload_from_string))
    monkeypatch.setattr(storage.Blob, "upload_from_filename", guarded(storage.Blob.upload_from_filename))
    return state


# ------------------------------------------------------------------ concurrent writers


def test_eight_concurrent_ledger_writers_keep_eight_updates(gcs, bucket, gcs_generation_match):
    uri = f"gs://{bucket}/ledger.json"

    def write(k: int) -> None:
        hook = TrainingLedgerHook(uri)  # one client per writer, as separate workers would have
        hook.record_attempt(f"fp{k % 2}", f"run-{k}", "failed", data_uri=f"gs://{bucket}/d{k % 2}")

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(write, range(8)))
    entries = TrainingLedgerHook(uri).entries()
    kept = sorted(a["run_id"] for e in entries.values() for a in e["attempts"])
    assert kept == [f"run-{k}" for k in range(8)]
    assert gcs_generation_match["failed"] > 0  # writers did collide, and re-applied their update


def test_eight_concurrent_champion_writers_keep_eight_records(gcs, bucket, gcs_generation_match):
    prefix = f"gs://{bucket}/champions"

    def write(k: int) -> None:
        ChampionRecords(prefix).record("cloud", {"model_dir": f"gs://{bucket}/runs/r{k}/cloud/model",
                                                 "run_id": f"r{k}", "labels": ["a", "b"]})

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(write, range(8)))
    record = ChampionRecords(prefix).read("cloud")
    assert sorted([record["run_id"]] + [p["run_id"] for p in record["previous"]]) == [f"r{k}" for k in range(8)]
    assert gcs_generation_match["failed"] > 0


def test_re_recording_the_same_champion_is_idempotent():
    first = with_champion(None, {"model_dir": "m1", "run_id": "r1"})
    second = with_champion(first, {"model_dir": "m2", "run_id": "r2"})
    again = with_champion(second, {"model_dir": "m2", "run_id": "r2"})
    assert again == second and [p["run_id"] for p in again["previous"]] == ["r1"]

"""Retention of old run artifacts (issue 15.9): the rule, and pruning a real bucket (GCS emulator)."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
import yaml

from dual_deploy.hooks.gcs_io import GcsIO
from dual_deploy.retention import RunFolder, main, plan, protected_from_records, prune, run_folders

ROOT = Path(__file__).resolve().parents[1]
ANON_CONN = json.dumps({"conn_type": "google_cloud_platform", "extra": {"is_anonymous": True, "project": "local-project"}})
NOW = 1_800_000_000.0


def _runs(*names_and_ages: tuple[str, float]) -> list[RunFolder]:
    return [RunFolder(n, f"gs://b/runs/{n}/", NOW - age) for n, age in names_and_ages]


# ------------------------------------------------------------------ the rule (pure)


def test_plan_keeps_the_newest_the_young_and_the_referenced():
    runs = _runs(("r6", 60), ("r5", 7200), ("r4", 8 * 3600), ("r3", 9 * 3600), ("r2", 10 * 3600), ("r1", 11 * 3600))
    protected = ["gs://b/runs/r2/cloud/model", "gs://b/runs/r3/mobile/model/", "gs://elsewhere/x"]
    delete, kept = plan(runs, protected, keep=1, min_age_s=6 * 3600, now=NOW)
    assert [r.name for r in delete] == ["r4", "r1"]
    assert kept["r6"] == "one of the 1 newest"
    assert kept["r5"].startswith("written 120 min ago")
    assert kept["r2"] == "still referenced: gs://b/runs/r2/cloud/model"
    assert kept["r3"] == "still referenced: gs://b/runs/r3/mobile/model/"


def test_plan_protects_a_prefix_that_contains_runs_and_never_matches_by_name_prefix():
    runs = _runs(("r1", 10 * 3600), ("r10", 10 * 3600))
    delete, kept = plan(runs, ["gs://b/runs/r1"], keep=0, min_age_s=0, now=NOW)  # r1, not r10
    assert [r.name for r in delete] == ["r10"] and "r1" in kept
    delete, _ = plan(runs, ["gs://b/"], keep=0, min_age_s=0, now=NOW)  # the whole bucket is protected
    assert delete == []
    with pytest.raises(ValueError):
        plan(runs, [], keep=-1)


# ------------------------------------------------------------------ on a real bucket


@pytest.fixture
def gcs(gcs_emulator, monkeypatch) -> GcsIO:
    monkeypatch.setenv("AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT", ANON_CONN)
    return GcsIO()


@pytest.fixture
def artifacts(gcs) -> dict:
    """Five runs r1..r5 (oldest first) with models; records pointing at r1 (previous champion), r2
    (champion) and r3 (published mobile model)."""
    bucket = f"retain-{uuid.uuid4().hex[:10]}"
    gcs.hook.get_conn().create_bucket(bucket)
    root = f"gs://{bucket}/runs"
    for i in range(1, 6):
        for name in ("split.json", "cloud/model/saved_model.pb", "mobile/tflite/model.tflite", "report/index.html"):
            gcs.write_bytes(f"{root}/r{i}/{name}", b"x" * 1000)
        time.sleep(0.02)  # distinct update times: r5 is the newest
    gcs.write_json(f"gs://{bucket}/champions/cloud.json", {
        "model_dir": f"{root}/r2/cloud/model", "run_id": "r2",
        "previous": [{"model_dir": f"{root}/r1/cloud/model", "run_id": "r1"},
                     {"model_dir": f"{root}/r0/cloud/model", "run_id": "r0"}]})
    gcs.write_json(f"gs://{bucket}/mobile-models/flowers/model.json",
                   {"version": 3, "metadata": {"model_dir": f"{root}/r3/mobile/model"}})
    gcs.write_json(f"gs://{bucket}/mobile-models/flowers/latest.json", {"version": 3})
    return {"bucket": bucket, "root": root}


def _remaining(gcs: GcsIO, root: str) -> set[str]:
    return {o["uri"][len(root) + 1 :].split("/")[0] for o in gcs.list_objects(root)}


def test_records_protect_what_serves_and_the_last_rollback_target(gcs, artifacts):
    bucket, root = artifacts["bucket"], artifacts["root"]
    protected = protected_from_records(gcs, f"gs://{bucket}/champions", f"gs://{bucket}/mobile-models")
    assert protected == [f"{root}/r1/cloud/model", f"{root}/r2/cloud/model", f"{root}/r3/mobile/model"]
    assert [r.name for r in run_folders(gcs, root)] == ["r5", "r4", "r3", "r2", "r1"]


def test_prune_deletes_only_unreferenced_old_runs(gcs, artifacts):
    bucket, root = artifacts["bucket"], artifacts["root"]
    protected = protected_from_records(gcs, f"gs://{bucket}/champions", f"gs://{bucket}/mobile-models")

    dry = prune(gcs, root, protected, keep=1, min_age_s=0, dry_run=True)
    assert list(dry["deleted"]) == ["r4"] and _remaining(gcs, root) == {"r1", "r2", "r3", "r4", "r5"}

    out = prune(gcs, root, protected, keep=1, min_age_s=0)
    assert out["deleted"] == {"r4": 4000} and out["freed_bytes"] == 4000
    assert _remaining(gcs, root) == {"r1", "r2", "r3", "r5"}
    # Records and other folders are untouched.
    assert gcs.exists(f"gs://{bucket}/champions/cloud.json")
    assert gcs.exists(f"gs://{bucket}/mobile-models/flowers/model.json")
    # Idempotent: nothing more to delete.
    assert prune(gcs, root, protected, keep=1, min_age_s=0)["deleted"] == {}


def test_fresh_runs_survive_the_default_minimum_age(gcs, artifacts):
    out = prune(gcs, artifacts["root"], [], keep=0)
    assert out["deleted"] == {} and len(out["kept"]) == 5


def test_cli_prunes_with_the_configured_roots(gcs, artifacts, tmp_path, monkeypatch, capsys):
    bucket, root = artifacts["bucket"], artifacts["root"]
    cfg = yaml.safe_load((ROOT / "dags" / "config" / "dual_deploy.yaml").read_text())
    cfg["platforms"]["local"]["artifacts_uri"] = root
    cfg["platforms"]["local"].setdefault("local", {})["bucket"] = bucket
    path = tmp_path / "dual_deploy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    monkeypatch.setenv("DUAL_DEPLOY_CONFIG", str(path))
    monkeypatch.setenv("DUAL_DEPLOY_PLATFORM", "local")

    main(["--keep", "1", "--min-age-hours", "0", "--protect", f"{root}/r4/"])
    out = capsys.readouterr().out
    assert "deleted 0 run folder(s)" in out and "kept r4: still referenced" in out

    main(["--keep", "0", "--min-age-hours", "0", "--keep-previous-champions", "0"])
    out = capsys.readouterr().out
    assert f"deleted {root}/r1/" in out and f"deleted {root}/r4/" in out and f"deleted {root}/r5/" in out
    assert _remaining(gcs, root) == {"r2", "r3"}


def test_a_missing_bucket_has_nothing_to_prune(gcs):
    missing = f"gs://no-such-bucket-{uuid.uuid4().hex[:8]}"
    assert protected_from_records(gcs, f"{missing}/champions", f"{missing}/mobile-models") == []
    assert prune(gcs, f"{missing}/runs", [], keep=0, min_age_s=0) == {
        "deleted": {}, "kept": {}, "freed_bytes": 0, "dry_run": False}

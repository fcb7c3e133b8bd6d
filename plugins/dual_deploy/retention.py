"""Retention of old run artifacts: ``<artifacts_uri>/<run>/`` folders are deleted, newest kept.

``python -m dual_deploy.retention --keep N [--dry-run] [--min-age-hours H] [--protect URI ...]``
(``make prune KEEP=N`` locally). Every run leaves its model(s), TFLite files, split and report
(~250 MB locally); nothing else ever removes them.

A run folder is never deleted when it is among the ``keep`` newest, younger than ``min_age``
(a run in progress writes there), or when anything still points into it: a champion record (what
each channel serves now and the champions it replaced, for rollback), a published mobile model's
record, or any URI passed as protected (e.g. the Model Registry's artifact URIs of models deployed
on endpoints). Collecting those URIs (:func:`protected_from_records`) is separate from the rule
(:func:`plan`), which takes a plain list of protected prefixes.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

DEFAULT_KEEP = 5
DEFAULT_MIN_AGE_S = 6 * 3600


@dataclass
class RunFolder:
    name: str
    uri: str  # gs://bucket/.../<run>/ (trailing slash)
    newest: float  # newest object's update time, epoch seconds
    objects: list[str] = field(default_factory=list)
    size: int = 0


def run_folders(io, artifacts_uri: str) -> list[RunFolder]:
    """The run folders under ``artifacts_uri``, newest first (by their newest object)."""
    root = artifacts_uri.rstrip("/") + "/"
    runs: dict[str, RunFolder] = {}
    for obj in _list(io, artifacts_uri):
        rel = obj["uri"][len(root) :]
        if "/" not in rel:
            continue  # a file directly under the root is no run's
        name = rel.split("/", 1)[0]
        run = runs.setdefault(name, RunFolder(name, f"{root}{name}/", 0.0))
        run.objects.append(obj["uri"])
        run.size += obj["size"]
        run.newest = max(run.newest, obj["updated"] or 0.0)
    return sorted(runs.values(), key=lambda r: (r.newest, r.name), reverse=True)


def _list(io, uri: str) -> list[dict]:
    """Objects under ``uri``; none when its bucket does not exist. Any other error (a 403) propagates:
    pruning without being able to read the records would delete what they protect."""
    from google.api_core.exceptions import NotFound

    try:
        return io.list_objects(uri)
    except NotFound:
        return []


def _protects(prefix: str, run: RunFolder) -> bool:
    """``prefix`` points into the run folder (a model inside it) or contains it (a whole tree)."""
    p = prefix.rstrip("/") + "/"
    return p.startswith(run.uri) or run.uri.startswith(p)


def plan(runs: list[RunFolder], protected: list[str], keep: int, min_age_s: float = DEFAULT_MIN_AGE_S,
         now: float | None = None) -> tuple[list[RunFolder], dict[str, str]]:
    """(folders to delete, {kept folder: why}). Pure: ``runs`` newest first, ``protected`` URI prefixes."""
    if keep < 0:
        raise ValueError(f"keep must be >= 0, got {keep}")
    now = time.time() if now is None else now
    delete, kept = [], {}
    for i, run in enumerate(runs):
        refs = [p for p in protected if _protects(p, run)]
        if i < keep:
            kept[run.name] = f"one of the {keep} newest"
        elif now - run.newest < min_age_s:
            kept[run.name] = f"written {int((now - run.newest) / 60)} min ago (younger than {min_age_s / 3600:g} h)"
        elif refs:
            kept[run.name] = f"still referenced: {', '.join(sorted(set(refs)))}"
        else:
            delete.append(run)
    return delete, kept


def protected_from_records(io, champions_prefix: str | None = None, mobile_registry: str | None = None,
                           keep_previous: int = 1) -> list[str]:
    """URIs that records still point to: each champion's ``model_dir`` and its ``keep_previous`` most
    recent predecessors (the rollback candidates), and each published mobile model's ``model_dir``
    (the local publish backend's ``<registry>/<name>/model.json``)."""
    out: list[str] = []
    for prefix, suffix in ((champions_prefix, ".json"), (mobile_registry, "/model.json")):
        if not prefix:
            continue
        for obj in _list(io, prefix):
            if not obj["uri"].endswith(suffix):
                continue
            record = io.read_json(obj["uri"])
            if not isinstance(record, dict):
                continue
            dirs = [record.get("model_dir"), (record.get("metadata") or {}).get("model_dir")]
            dirs += [p.get("model_dir") for p in (record.get("previous") or [])[:keep_previous] if isinstance(p, dict)]
            out += [d for d in dirs if isinstance(d, str) and d.startswith("gs://")]
    return sorted(set(out))


def prune(io, artifacts_uri: str, protected: list[str], keep: int = DEFAULT_KEEP,
          min_age_s: float = DEFAULT_MIN_AGE_S, dry_run: bool = False) -> dict:
    """Delete the run folders :func:`plan` selects. Returns ``{"deleted": {run: bytes}, "kept": {run: why},
    "freed_bytes", "dry_run"}``."""
    runs = run_folders(io, artifacts_uri)
    delete, kept = plan(runs, protected, keep, min_age_s)
    if not dry_run:
        for run in delete:
            for uri in run.objects:
                io.delete(uri)
    return {"deleted": {r.name: r.size for r in delete}, "kept": kept,
            "freed_bytes": sum(r.size for r in delete), "dry_run": dry_run}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m dual_deploy.retention", description=__doc__.split("\n\n")[0])
    p.add_argument("--keep", type=int, default=DEFAULT_KEEP, help=f"newest run folders always kept ({DEFAULT_KEEP})")
    p.add_argument("--min-age-hours", type=float, default=DEFAULT_MIN_AGE_S / 3600,
                   help="never delete a folder written to more recently than this (a run in progress)")
    p.add_argument("--keep-previous-champions", type=int, default=1,
                   help="also keep the N champions each record replaced most recently (rollback)")
    p.add_argument("--protect", action="append", default=[], metavar="URI",
                   help="keep every run folder this URI points into (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="only list what would be deleted")
    a = p.parse_args(argv)

    from dual_deploy.config import load_config
    from dual_deploy.hooks.gcs_io import GcsIO

    try:
        from dual_deploy.target_group import champions_prefix
    except ImportError:  # before the task-group builder moved out of dual_deploy.platforms
        from dual_deploy.platforms import champions_prefix

    cfg = load_config()
    io = GcsIO()
    local_bucket = getattr(getattr(cfg, "local", None), "bucket", None) if cfg.platform == "local" else None
    protected = protected_from_records(io, champions_prefix(cfg),
                                       f"gs://{local_bucket}/mobile-models" if local_bucket else None,
                                       a.keep_previous_champions) + a.protect
    report = prune(io, cfg.artifacts_uri, protected, a.keep, a.min_age_hours * 3600, a.dry_run)
    verb = "would delete" if a.dry_run else "deleted"
    for name, size in report["deleted"].items():
        print(f"{verb} {cfg.artifacts_uri.rstrip('/')}/{name}/ ({size / 1e6:.1f} MB)")
    for name, why in report["kept"].items():
        print(f"kept {name}: {why}")
    print(f"{verb} {len(report['deleted'])} run folder(s), {report['freed_bytes'] / 1e6:.1f} MB; "
          f"kept {len(report['kept'])}")


if __name__ == "__main__":
    main()

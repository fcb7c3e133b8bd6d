"""The run summary: what each target delivered, what failed first and why, and what now serves.

The summary task (trigger rule all_done) runs whatever happened upstream, in this order:

1. collect: task states, each task's XCom and, for failed tasks, the error its failure callback
   recorded (``dual_deploy.failures``); each target's ``metrics.json``;
2. build the summary (``build_summary``, pure);
3. record what was delivered, each record on its own: champion records (``record_champions``)
   and the training ledger (``record_ledger``). A record that cannot be written is a
   ``recording_error``: the summary is still written, then the task fails *retryably*;
4. derived, optional parts, each isolated so that its failure is a line in ``warnings``:
   the channel check (``check_channels``), the cost (``compute_cost``), AutoML and custom models
   side by side when both ran on the same split (``compare_methods``), the HTML report;
5. write ``run_summary.json`` (local copy first, then the run's artifacts);
6. fail the run if a target failed (AirflowFailException: a retry cannot change it).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from airflow.sdk.exceptions import AirflowException, AirflowFailException

from dual_deploy.contracts import (
    ChampionRecord,
    ChannelsReport,
    FailureRecord,
    LedgerNote,
    RunSummary,
    StepFailure,
    TargetSummary,
)
from dual_deploy.failures import FAILURE_XCOM_KEY
from dual_deploy.hooks.gcs_io import GcsIO
from dual_deploy.links import REPORT_URI_KEY, RunReportLink
from dual_deploy.operators.base import DictOutputOperator

# Which step's XCom feeds which summary section of a target.
_SECTIONS = {"train": "training", "register_model": "model", "deploy": "endpoint", "export_model": "export",
             "convert_tflite": "tflite", "publish": "published"}
# The step whose success means the target's model is now what serves / what apps download.
DELIVERY_STEP = {"endpoint": "deploy", "mobile": "publish"}
# What of the delivery step's XCom says exactly what serves (kept in the champion record).
_DELIVERY_KEYS = {"deploy": ("endpoint_id", "prediction_url", "deployed_model_id", "model_version_id"),
                  "publish": ("backend", "model_id", "display_name", "version", "tflite_uri")}
_METRIC_KEYS = ("accuracy", "macro_f1", "num_examples", "per_class", "confusion_matrix", "labels")
# The data step whose AirflowFailException means "these bytes are unusable": no point retrying them.
_DATA_REJECTED = ("validate_dataset", "AirflowFailException")
NO_MESSAGE = "failed without a recorded error message (killed, timed out, or failed outside the task): see its log"


# ============================================================================ pure parts


def _message(tid: str, failures: dict[str, FailureRecord]) -> str:
    return (failures.get(tid) or {}).get("message") or NO_MESSAGE


def first_failure(states: dict[str, str], failures: dict[str, FailureRecord], order: Sequence[str] = ()
                  ) -> StepFailure | None:
    """The task that failed first and its message. Only tasks in state ``failed`` qualify:
    ``upstream_failed`` and ``skipped`` tasks never ran, so they are consequences, not causes.
    Ordered by the time the failure callback recorded, then by position in the DAG."""
    rank = {tid: i for i, tid in enumerate(order)}
    failed = [tid for tid, s in states.items() if s == "failed"]
    if not failed:
        return None
    tid = min(failed, key=lambda t: ((failures.get(t) or {}).get("failed_at") or "~", rank.get(t, len(rank)), t))
    return {"task_id": tid, "message": _message(tid, failures)}


def _target_section(name: str, kind: str, states: dict[str, str], xcoms: dict, failures: dict[str, FailureRecord],
                    metrics: dict | None, order: Sequence[str], run_failure: StepFailure | None) -> TargetSummary:
    group = {tid.split(".", 1)[1]: x for tid, x in xcoms.items() if tid.startswith(name + ".")}
    group_states = {tid: s for tid, s in states.items() if tid.startswith(name + ".")}
    t: TargetSummary = {"kind": kind}
    for step, section in _SECTIONS.items():
        if isinstance(group.get(step), dict):
            t[section] = {k: v for k, v in group[step].items() if k != "duration_s"}  # type: ignore[literal-required]
    gate = group.get("champion_gate")
    if isinstance(gate, dict):
        t["decision"] = {k: gate.get(k) for k in ("promote", "reason", "challenger", "champion", "class_change")}
    m = metrics or (t.get("training") or {}).get("metrics")
    if m:
        t["metrics"] = {k: m.get(k) for k in _METRIC_KEYS}  # type: ignore[assignment]
    trained = t.get("training") or {}
    if trained.get("method") == "automl":
        t["model_family"] = f"AutoML {trained.get('model_type')}"
    elif (m or {}).get("architecture"):
        t["model_family"] = f"{m['architecture']} {m['image_size']}px" if m.get("image_size") else m["architecture"]
    if "training" in t:
        t["training"] = {k: v for k, v in t["training"].items() if k != "metrics"}
    rank = {tid: i for i, tid in enumerate(order)}
    failed = sorted((tid for tid, s in group_states.items() if s == "failed"),
                    key=lambda tid: ((failures.get(tid) or {}).get("failed_at") or "~", rank.get(tid, len(rank)), tid))
    t["failed_steps"] = [{"task_id": tid, "message": _message(tid, failures)} for tid in failed]
    t["not_run"] = sorted(tid for tid, s in group_states.items() if s not in ("success", "skipped", "failed"))
    # Airflow 3's ShortCircuitOperator skips by raising, so a left-out target's ``selected`` succeeds
    # without pushing its False: no XCom, the rest of the group skipped.
    left_out = group.get("selected") is False or (
        group_states.get(f"{name}.selected") == "success" and group.get("selected") is None
        and all(s == "skipped" for tid, s in group_states.items() if tid != f"{name}.selected"))
    if left_out:
        t["status"] = "not_selected"
    elif failed or t["not_run"]:
        t["status"] = "failed"
    elif t.get("decision") and not t["decision"].get("promote"):
        t["status"] = "not_promoted"
    elif group_states and all(s == "success" for s in group_states.values()):
        t["status"] = "success"
    else:
        t["status"] = "failed"
    if t["status"] == "failed":
        t["cause"] = t["failed_steps"][0] if failed else run_failure
    return t


def build_summary(*, dag_id: str, run_id: str, platform: str, targets: dict[str, str], states: dict[str, str],
                  xcoms: dict[str, dict | None], artifacts_uri: str, metrics: dict[str, dict] | None = None,
                  failures: dict[str, FailureRecord] | None = None, order: Sequence[str] = ()) -> RunSummary:
    """Assemble the summary from task states, XComs, failure records and each target's
    ``metrics.json`` (pure).

    ``metrics`` comes from the artifacts, not XCom: the trainer writes it, whatever the training
    operator pushes. ``order`` (the DAG's task ids, upstream first) breaks ties between failures.
    """
    metrics = metrics or {}
    failures = failures or {}
    run_failure = first_failure(states, failures, order)
    # Not every XCom is a dict: ShortCircuitOperator (``selected``) pushes its callable's bool.
    steps = {tid: {"state": states.get(tid), "duration_s": x.get("duration_s") if isinstance(x, dict) else None}
             for tid in sorted(states) for x in [xcoms.get(tid)]}
    out_targets = {name: _target_section(name, kind, states, xcoms, failures, metrics.get(name), order, run_failure)
                   for name, kind in targets.items()}
    failed = any(t["status"] == "failed" for t in out_targets.values()) or run_failure is not None
    return {
        "dag_id": dag_id,
        "run_id": run_id,
        "platform": platform,
        "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
        # A target that was not selected or not promoted is a correct outcome, not a failure.
        "status": "failed" if failed else "success",
        "first_failure": run_failure,
        "artifacts_uri": artifacts_uri,
        "data": xcoms.get("validate_dataset") if isinstance(xcoms.get("validate_dataset"), dict) else None,
        "split": xcoms.get("stage_split") if isinstance(xcoms.get("stage_split"), dict) else None,
        "targets": out_targets,
        "steps": steps,
        "warnings": [],
        "recording_errors": [],
    }


def champion_record(name: str, t: TargetSummary, *, run_id: str, artifacts_uri: str, written_at: str
                    ) -> ChampionRecord:
    """What a delivered target's champion record says (pure). Needs no metrics: the next gate
    re-evaluates the model itself, so a missing metrics.json must not lose the record."""
    m = t.get("metrics") or {}
    step = DELIVERY_STEP.get(t["kind"], "")
    delivered = t.get("endpoint" if step == "deploy" else "published") or {}
    return {
        "model_dir": (t.get("training") or {}).get("model_dir") or f"{artifacts_uri.rstrip('/')}/{name}/model",
        "run_id": run_id,
        "summary_uri": f"{artifacts_uri.rstrip('/')}/run_summary.json",
        "method": (t.get("training") or {}).get("method") or "custom",
        "accuracy": m.get("accuracy"),
        "macro_f1": m.get("macro_f1"),
        "labels": m.get("labels"),
        "delivery": {k: delivered.get(k) for k in _DELIVERY_KEYS.get(step, ()) if k in delivered},
        "written_at": written_at,
    }


def delivered_targets(summary: RunSummary, states: dict[str, str]) -> list[str]:
    """Targets whose delivery step succeeded in this run: their channel now serves this run's model."""
    return [name for name, t in summary["targets"].items()
            if states.get(f"{name}.{DELIVERY_STEP.get(t['kind'], '')}") == "success"]


def _label_diff(first: str, a: list[str], other: str, b: list[str]) -> str:
    added, removed = sorted(set(b) - set(a)), sorted(set(a) - set(b))
    parts = [f"{other} has {added} that {first} lacks" if added else "",
             f"{other} lacks {removed}" if removed else ""]
    return "; ".join(p for p in parts if p) or "same classes in another order"


def channel_consistency(serving: dict[str, dict | None], kinds: dict[str, str]) -> ChannelsReport:
    """Pure: do all channels serve models of the same class set, from the same run?

    ``serving[target]``: its champion record (``run_id``, ``model_dir``, ``labels``) or None when
    nothing was ever delivered there."""
    warnings: list[str] = []
    present = {n: r for n, r in serving.items() if r}
    empty = [n for n, r in serving.items() if not r]
    if present and empty:
        for n in empty:
            warnings.append(f"{n} ({kinds.get(n)}) serves no model yet while "
                            + ", ".join(f"{p} serves run {r.get('run_id')}" for p, r in present.items()))
    names = list(present)
    for other in names[1:]:
        a, b = present[names[0]], present[other]
        la, lb = a.get("labels"), b.get("labels")
        if la is None or lb is None:
            warnings.append(f"cannot compare the class sets of {names[0]} and {other}: "
                            f"{names[0] if la is None else other} has no recorded labels")
        elif list(la) != list(lb):
            warnings.append(f"class sets differ: {names[0]} ({kinds.get(names[0])}) serves {len(la)} classes {la}, "
                            f"{other} ({kinds.get(other)}) serves {len(lb)} classes {lb} "
                            f"({_label_diff(names[0], la, other, lb)})")
        if a.get("run_id") != b.get("run_id"):
            warnings.append(f"models from different runs: {names[0]} serves run {a.get('run_id')}, "
                            f"{other} serves run {b.get('run_id')}")
    return {"consistent": not warnings, "warnings": warnings,
            "serving": {n: ({"run_id": r.get("run_id"), "model_dir": r.get("model_dir"), "labels": r.get("labels")}
                            if r else None) for n, r in serving.items()}}


def _short(text: str, limit: int = 240) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def render_text(summary: dict) -> str:
    """A short human-readable form for the task log and `make run`: the first failure first."""
    lines = [f"run {summary['run_id']} on {summary['platform']}: {summary['status'].upper()}"]
    ff = summary.get("first_failure")
    if ff:
        lines.append(f"  FAILED at {ff['task_id']}:")
        lines += [f"    {line}" for line in str(ff.get("message", "")).splitlines() or [""]]
    split = summary.get("split") or {}
    if split:
        lines.append(f"  data: {len(split.get('labels', []))} classes, split {split.get('counts')}")
    elif (summary.get("data") or {}).get("data_uri"):
        lines.append(f"  data: {summary['data']['data_uri']}")
    for name, t in summary["targets"].items():
        m = t.get("metrics") or {}
        failed_steps = [s if isinstance(s, dict) else {"task_id": s, "message": ""} for s in t.get("failed_steps", [])]
        if t["status"] == "failed" and not failed_steps and t.get("not_run"):
            cause = (t.get("cause") or {}).get("task_id") or "an upstream step"
            lines.append(f"  [{name}] not run: {cause} failed")
            continue
        acc = f"{m['accuracy']:.1%}" if m.get("accuracy") is not None else "n/a"
        lines.append(f"  [{name}] {t['status']}: test accuracy {acc}")
        trained = t.get("training") or {}
        if trained.get("method") == "automl":
            lines.append(f"      AutoML {trained.get('model_type')}: {trained.get('cost_milli_node_hours')} of "
                         f"{trained.get('budget_milli_node_hours')} milli node hours ({trained.get('stop_reason')}), "
                         f"pipeline {trained.get('training_pipeline_id')}")
        if t.get("decision"):
            lines.append(f"      gate: {t['decision'].get('reason')}")
        if t.get("model"):
            lines.append(f"      model {t['model'].get('model_resource_name')}")
        if t.get("endpoint"):
            e = t["endpoint"]
            lines.append(f"      endpoint {e.get('prediction_url')} serving version {e.get('model_version_id')}")
        if t.get("tflite"):
            x = t["tflite"]
            lines.append(
                f"      tflite {x.get('mode')}: {(x.get('size_bytes') or 0) / 1e6:.2f} MB, agreement "
                f"{x.get('top1_agreement') or 0:.1%}, accuracy {x.get('tflite_accuracy') or 0:.1%}, "
                f"p95 {x.get('latency_ms_p95') or 0:.1f} ms"
            )
        if t.get("published"):
            p = t["published"]
            lines.append(f"      published {p.get('display_name')} id {p.get('model_id')} version {p.get('version')}")
        for s in failed_steps:
            lines.append(f"      failed {s['task_id']}: {_short(s.get('message', ''))}")
        if t.get("not_run"):
            lines.append(f"      not run: {', '.join(t['not_run'])}")
    channels = summary.get("channels") or {}
    for w in channels.get("warnings", []):
        lines.append(f"  CHANNELS OUT OF STEP: {w}")
    ledger = summary.get("ledger")
    if ledger:
        lines.append(f"  data ledger: {ledger.get('note')}")
    timed = [(tid, s["duration_s"]) for tid, s in summary.get("steps", {}).items() if s.get("duration_s") is not None]
    if timed:
        lines.append("  durations: " + ", ".join(f"{tid} {d:.0f}s" for tid, d in timed))
    comparison = summary.get("comparison")
    if comparison:
        lines.append("  AutoML vs custom on the same test split:")
        for r in comparison["rows"]:
            usd = f"${r['training_usd']:.2f}" if r.get("training_usd") is not None else "n/a"
            lines.append(f"      {r['target']:<14} {r['method']:<6} {r.get('model') or '':<28} accuracy "
                         f"{_fmt_pct(r.get('accuracy'))}, training {_fmt_s(r.get('training_s'))} {usd}"
                         f"{'' if r.get('this_run') else ' (run ' + str(r.get('run_id')) + ')'}")
    cost = summary.get("cost")
    if cost:
        note = " if run on Vertex AI with the configured machines (estimate)" if cost.get("estimate_only") else ""
        partial = " (partial: see warnings)" if cost.get("complete") is False else ""
        lines.append(f"  training cost: {cost['training_total_usd']:.4f} {cost['currency']}{note}{partial}")
    if summary.get("report_uri"):
        lines.append(f"  report: {summary.get('local_report_path') or summary['report_uri']}")
    for e in summary.get("recording_errors", []):
        lines.append(f"  NOT RECORDED: {e}")
    for w in summary.get("warnings", []):
        lines.append(f"  warning: {w}")
    return "\n".join(lines)


def _fmt_pct(x) -> str:
    return f"{x:.1%}" if isinstance(x, int | float) else "n/a"


def _fmt_s(x) -> str:
    return f"{x:.0f} s" if isinstance(x, int | float) else "n/a"


def comparison_row(name: str, t: dict, summary: dict, this_run: bool) -> dict:
    """One target of a run summary as a row of the AutoML / custom comparison (pure)."""
    m, tflite, trained = t.get("metrics") or {}, t.get("tflite") or {}, t.get("training") or {}
    cost = (((summary.get("cost") or {}).get("targets") or {}).get(name) or {}).get("training") or {}
    seconds = (summary.get("steps", {}).get(f"{name}.train") or {}).get("duration_s")
    return {"target": name, "run_id": summary.get("run_id"), "this_run": this_run, "kind": t.get("kind"),
            "status": t.get("status"), "method": trained.get("method") or "custom", "model": t.get("model_family"),
            "accuracy": m.get("accuracy"), "macro_f1": m.get("macro_f1"),
            "tflite_size_bytes": tflite.get("size_bytes"), "tflite_latency_ms_p95": tflite.get("latency_ms_p95"),
            "tflite_agreement": tflite.get("top1_agreement"),
            "training_s": seconds if seconds is not None else trained.get("duration_s"),
            "training_usd": cost.get("usd"), "cost_estimate_only": (summary.get("cost") or {}).get("estimate_only")}


def method_comparison(summary: dict, others: Sequence[dict]) -> dict | None:
    """AutoML and custom models side by side when both were evaluated on this run's split (pure).

    Rows: this run's targets, and the targets of ``others`` (the runs that trained what the channels
    serve now) whose split has the same fingerprint (same images in the same train/val/test roles).
    None unless both methods have a scored model on the split."""
    fingerprint = (summary.get("split") or {}).get("fingerprint")
    if not fingerprint:
        return None
    rows = [comparison_row(n, t, summary, True) for n, t in summary["targets"].items()]
    seen = {(summary.get("run_id"), n) for n in summary["targets"]}
    for other in others:
        if (other.get("split") or {}).get("fingerprint") != fingerprint:
            continue
        for n, t in other.get("targets", {}).items():
            if (other.get("run_id"), n) not in seen and t.get("status") in ("success", "not_promoted"):
                seen.add((other.get("run_id"), n))
                rows.append(comparison_row(n, t, other, False))
    rows = [r for r in rows if r["accuracy"] is not None]
    if not {"automl", "custom"} <= {r["method"] for r in rows}:
        return None
    rows.sort(key=lambda r: (r["kind"] or "", r["method"], not r["this_run"], r["target"]))
    return {"split_fingerprint": fingerprint, "rows": rows}


# ============================================================================ steps with side effects


def collect_task_results(ti, dag_id: str, run_id: str, task_ids: Sequence[str]
                         ) -> tuple[dict[str, str], dict[str, object], dict[str, FailureRecord]]:
    """(states, XComs, failure records) of ``task_ids`` in this run, through the Task SDK."""
    states = ti.get_task_states(dag_id=dag_id, task_ids=list(task_ids), run_ids=[run_id]).get(run_id, {})
    xcoms = {tid: ti.xcom_pull(task_ids=tid) for tid in task_ids}
    failures = {}
    for tid, state in states.items():
        if state == "failed":
            record = ti.xcom_pull(task_ids=tid, key=FAILURE_XCOM_KEY)
            if isinstance(record, dict):
                failures[tid] = record
    return states, xcoms, failures


def read_target_files(io: GcsIO, artifacts_uri: str, targets: Sequence[str], filename: str,
                      warnings: list[str]) -> dict[str, dict]:
    """``<artifacts>/<target>/model/<filename>`` of each target that has one; a read error is a warning."""
    out = {}
    for name in targets:
        uri = f"{artifacts_uri.rstrip('/')}/{name}/model/{filename}"
        try:
            if io.exists(uri):
                out[name] = io.read_json(uri)
        except Exception as e:  # noqa: BLE001 - the summary goes on without it
            warnings.append(f"{name}: cannot read {uri}: {_short(e)}")
    return out


def record_champions(champions, summary: RunSummary, states: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """Record each delivered target as its channel's champion, each on its own.
    Returns ({target: model_dir recorded}, [errors])."""
    recorded, errors = {}, []
    for name in delivered_targets(summary, states):
        try:
            record = champion_record(name, summary["targets"][name], run_id=summary["run_id"],
                                     artifacts_uri=summary["artifacts_uri"], written_at=summary["written_at"])
            champions.record(name, record)
            recorded[name] = record["model_dir"]
        except Exception as e:  # noqa: BLE001 - the other targets are still recorded
            errors.append(f"champion record of {name} ({champions.uri(name)}): {_short(e, 400)}")
    return recorded, errors


def record_ledger(ledger, io: GcsIO, summary: RunSummary, *, data_uri: str | None, summary_uri: str | None,
                  default_max_attempts: int, first_failure_exception: str | None = None
                  ) -> tuple[LedgerNote | None, list[str]]:
    """Record this run's result for its data's fingerprint. Returns (note for the summary, warnings).

    A run whose data was rejected (``validate_dataset`` failed with AirflowFailException) is
    recorded as a permanent failure: the new-data trigger never retries the same bytes.
    Raises if the ledger cannot be written (a recording error)."""
    from dual_deploy.hooks.ledger import result_note

    data = summary.get("data") or {}
    data_uri = data.get("data_uri") or data_uri
    fingerprint = data.get("fingerprint")
    if not fingerprint and data_uri:
        from dual_deploy.operators.dataset import dataset_fingerprint

        try:
            fingerprint = dataset_fingerprint(io, data_uri)
        except Exception as e:  # noqa: BLE001 - e.g. the bucket does not exist: no data, nothing to record
            return None, [f"not recorded in the training ledger: cannot fingerprint {data_uri} ({_short(e)})"]
    if not fingerprint:
        return None, ["not recorded in the training ledger: the run has no data URI"]
    ff = summary.get("first_failure")
    status = summary["status"]
    permanent = bool(ff and status == "failed" and (ff["task_id"], first_failure_exception) == _DATA_REJECTED)
    entry = ledger.record_attempt(fingerprint, summary["run_id"], status, data_uri=data_uri,
                                  failure=ff if status == "failed" else None, permanent=permanent,
                                  summary_uri=summary_uri)
    return {"fingerprint": fingerprint, **result_note(entry, summary["run_id"], default_max_attempts)}, []


def check_channels(champions, targets: dict[str, str], io: GcsIO) -> ChannelsReport:
    """Read every target's champion record (after this run's were written) and compare them.
    Records written before labels were recorded get them from the model's ``labels.txt``."""
    from dualml.dataset import parse_labels

    serving = {}
    for name in targets:
        record = champions.read(name)
        if record and record.get("labels") is None and record.get("model_dir"):
            uri = f"{record['model_dir'].rstrip('/')}/labels.txt"
            if io.exists(uri):
                record = {**record, "labels": parse_labels(io.read_bytes(uri).decode())}
        serving[name] = record
    return channel_consistency(serving, targets)


def compare_methods(io: GcsIO, summary: RunSummary, champions_uri: str | None) -> dict | None:
    """``method_comparison`` of this run and the runs whose models the channels serve now (the champion
    records of every target under ``champions_uri``, this config's or another's)."""
    others, read = [], set()
    if champions_uri:
        for uri in io.list_files(champions_uri):
            if not uri.endswith(".json"):
                continue
            record = io.read_json(uri) or {}
            summary_uri = record.get("summary_uri") or (
                record["model_dir"].rstrip("/").rsplit("/", 2)[0] + "/run_summary.json" if record.get("model_dir") else None)
            if summary_uri and summary_uri not in read and record.get("run_id") != summary.get("run_id"):
                read.add(summary_uri)
                if io.exists(summary_uri):
                    others.append(io.read_json(summary_uri))
    return method_comparison(summary, others)  # type: ignore[arg-type]


def compute_cost(summary: RunSummary, cost_inputs: dict, *, region: str, prices_path: str | None) -> dict:
    from dual_deploy.cost import load_prices, run_cost

    return run_cost(summary, cost_inputs, region=region, prices=load_prices(prices_path))


def write_report(io: GcsIO, summary: RunSummary, histories: dict[str, dict], artifacts_uri: str,
                 local_dir: str | None) -> tuple[str, str | None]:
    """Render the HTML report into ``<artifacts>/report/`` (and ``local_dir``). (URI, local index path)."""
    from dual_deploy.report import write_report as render

    base = artifacts_uri.rstrip("/")
    with tempfile.TemporaryDirectory() as tmp:
        out = render(summary, histories, tmp)
        for fn in ["index.html", *out["images"]]:
            mime = "text/html" if fn.endswith(".html") else "image/png"
            io.upload_file(os.path.join(tmp, fn), f"{base}/report/{fn}", mime)
        local_index = None
        if local_dir:
            shutil.rmtree(local_dir, ignore_errors=True)
            shutil.copytree(tmp, local_dir)
            local_index = os.path.join(local_dir, "index.html")
    return f"{base}/report/index.html", local_index


def write_summary(io: GcsIO, summary: RunSummary, summary_uri: str, local_copy_path: str | None) -> None:
    """The local copy first (what `make run` prints), then the run's artifacts."""
    if local_copy_path:
        os.makedirs(os.path.dirname(os.path.abspath(local_copy_path)), exist_ok=True)
        tmp = f"{local_copy_path}.tmp"
        with open(tmp, "w") as f:
            json.dump(summary, f, indent=1, sort_keys=True)
        os.replace(tmp, local_copy_path)
    io.write_json(summary_uri, summary)


def run_optional(summary: RunSummary, what: str, fn: Callable[[], object]) -> object | None:
    """Run an optional step; its failure becomes a warning in the summary, never an exception."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - optional: reported, not raised
        summary["warnings"].append(f"{what}: {type(e).__name__}: {_short(e, 400)}")
        return None


# ============================================================================ the operator


class RunSummaryOperator(DictOutputOperator):
    """Record what the run delivered, write ``run_summary.json`` (and a local copy), and fail the
    run if any target failed. Runs whatever happened upstream (trigger rule all_done).
    Steps and their order: see the module docstring.

    XCom: ``{"summary_uri", "local_copy_path", "status"}``.
    """

    template_fields: Sequence[str] = ("summary_uri", "artifacts_uri", "local_copy_path", "data_uri", "ledger_uri")
    operator_extra_links = (RunReportLink(),)

    def __init__(self, *, targets: dict[str, str], summary_uri: str, artifacts_uri: str, platform: str,
                 local_copy_path: str | None = None, data_uri: str | None = None, ledger_uri: str | None = None,
                 cost_inputs: dict | None = None, region: str = "us-central1", prices_path: str | None = None,
                 champions_uri: str | None = None, max_attempts_per_batch: int | None = None,
                 gcp_conn_id: str = "google_cloud_default", **kwargs):
        kwargs.setdefault("trigger_rule", "all_done")
        super().__init__(**kwargs)
        self.targets = targets
        self.summary_uri = summary_uri
        self.artifacts_uri = artifacts_uri
        self.platform = platform
        self.local_copy_path = local_copy_path
        self.data_uri = data_uri
        self.ledger_uri = ledger_uri
        self.cost_inputs = cost_inputs
        self.champions_uri = champions_uri
        self.region = region
        self.prices_path = prices_path
        self.max_attempts_per_batch = max_attempts_per_batch
        self.gcp_conn_id = gcp_conn_id

    def _task_order(self) -> list[str]:
        try:
            return [t.task_id for t in self.dag.topological_sort() if t.task_id != self.task_id]
        except Exception:  # noqa: BLE001 - only a tie-breaker
            return [t for t in self.dag.task_ids if t != self.task_id]

    def execute(self, context) -> dict:
        from dual_deploy.hooks.champions import ChampionRecords
        from dual_deploy.hooks.ledger import DEFAULT_MAX_ATTEMPTS, TrainingLedgerHook

        run_id = context["run_id"]
        order = self._task_order()
        # 1. collect
        states, xcoms, failures = collect_task_results(context["ti"], self.dag_id, run_id, order)
        io = GcsIO(self.gcp_conn_id)
        warnings: list[str] = []
        metrics = read_target_files(io, self.artifacts_uri, list(self.targets), "metrics.json", warnings)
        # 2. build
        summary = build_summary(dag_id=self.dag_id, run_id=run_id, platform=self.platform, targets=self.targets,
                                states=states, xcoms=xcoms, artifacts_uri=self.artifacts_uri, metrics=metrics,
                                failures=failures, order=order)
        summary["summary_uri"] = self.summary_uri
        summary["warnings"] += warnings
        if summary["data"] is None and self.data_uri:
            summary["data"] = {"data_uri": self.data_uri}
        ff = summary.get("first_failure")
        first_exception = (failures.get(ff["task_id"]) or {}).get("exception") if ff else None
        # 3. record what was delivered: first, each on its own
        champions = ChampionRecords(self.champions_uri, self.gcp_conn_id) if self.champions_uri else None
        if champions:
            summary["champions"], errors = record_champions(champions, summary, states)
            summary["recording_errors"] += errors
        if self.ledger_uri:
            try:
                summary["ledger"], notes = record_ledger(
                    TrainingLedgerHook(self.ledger_uri, self.gcp_conn_id), io, summary, data_uri=self.data_uri,
                    summary_uri=self.summary_uri, first_failure_exception=first_exception,
                    default_max_attempts=self.max_attempts_per_batch or DEFAULT_MAX_ATTEMPTS)
                summary["warnings"] += notes
            except Exception as e:  # noqa: BLE001 - reported, and the task fails (retryably) at the end
                summary["recording_errors"].append(f"training ledger {self.ledger_uri}: {_short(e, 400)}")
        # 4. derived, optional parts: a failure is a warning
        if champions:
            channels = run_optional(summary, "channel check", lambda: check_channels(champions, self.targets, io))
            if channels:
                summary["channels"] = channels
        if self.cost_inputs:
            cost = run_optional(summary, "cost", lambda: compute_cost(summary, self.cost_inputs, region=self.region,
                                                                      prices_path=self.prices_path))
            if cost:
                summary["cost"] = cost
                summary["warnings"] += [f"cost: {w}" for w in cost.get("warnings", [])]
        comparison = run_optional(summary, "AutoML/custom comparison",
                                  lambda: compare_methods(io, summary, self.champions_uri))
        if comparison:
            summary["comparison"] = comparison
        summary["report_uri"] = None
        report = run_optional(summary, "report", lambda: self._report(io, summary, warnings=summary["warnings"]))
        if report:
            summary["report_uri"], local_index = report
            if local_index:
                summary["local_report_path"] = local_index
            context["ti"].xcom_push(key=REPORT_URI_KEY, value=summary["report_uri"])  # RunReportLink
        # 5. write the summary
        write_summary(io, summary, self.summary_uri, self.local_copy_path)
        self.log.info("run summary %s\n%s", self.summary_uri, render_text(summary))
        # 6. the run's state
        if summary["recording_errors"]:
            raise AirflowException(
                f"could not record what this run delivered ({'; '.join(summary['recording_errors'])}); "
                f"summary written to {self.summary_uri}. Retrying re-records it."
            )
        if summary["status"] != "success":
            failed = [n for n, t in summary["targets"].items() if t["status"] == "failed"]
            where = f" at {ff['task_id']}: {_short(ff['message'], 300)}" if ff else ""
            raise AirflowFailException(
                f"target(s) {', '.join(failed) or 'none'} failed{where}; summary written to {self.summary_uri}"
            )
        return {"summary_uri": self.summary_uri, "local_copy_path": self.local_copy_path, "status": summary["status"]}

    def _report(self, io: GcsIO, summary: RunSummary, warnings: list[str]) -> tuple[str, str | None]:
        histories = read_target_files(io, self.artifacts_uri, list(self.targets), "history.json", warnings)
        local_dir = (os.path.join(os.path.dirname(os.path.abspath(self.local_copy_path)), "report")
                     if self.local_copy_path else None)
        return write_report(io, summary, histories, self.artifacts_uri, local_dir)

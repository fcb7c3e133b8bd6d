"""The run summary: what each target produced, where it went, and how long each step took."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime

from airflow.sdk.exceptions import AirflowFailException

from dual_deploy.hooks.gcs_io import GcsIO
from dual_deploy.operators.base import DictOutputOperator

# Which step's XCom feeds which summary section of a target.
_SECTIONS = {"train": "training", "register_model": "model", "deploy": "endpoint",
             "convert_tflite": "tflite", "publish": "published"}
# The step whose success means the target's model is now what serves / what apps download.
_DELIVERY_STEP = {"endpoint": "deploy", "mobile": "publish"}


_METRIC_KEYS = ("accuracy", "macro_f1", "num_examples", "per_class", "confusion_matrix", "labels")


def build_summary(*, dag_id: str, run_id: str, platform: str, targets: dict[str, str], states: dict[str, str],
                  xcoms: dict[str, dict | None], artifacts_uri: str, metrics: dict[str, dict] | None = None) -> dict:
    """Assemble the summary from task states, XComs and each target's ``metrics.json`` (pure).

    ``metrics`` comes from the artifacts, not XCom: on GCP the training step is the provider's
    operator, whose XCom is the Vertex job, not our metrics.
    """
    metrics = metrics or {}
    # Not every XCom is a dict: ShortCircuitOperator (``selected``) pushes its callable's bool.
    steps = {tid: {"state": states.get(tid), "duration_s": x.get("duration_s") if isinstance(x, dict) else None}
             for tid in sorted(states) for x in [xcoms.get(tid)]}
    out_targets = {}
    for name, kind in targets.items():
        group = {tid.split(".", 1)[1]: x for tid, x in xcoms.items() if tid.startswith(name + ".")}
        group_states = {tid: s for tid, s in states.items() if tid.startswith(name + ".")}
        t: dict = {"kind": kind}
        for step, section in _SECTIONS.items():
            if group.get(step):
                t[section] = {k: v for k, v in group[step].items() if k != "duration_s"}
        if group.get("champion_gate"):
            t["decision"] = {k: group["champion_gate"].get(k) for k in ("promote", "reason", "challenger", "champion")}
        m = metrics.get(name) or (t.get("training") or {}).get("metrics")
        if m:
            t["metrics"] = {k: m.get(k) for k in _METRIC_KEYS}
        if "training" in t:
            t["training"] = {k: v for k, v in t["training"].items() if k != "metrics"}
        bad = sorted(tid for tid, s in group_states.items() if s in ("failed", "upstream_failed"))
        if group.get("selected") is False:
            t["status"] = "not_selected"
        elif bad:
            t["status"] = "failed"
        elif t.get("decision") and not t["decision"].get("promote"):
            t["status"] = "not_promoted"
        elif group_states and all(s == "success" for s in group_states.values()):
            t["status"] = "success"
        else:
            t["status"] = "failed"
        t["failed_steps"] = bad or sorted(tid for tid, s in group_states.items() if s not in ("success", "skipped"))
        out_targets[name] = t
    return {
        "dag_id": dag_id,
        "run_id": run_id,
        "platform": platform,
        "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
        # A target that was not selected or not promoted is a correct outcome, not a failure.
        "status": "failed" if any(t["status"] == "failed" for t in out_targets.values()) else "success",
        "artifacts_uri": artifacts_uri,
        "data": xcoms.get("validate_dataset"),
        "split": xcoms.get("stage_split"),
        "targets": out_targets,
        "steps": steps,
    }


def render_text(summary: dict) -> str:
    """A short human-readable form for the task log and `make run`."""
    lines = [f"run {summary['run_id']} on {summary['platform']}: {summary['status'].upper()}"]
    split = summary.get("split") or {}
    if split:
        lines.append(f"  data: {len(split.get('labels', []))} classes, split {split.get('counts')}")
    for name, t in summary["targets"].items():
        m = t.get("metrics") or {}
        acc = f"{m['accuracy']:.1%}" if m.get("accuracy") is not None else "n/a"
        lines.append(f"  [{name}] {t['status']}: test accuracy {acc}")
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
                f"      tflite {x.get('mode')}: {x.get('size_bytes', 0) / 1e6:.2f} MB, agreement "
                f"{x.get('top1_agreement', 0):.1%}, accuracy {x.get('tflite_accuracy', 0):.1%}, "
                f"p95 {x.get('latency_ms_p95', 0):.1f} ms"
            )
        if t.get("published"):
            p = t["published"]
            lines.append(f"      published {p.get('display_name')} id {p.get('model_id')} version {p.get('version')}")
        if t["failed_steps"]:
            lines.append(f"      failed/skipped steps: {', '.join(t['failed_steps'])}")
    timed = [(tid, s["duration_s"]) for tid, s in summary["steps"].items() if s.get("duration_s") is not None]
    if timed:
        lines.append("  durations: " + ", ".join(f"{tid} {d:.0f}s" for tid, d in timed))
    cost = summary.get("cost")
    if cost:
        note = " if run on Vertex AI with the configured machines (estimate)" if cost.get("estimate_only") else ""
        lines.append(f"  training cost: {cost['training_total_usd']:.4f} {cost['currency']}{note}")
    if summary.get("report_uri"):
        lines.append(f"  report: {summary.get('local_report_path') or summary['report_uri']}")
    return "\n".join(lines)


class RunSummaryOperator(DictOutputOperator):
    """Write ``run_summary.json`` with the run's artifacts (and a local copy), log it, and fail
    the run if any target failed. Runs whatever happened upstream (trigger rule all_done).

    XCom: the summary's URI and status.
    """

    template_fields: Sequence[str] = ("summary_uri", "artifacts_uri", "local_copy_path", "data_uri", "ledger_uri")

    def __init__(self, *, targets: dict[str, str], summary_uri: str, artifacts_uri: str, platform: str,
                 local_copy_path: str | None = None, data_uri: str | None = None, ledger_uri: str | None = None,
                 cost_inputs: dict | None = None, region: str = "us-central1", prices_path: str | None = None,
                 champions_uri: str | None = None,
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
        self.gcp_conn_id = gcp_conn_id

    def execute(self, context) -> dict:
        ti = context["ti"]
        run_id = context["run_id"]
        task_ids = [t for t in self.dag.task_ids if t != self.task_id]
        states = ti.get_task_states(dag_id=self.dag_id, task_ids=task_ids, run_ids=[run_id]).get(run_id, {})
        xcoms = {tid: ti.xcom_pull(task_ids=tid) for tid in task_ids}
        io = GcsIO(self.gcp_conn_id)
        metrics = {}
        for name in self.targets:
            uri = f"{self.artifacts_uri.rstrip('/')}/{name}/model/metrics.json"
            if io.exists(uri):
                metrics[name] = io.read_json(uri)
        summary = build_summary(dag_id=self.dag_id, run_id=run_id, platform=self.platform, targets=self.targets,
                                states=states, xcoms=xcoms, artifacts_uri=self.artifacts_uri, metrics=metrics)
        summary["summary_uri"] = self.summary_uri
        if self.cost_inputs:
            from dual_deploy.cost import load_prices, run_cost

            summary["cost"] = run_cost(summary, self.cost_inputs, region=self.region,
                                       prices=load_prices(self.prices_path))
        summary["report_uri"] = self._write_report(io, summary)
        io.write_json(self.summary_uri, summary)
        if self.local_copy_path:
            os.makedirs(os.path.dirname(os.path.abspath(self.local_copy_path)), exist_ok=True)
            with open(self.local_copy_path, "w") as f:
                json.dump(summary, f, indent=1, sort_keys=True)
        self.log.info("run summary %s\n%s", self.summary_uri, render_text(summary))
        if self.ledger_uri:
            self._record_in_ledger(io, summary, run_id)
        if self.champions_uri:
            self._record_champions(io, summary, run_id, states)
        if summary["status"] != "success":
            failed = [n for n, t in summary["targets"].items() if t["status"] != "success"]
            raise AirflowFailException(f"target(s) {', '.join(failed)} failed; summary written to {self.summary_uri}")
        return {"summary_uri": self.summary_uri, "local_copy_path": self.local_copy_path, "status": summary["status"]}

    def _write_report(self, io: GcsIO, summary: dict) -> str:
        """Render the HTML report into ``<artifacts>/report/`` (and beside the local summary copy)."""
        from dual_deploy.report import write_report

        base = self.artifacts_uri.rstrip("/")
        histories = {}
        for name in self.targets:
            uri = f"{base}/{name}/model/history.json"
            if io.exists(uri):
                histories[name] = io.read_json(uri)
        with tempfile.TemporaryDirectory() as tmp:
            out = write_report(summary, histories, tmp)
            for fn in ["index.html", *out["images"]]:
                mime = "text/html" if fn.endswith(".html") else "image/png"
                io.upload_file(os.path.join(tmp, fn), f"{base}/report/{fn}", mime)
            if self.local_copy_path:
                local = os.path.join(os.path.dirname(os.path.abspath(self.local_copy_path)), "report")
                shutil.rmtree(local, ignore_errors=True)
                shutil.copytree(tmp, local)
                summary["local_report_path"] = os.path.join(local, "index.html")
        return f"{base}/report/index.html"

    def _record_champions(self, io: GcsIO, summary: dict, run_id: str, states: dict) -> None:
        """A target whose delivery step succeeded now serves this run's model: it is the champion
        the next run's challenger must beat (operators/gate.py)."""
        base = self.artifacts_uri.rstrip("/")
        for name, t in summary["targets"].items():
            step = _DELIVERY_STEP.get(t["kind"])
            if states.get(f"{name}.{step}") != "success" or not t.get("metrics"):
                continue
            record = {"model_dir": f"{base}/{name}/model", "run_id": run_id, "accuracy": t["metrics"]["accuracy"],
                      "macro_f1": t["metrics"]["macro_f1"], "written_at": summary["written_at"]}
            io.write_json(f"{self.champions_uri.rstrip('/')}/{name}.json", record)
            self.log.info("target %s: champion is now %s", name, record["model_dir"])

    def _record_in_ledger(self, io: GcsIO, summary: dict, run_id: str) -> None:
        """Record what this run trained on, so the data trigger never trains the same data again."""
        from dual_deploy.hooks.ledger import TrainingLedgerHook
        from dual_deploy.operators.dataset import dataset_fingerprint

        data_uri = (summary.get("data") or {}).get("data_uri") or self.data_uri
        fingerprint = (summary.get("data") or {}).get("fingerprint")
        if not fingerprint and data_uri:
            try:
                fingerprint = dataset_fingerprint(io, data_uri)
            except Exception as e:  # noqa: BLE001 - e.g. the bucket does not exist: nothing to record
                self.log.warning("not recording in the ledger: cannot fingerprint %s (%s)", data_uri, e)
                return
        if fingerprint:
            TrainingLedgerHook(self.ledger_uri, self.gcp_conn_id).record(
                fingerprint, data_uri=data_uri, run_id=run_id, status=summary["status"], summary_uri=self.summary_uri
            )

"""The run report: one HTML page per run with PNG plots (matplotlib), stored with the artifacts.

Training curves and confusion matrices of every target, the TFLite comparison table, what was
deployed or published and why, step durations and cost. Pure: takes the run summary and the
targets' ``history.json``; writes ``index.html`` and the PNGs into a folder.
"""

from __future__ import annotations

import html
import os


def _plot_history(history: dict, title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        for key, style in ((metric, "-o"), (f"val_{metric}", "--s")):
            if history.get(key):
                ax.plot(range(1, len(history[key]) + 1), history[key], style, label=key, markersize=3)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_confusion(cm: list[list[int]], labels: list[str], title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(labels)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * n, 0.8 + 0.6 * n))
    ax.imshow(cm, cmap="Blues")
    # Class names are folder names, not TeX: "$x$" or "\\alpha" must print as written, not go through
    # mathtext (an unknown symbol there raises and would stop the summary).
    literal = {"parse_math": False, "usetex": False}
    ax.set_xticks(range(n), labels, rotation=45, ha="right", **literal)
    ax.set_yticks(range(n), labels, **literal)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    peak = max((max(r) for r in cm), default=0)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(cm[i][j]), ha="center", va="center",
                    color="white" if cm[i][j] > peak / 2 else "black", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _table(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _pct(x) -> str:
    return f"{x:.1%}" if isinstance(x, int | float) else "n/a"


def _alerts(summary: dict) -> list[str]:
    """What the reader must see first: the first failure, channels out of step, what could not be
    recorded, warnings, and what happens to this run's data next."""
    parts = []
    ff = summary.get("first_failure")
    if ff:
        parts.append(f"<div class='alert'><b>Failed at {html.escape(ff['task_id'])}</b>"
                     f"<pre>{html.escape(str(ff.get('message', '')))}</pre></div>")
    channels = summary.get("channels") or {}
    if channels.get("warnings"):
        parts.append("<div class='alert'><b>Channels out of step</b><ul>"
                     + "".join(f"<li>{html.escape(w)}</li>" for w in channels["warnings"]) + "</ul></div>")
    lists = (("Not recorded", summary.get("recording_errors")), ("Warnings", summary.get("warnings")))
    for title, items in lists:
        if items:
            parts.append(f"<p><b>{title}</b></p><ul>" + "".join(f"<li>{html.escape(w)}</li>" for w in items)
                         + "</ul>")
    if (summary.get("ledger") or {}).get("note"):
        parts.append(f"<p>Data ledger: {html.escape(summary['ledger']['note'])}</p>")
    return parts


def write_report(summary: dict, histories: dict[str, dict], out_dir: str) -> dict:
    """Write ``index.html`` and its PNGs into ``out_dir``; returns {"html": path, "images": [paths]}."""
    os.makedirs(out_dir, exist_ok=True)
    images: list[str] = []
    parts = [
        f"<h1>dual_deployment run {html.escape(summary['run_id'])}</h1>",
        f"<p>platform <b>{html.escape(summary['platform'])}</b> &middot; status "
        f"<b class='{summary['status']}'>{summary['status'].upper()}</b> &middot; artifacts "
        f"<code>{html.escape(summary.get('artifacts_uri', ''))}</code></p>",
    ]
    parts += _alerts(summary)
    split = summary.get("split") or {}
    if split:
        parts.append(f"<p>{len(split.get('labels', []))} classes; split {html.escape(str(split.get('counts')))}; "
                     f"split fingerprint <code>{html.escape(str(split.get('fingerprint')))}</code></p>")

    rows = []
    for name, t in summary["targets"].items():
        m = t.get("metrics") or {}
        rows.append([name, t["kind"], t["status"], _pct(m.get("accuracy")), _pct(m.get("macro_f1")),
                     t.get("decision", {}).get("reason", "") if isinstance(t.get("decision"), dict) else ""])
    parts.append("<h2>Targets</h2>" + _table(["target", "kind", "status", "test accuracy", "macro F1", "decision"], rows))

    for name, t in summary["targets"].items():
        parts.append(f"<h2>{html.escape(name)}</h2>")
        if histories.get(name):
            fn = f"{name}_training.png"
            _plot_history(histories[name], f"{name}: training curves", os.path.join(out_dir, fn))
            images.append(fn)
            parts.append(f"<img src='{fn}' alt='{name} training curves'>")
        m = t.get("metrics") or {}
        if m.get("confusion_matrix"):
            fn = f"{name}_confusion.png"
            _plot_confusion(m["confusion_matrix"], m["labels"], f"{name}: confusion matrix (test)",
                            os.path.join(out_dir, fn))
            images.append(fn)
            parts.append(f"<img src='{fn}' alt='{name} confusion matrix'>")
        trained = t.get("training") or {}
        if trained.get("method") == "automl":
            parts.append(f"<p>Vertex AI AutoML <b>{html.escape(str(trained.get('model_type')))}</b>: "
                         f"{trained.get('cost_milli_node_hours')} of {trained.get('budget_milli_node_hours')} milli "
                         f"node hours used ({html.escape(str(trained.get('stop_reason')))}); training pipeline "
                         f"<code>{html.escape(str(trained.get('training_pipeline_name')))}</code>, model "
                         f"<code>{html.escape(str(trained.get('model')))}</code>.</p>")
        if t.get("tflite"):
            x = t["tflite"]
            reference = "exported SavedModel" if x.get("source") == "automl_export" else "Keras"
            parts.append(f"<h3>TFLite vs {reference}</h3>" + _table(
                ["mode", "size (MB)", "Keras acc.", "TFLite acc.", "delta", "top-1 agreement", "latency mean / p95 (ms)"],
                [[x.get("mode"), f"{x.get('size_bytes', 0) / 1e6:.2f}", _pct(x.get("keras_accuracy")),
                  _pct(x.get("tflite_accuracy")), f"{(x.get('accuracy_delta') or 0) * 100:+.1f} pt",
                  _pct(x.get("top1_agreement")),
                  f"{x.get('latency_ms_mean', 0):.2f} / {x.get('latency_ms_p95', 0):.2f}"]]))
        delivered = []
        if t.get("endpoint"):
            e = t["endpoint"]
            delivered.append(f"deployed model version {e.get('model_version_id')} to {e.get('prediction_url')}")
        if t.get("published"):
            p = t["published"]
            delivered.append(f"published {p.get('display_name')} version {p.get('version')} ({p.get('backend')})")
        if isinstance(t.get("decision"), dict):
            delivered.append(f"gate: {t['decision'].get('reason')}")
        for step in t.get("failed_steps") or []:
            step = step if isinstance(step, dict) else {"task_id": step, "message": ""}
            delivered.append(f"not delivered: {step['task_id']} failed: {step.get('message', '')}")
        if t.get("not_run"):
            delivered.append(f"not run: {', '.join(t['not_run'])}")
        if delivered:
            parts.append("<ul>" + "".join(f"<li>{html.escape(d)}</li>" for d in delivered) + "</ul>")

    comparison = summary.get("comparison")
    if comparison:
        rows = [[r["target"], "this run" if r["this_run"] else r["run_id"], r["method"], r.get("model") or "",
                 _pct(r.get("accuracy")), _pct(r.get("macro_f1")),
                 f"{r['tflite_size_bytes'] / 1e6:.2f}" if r.get("tflite_size_bytes") else "",
                 f"{r['tflite_latency_ms_p95']:.2f}" if r.get("tflite_latency_ms_p95") is not None else "",
                 _pct(r.get("tflite_agreement")) if r.get("tflite_agreement") is not None else "",
                 f"{r['training_s']:.0f}" if r.get("training_s") is not None else "",
                 f"{r['training_usd']:.2f}" if r.get("training_usd") is not None else ""] for r in comparison["rows"]]
        parts.append("<h2>AutoML vs custom training (same test split)</h2>" + _table(
            ["target", "run", "method", "model", "test accuracy", "macro F1", "TFLite MB", "TFLite p95 ms",
             "TFLite agreement", "training s", "training USD"], rows)
            + f"<p>Every model scored on split <code>{html.escape(str(comparison['split_fingerprint']))}</code>. "
              "Training USD: custom = measured training time x the configured machines; AutoML = the node hours the "
              "training pipeline reports x AutoML's node-hour price (locally both are estimates of Vertex AI "
              "prices). AutoML's TFLite agreement is with its exported SavedModel, custom's with its Keras model.</p>")

    steps = [[tid, s.get("state"), f"{s['duration_s']:.1f}" if s.get("duration_s") is not None else ""]
             for tid, s in summary.get("steps", {}).items()]
    parts.append("<h2>Steps</h2>" + _table(["task", "state", "duration (s)"], steps))

    cost = summary.get("cost")
    if cost:
        rows = []
        for name, c in cost["targets"].items():
            tr = c.get("training") or {}
            sv = c.get("serving") or {}
            rows.append([name, tr.get("machine_type", ""), tr.get("accelerator") or "", f"{tr.get('hours', 0):.3f}",
                         f"{tr.get('usd', 0):.4f}", f"{sv['hourly_usd']:.3f} / {sv['monthly_usd']:.0f}" if sv else ""])
        label = " (estimate: local durations priced as Vertex AI machines)" if cost.get("estimate_only") else ""
        ref = cost.get("reference") or {}
        parts.append(f"<h2>Cost{html.escape(label)}</h2>" + _table(
            ["target", "machine", "accelerator", "train hours", f"train {cost['currency']}", "serving $/h / $/month"], rows)
            + f"<p>Training total: {cost['training_total_usd']:.4f} {cost['currency']}. Original project: custom "
              f"training ~${ref.get('custom_training_two_models_usd', '?')}, AutoML ~${ref.get('automl_training_two_models_usd', '?')} "
              "for the two models.</p>")

    style = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto}table{border-collapse:collapse;margin:.5em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}.success{color:#1a7f37}.failed{color:#cf222e}"
             "img{max-width:100%;margin:.3em 0}.alert{border-left:4px solid #cf222e;padding:.2em .8em;margin:.5em 0}"
             "pre{white-space:pre-wrap}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>run {html.escape(summary['run_id'])}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")
    path = os.path.join(out_dir, "index.html")
    with open(path, "w") as f:
        f.write(page)
    return {"html": path, "images": images}

"""Helpers shared by the benchmarks: paths, environments, statistics, sample data, machine info
and the README performance table. Standard library only (importable without TensorFlow/Airflow).
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "bench"
RESULTS_FILE = BENCH_DIR / "results.json"
README = ROOT / "README.md"
MARK_START = "<!-- bench:start -->"
MARK_END = "<!-- bench:end -->"
HEAVY_MODULES = ("tensorflow", "keras", "ai_edge_litert", "firebase_admin.ml", "google.cloud.aiplatform")
LOAD_THRESHOLD = 2.0  # 1-minute load average above which figures are flagged as taken under load


def setup_paths() -> None:
    """Make ``dualml`` / ``dual_deploy`` importable when a bench module runs as a script."""
    for p in (ROOT / "include", ROOT / "plugins", BENCH_DIR):
        if str(p) not in sys.path:
            sys.path.insert(0, str(p))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a Python child that imports dualml / dual_deploy."""
    env = dict(os.environ)
    paths = [str(ROOT / "include"), str(ROOT / "plugins")]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.update(extra or {})
    return env


def local_env(state_dir: str) -> dict[str, str]:
    """The environment ``scripts/local_env.sh`` sets up, with ``STATE_DIR`` redirected to ``state_dir``."""
    out = subprocess.run(
        ["bash", "-c", 'source scripts/local_env.sh >/dev/null && env -0'],
        cwd=ROOT,
        env={**os.environ, "STATE_DIR": state_dir},
        capture_output=True,
        check=True,
    ).stdout
    env = {}
    for item in out.split(b"\0"):
        if b"=" in item:
            k, v = item.split(b"=", 1)
            env[k.decode()] = v.decode()
    return env


# --- statistics -----------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize_ms(seconds: Sequence[float]) -> dict:
    """Latency summary in milliseconds from a list of durations in seconds."""
    ms = [s * 1000.0 for s in seconds]
    return {
        "n": len(ms),
        "mean_ms": statistics.fmean(ms),
        "p50_ms": percentile(ms, 50),
        "p95_ms": percentile(ms, 95),
        "p99_ms": percentile(ms, 99),
        "min_ms": min(ms),
        "max_ms": max(ms),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def run_bounded(fn: Callable[[], None], *, count: int, seconds: float, concurrency: int = 1) -> tuple[list, float]:
    """Call ``fn`` up to ``count`` times in total from ``concurrency`` threads, stopping early at
    ``seconds``. Returns (per-call durations in seconds, wall seconds)."""
    import threading

    lock = threading.Lock()
    remaining = [count]
    durations: list[float] = []
    errors: list[BaseException] = []
    deadline = time.perf_counter() + seconds

    def worker():
        while True:
            with lock:
                if remaining[0] <= 0 or time.perf_counter() > deadline or errors:
                    return
                remaining[0] -= 1
            t0 = time.perf_counter()
            try:
                fn()
            except BaseException as e:  # surfaced after the threads stop
                with lock:
                    errors.append(e)
                return
            dt = time.perf_counter() - t0
            with lock:
                durations.append(dt)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 120)
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return durations, wall


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


# --- data -------------------------------------------------------------------------------------


def ensure_sample_data(data_dir: str | os.PathLike, per_class: int = 60) -> str:
    """The generated sample dataset (dualml.sample_data, the one ``make run`` uses) in ``data_dir``."""
    setup_paths()
    from dualml import sample_data

    data_dir = Path(data_dir)
    if not any(data_dir.glob("*/*.jpg")):
        sample_data.generate(data_dir, per_class=per_class)
    return str(data_dir)


def local_split(data_dir: str):
    """The train/val/test split the local platform would stage for ``data_dir`` (config fractions, seed)."""
    setup_paths()
    from dual_deploy.config import load_config
    from dualml import dataset

    cfg = load_config(platform="local")
    return dataset.stratified_split(
        dataset.list_image_folder(data_dir),
        val_fraction=cfg.data.val_fraction,
        test_fraction=cfg.data.test_fraction,
        seed=cfg.data.seed,
        data_root=data_dir,
    )


def local_image_sizes() -> dict[str, int]:
    """architecture -> image size of the local platform's targets."""
    setup_paths()
    from dual_deploy.config import load_config

    cfg = load_config(platform="local")
    return {t.architecture: t.training.image_size for t in cfg.targets}


# --- machine -----------------------------------------------------------------------------------


def _dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict:
    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        m = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
        mem_gib = round(int(m.group(1)) / 1024 / 1024, 1) if m else None
    except OSError:
        pass
    try:
        nproc = int(subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout)
    except (OSError, ValueError, subprocess.CalledProcessError):
        nproc = os.cpu_count()
    load1, load5, load15 = os.getloadavg()
    return {
        "nproc": nproc,
        "memory_gib": mem_gib,
        "cpu_model": cpu_model or platform.processor() or platform.machine(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "tensorflow": _dist_version("tensorflow"),
        "keras": _dist_version("keras"),
        "ai_edge_litert": _dist_version("ai-edge-litert"),
        "airflow": _dist_version("apache-airflow"),
        "load_average_at_start": [round(load1, 2), round(load5, 2), round(load15, 2)],
        "under_load": load1 > LOAD_THRESHOLD,
    }


def machine_line(m: dict) -> str:
    return f"{m.get('cpu_model')}, {m.get('nproc')} CPU cores, {m.get('memory_gib')} GiB RAM"


def now_iso() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat()


# --- README table ------------------------------------------------------------------------------


def _f(x, fmt: str = "{:.2f}", none: str = "n/a") -> str:
    if x is None:
        return none
    try:
        return fmt.format(x)
    except (TypeError, ValueError):
        return str(x)


def _pct(x) -> str:
    return _f(None if x is None else 100.0 * x, "{:.1f} %")


def _x(x) -> str:
    return _f(x, "{:.2f}x")


def render_table(results: dict) -> str:
    """The markdown block that goes between the README markers (intro sentence + tables)."""
    m = results.get("machine", {})
    date = (results.get("date") or "")[:10]
    lines = [
        f"Measured by `make bench` on {date}, {machine_line(m)}; Python {m.get('python')}, "
        f"TensorFlow {m.get('tensorflow')}, Airflow {m.get('airflow')}"
        + (" (quick variant)" if results.get("quick") else "")
        + ". All figures in `bench/results.json`.",
    ]
    if m.get("under_load"):
        la = m.get("load_average_at_start") or ["?"]
        lines[0] += (
            f" **Taken under load** (1-min load average {la[0]} on {m.get('nproc')} cores when the run started):"
            " absolute figures are pessimistic, the side-by-side ratios are the ones to compare."
        )
    lines += ["", "| benchmark | measured | compared with | ratio |", "|---|---|---|---|"]
    rows: list[tuple[str, str, str, str]] = []
    b = results.get("benchmarks", {})

    rows += _parse_rows(b.get("parse_time") or {})
    rows += _task_startup_rows(b.get("task_startup") or {})
    rows += _service_startup_rows(b.get("service_startup") or {})

    e2e = b.get("e2e") or {}
    if e2e.get("error"):
        e2e = {**e2e, "error": str(e2e["error"])[:200]}
    if e2e.get("skipped"):
        rows.append(("local end-to-end (`make run`)", f"skipped ({e2e['skipped']})", "", ""))
    elif e2e.get("error"):
        rows.append(("local end-to-end (`make run`)", f"error: {e2e['error']}", "", ""))
    elif e2e:
        rows.append((
            "local end-to-end (`make run`, fresh state)",
            f"{_f(e2e.get('wall_s'), '{:.0f} s')} wall ({e2e.get('status')}; target <= 180 s: "
            f"{'met' if (e2e.get('wall_s') or 1e9) <= 180 else 'MISSED'})"
            + (f"; test accuracy {', '.join(f'{t} {_pct(a)}' for t, a in e2e['accuracy'].items())}"
               if e2e.get("accuracy") else ""),
            f"sum of DAG task durations {_f(e2e.get('dag_steps_s'), '{:.0f} s')}" if e2e.get("dag_steps_s") else "",
            f"DAG tasks {_pct(ratio(e2e.get('dag_steps_s'), e2e.get('wall_s')))} of wall"
            if e2e.get("dag_steps_s") else "",
        ))
        rows += _e2e_breakdown_rows(e2e)

    tt = b.get("training_throughput") or {}
    if tt.get("error"):
        rows.append(("training throughput", f"error: {tt['error']}", "", ""))
    for mm in tt.get("models", []):
        aug = ""
        if mm.get("no_augmentation_img_s") is not None:
            aug = (f"; without augmentation {_f(mm.get('no_augmentation_img_s'), '{:.1f} img/s')} "
                   f"({_x(mm.get('ratio_no_augmentation_vs_in_memory'))})")
        rows.append((
            f"training {mm['architecture']} {mm['image_size']} px, batch {mm['batch_size']}",
            f"input pipeline {_f(mm.get('pipeline_img_s'), '{:.1f} img/s')}{aug}"
            + (f"; load {mm['load_average_1m'][0]}-{mm['load_average_1m'][1]}" if mm.get("load_average_1m") else ""),
            f"in-memory tensors {_f(mm.get('in_memory_img_s'), '{:.1f} img/s')}",
            _x(mm.get("ratio_pipeline_vs_in_memory")),
        ))
    rows += _trainer_rows(b.get("trainer_profile") or {})

    tl = b.get("tflite_modes") or {}
    if tl.get("error"):
        rows.append(("TFLite", f"error: {tl['error']}", "", ""))
    elif tl:
        k = tl.get("keras") or {}
        rows.append((
            f"Keras {tl.get('architecture')} {tl.get('image_size')} px (reference)",
            f"{_f(k.get('size_mb'), '{:.2f} MB')}, batch-1 {_f(k.get('latency_ms_mean'), '{:.2f}')}/"
            f"{_f(k.get('latency_ms_p95'), '{:.2f} ms')} mean/p95, accuracy {_pct(k.get('accuracy'))}",
            f"test split, {tl.get('num_examples')} images",
            "",
        ))
        for md in tl.get("modes", []):
            if md.get("error"):
                rows.append((f"TFLite `{md['mode']}`", f"error: {md['error']}", "", ""))
                continue
            rows.append((
                f"TFLite `{md['mode']}`",
                f"{_f(md.get('size_mb'), '{:.2f} MB')}, {_f(md.get('latency_ms_mean'), '{:.2f}')}/"
                f"{_f(md.get('latency_ms_p95'), '{:.2f} ms')} mean/p95, accuracy {_pct(md.get('accuracy'))}, "
                f"agreement {_pct(md.get('agreement'))}",
                "size vs float32; latency vs Keras batch-1",
                f"size {_x(md.get('size_ratio_vs_float32'))}, latency {_x(md.get('latency_ratio_vs_keras'))}",
            ))

    ep = b.get("endpoint_latency") or {}
    if ep.get("error"):
        rows.append(("endpoint", f"error: {ep['error']}", "", ""))
    rows += _endpoint_rows(ep)

    for r in rows:
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in r) + " |")
    notes = list(results.get("notes") or [])
    carried = {k: v["carried_over_from"] for k, v in b.items() if isinstance(v, dict) and v.get("carried_over_from")}
    notes += [f"`{k}`: not re-run; figures from the run of {d[:10]}." for k, d in carried.items()]
    if notes:
        lines.append("")
        lines += [f"- {n}" for n in notes]
    return "\n".join(lines)


def _met(targets: dict, name: str) -> str:
    t = targets.get(name)
    if not t or t.get("met") is None:
        return ""
    return f" (target {t['limit']}: {'met' if t['met'] else 'MISSED'})"


def _load(level: dict) -> str:
    la = level.get("load_average_1m")
    return f"; load {la[0]}-{la[1]}" if la else ""


def _endpoint_rows(ep: dict) -> list[tuple[str, str, str, str]]:
    """Endpoint rows: 1 and 8 clients side by side with the in-process signature, then the soak."""
    rows = []
    targets = ep.get("targets") or {}
    name = f"endpoint {ep.get('architecture')} {ep.get('image_size')} px"
    for c in ep.get("concurrency", []):
        h, p = c.get("http") or {}, c.get("in_process") or {}
        health = c.get("http_health") or {}
        extra = f"; `GET /health` p50 {_f(health.get('p50_ms'), '{:.1f} ms')}" if health else ""
        batch = (c.get("server") or {}).get("mean_batch_size")
        extra += f"; server batch {_f(batch, '{:.1f}')} mean" if batch and c["clients"] > 1 else ""
        ratio_txt = f"p50 {_x(c.get('p50_ratio'))}{_met(targets, 'p50_ratio_1_client') if c['clients'] == 1 else ''}, "
        ratio_txt += f"throughput {_x(c.get('throughput_ratio'))}"
        if c["clients"] == 8:
            ratio_txt += _met(targets, "throughput_ratio_8_clients")
            ratio_txt += f"; HTTP p99/p50 {_f(c.get('http_p99_over_p50'))}{_met(targets, 'p99_over_p50_8_clients')}"
        rows.append((
            f"{name}, {c['clients']} client(s)",
            f"HTTP p50/p99 {_f(h.get('p50_ms'), '{:.1f}')}/{_f(h.get('p99_ms'), '{:.1f} ms')}, "
            f"{_f(h.get('req_s'), '{:.1f} req/s')}{extra}{_load(c)}",
            f"in-process (batch 1{' from ' + str(c['clients']) + ' threads' if c['clients'] > 1 else ''}) "
            f"p50/p99 {_f(p.get('p50_ms'), '{:.1f}')}/{_f(p.get('p99_ms'), '{:.1f} ms')}, "
            f"{_f(p.get('req_s'), '{:.1f} calls/s')}",
            ratio_txt,
        ))
    soak = ep.get("soak") or {}
    if soak:
        ok, health, rss, st = soak.get("ok") or {}, soak.get("health") or {}, soak.get("rss_mb") or {}, soak.get("statuses") or {}
        control = soak.get("control_probe") or {}
        other = sum(v for k, v in st.items() if k not in ("200", "503_backpressure"))
        rows.append((
            f"{name}, {soak.get('clients')} clients for {_f(soak.get('seconds'), '{:.0f} s')}",
            f"{st.get('200', 0)} answered, {_f(ok.get('req_s'), '{:.1f} req/s')}, p50/p99 "
            f"{_f(ok.get('p50_ms'), '{:.0f}')}/{_f(ok.get('p99_ms'), '{:.0f} ms')}; back-pressure 503: "
            f"{st.get('503_backpressure', 0)}, other errors: {other}; server batch "
            f"{_f((soak.get('server') or {}).get('mean_batch_size'), '{:.1f}')} mean{_load(soak)}",
            f"RSS {_f(rss.get('start'), '{:.0f}')} -> {_f(rss.get('end'), '{:.0f} MB')} (peak "
            f"{_f(rss.get('peak'), '{:.0f} MB')}); `GET /health` every 0.1 s: p50/p99/max "
            f"{_f(health.get('p50_ms'), '{:.1f}')}/{_f(health.get('p99_ms'), '{:.1f}')}/"
            f"{_f(health.get('max_ms'), '{:.1f} ms')}" + (
                f" (same probe, trivial asyncio server at the same time: "
                f"{_f(control.get('p50_ms'), '{:.1f}')}/{_f(control.get('p99_ms'), '{:.1f}')}/"
                f"{_f(control.get('max_ms'), '{:.1f} ms')})" if control else ""),
            f"5xx {soak.get('server_5xx_other_than_backpressure')}{_met(targets, 'soak_5xx_and_connection_errors')}; "
            f"RSS {_pct(soak.get('rss_growth'))}{_met(targets, 'soak_rss_growth')}; "
            f"health max {_f(health.get('max_ms'), '{:.0f} ms')}{_met(targets, 'soak_health_max_ms')}",
        ))
    return rows


def _s(x, fmt: str = "{:.2f} s") -> str:
    return _f(x, fmt)


def _loads(la) -> str:
    return f"; load {la[0]}-{la[1]}" if la else ""


def _parse_rows(pt: dict) -> list[tuple[str, str, str, str]]:
    """One row per DAG file and platform: the dag-processor's per-parse time vs the provider's example DAG."""
    if pt.get("error"):
        return [("DAG parse time", f"error: {pt['error']}", "", "")]
    anchor = (pt.get("anchor") or {}).get("file")
    met = (pt.get("targets") or {}).get("met") or {}
    limit, margin = (pt.get("targets") or {}).get("steady_limit_s"), (pt.get("targets") or {}).get("anchor_margin_s")
    rows = []
    for plat, res in (pt.get("platforms") or {}).items():
        files = res.get("files") or {}
        a = files.get(anchor) or {}
        for name, f in files.items():
            if name == anchor:
                continue
            again = ", ".join(x for x in (f.get("packages_imported_per_parse") or []) if not x.startswith("unusual_prefix"))
            target = ""
            if plat == "gcp" and name in met:
                target = f" (target <= {limit} s and <= example + {margin} s: {'met' if met[name] else 'MISSED'})"
            rows.append((
                f"DAG parse `dags/{name}`, platform `{plat}` (dag-processor, median of {f.get('parses', 1) - 1} "
                f"parses after the first)",
                f"{_s(f.get('steady_parse_s'))} ({_s(f.get('steady_parse_s_min'))}-{_s(f.get('steady_parse_s_max'))}; "
                f"running the file {_s(f.get('steady_dag_file_s'))}, serializing {_s(f.get('steady_serialize_s'))}); "
                f"first parse {_s(f.get('first_parse_s'))} + {_s(f.get('first_pre_import_s'), '{:.1f} s')} pre-import "
                f"in the parent; each parse imports {f.get('modules_imported_per_parse')} modules itself ({again})"
                f"{_loads(f.get('load1_during'))}",
                f"provider example DAG `{anchor}` {_s(a.get('steady_parse_s'))} (running the file "
                f"{_s(a.get('steady_dag_file_s'))}, serializing {_s(a.get('steady_serialize_s'))}; first {_s(a.get('first_parse_s'))} + "
                f"{_s(a.get('first_pre_import_s'), '{:.1f} s')} pre-import)",
                f"{_f(f.get('steady_minus_anchor_s'), '{:+.2f} s')}, {_x(f.get('ratio_vs_anchor'))}{target}",
            ))
    return rows


def _task_startup_rows(ts: dict) -> list[tuple[str, str, str, str]]:
    """One row per operator class: fork to the end of the task runner's startup(), i.e. before execute()."""
    if ts.get("error"):
        return [("task start-up", f"error: {ts['error']}", "", "")]
    anchors = ts.get("anchors") or {}
    ex, floor = anchors.get("provider_example") or {}, anchors.get("floor") or {}
    compared = (f"provider example task `{ex.get('task_id')}` {_s(ex.get('startup_total_s'), '{:.1f} s')}; "
                f"one-EmptyOperator DAG {_s(floor.get('startup_total_s'), '{:.1f} s')}")
    rows = []
    for op in ts.get("operators") or []:
        heavy = ", ".join(op.get("heavy_imported") or []) or "none"
        rows.append((
            f"task start-up `{op['operator'].rsplit('.', 1)[-1]}` ({', '.join(t.split('.', 1)[1] for t in op['tasks'])})",
            f"{_s(op.get('startup_total_s'), '{:.1f} s')} before `execute()` (plugins {_s(op.get('plugins_s'))}, "
            f"DAG file parse {_s(op.get('parse_s'), '{:.1f} s')}); imports {heavy}{_loads(ts.get('load_average_1m'))}",
            compared,
            _x(op.get("ratio_vs_provider_example")),
        ))
    return rows


def _service_startup_rows(ss: dict) -> list[tuple[str, str, str, str]]:
    """GCS emulator and local Vertex AI server: what `make run` waits for, and the server process alone."""
    if ss.get("error"):
        return [("service start-up", f"error: {ss['error']}", "", "")]
    med, ratios = ss.get("median") or {}, ss.get("ratio_vs_http_server") or {}
    if not med:
        return []
    rows = []
    for key, what, cmd in (("gcs_emulator", "GCS emulator", "emulator-start"),
                           ("localcloud", "local Vertex AI server", "localcloud-start")):
        rows.append((
            f"{what} start-up (`local_platform {cmd}`, median of {ss.get('rounds')})",
            f"{_s(med.get(key + '_command_s'), '{:.1f} s')} until it answers (server process alone "
            f"{_s(med.get(key + '_server_s'), '{:.1f} s')}){_loads(ss.get('load_average_1m'))}",
            f"`python -m http.server` {_s(med.get('http_server_s'))}; `python -c pass` {_s(med.get('python_pass_s'))}",
            f"{_x(ratios.get(key + '_command_s'))} (server alone {_x(ratios.get(key + '_server_s'))})",
        ))
    return rows


def _e2e_breakdown_rows(e2e: dict) -> list[tuple[str, str, str, str]]:
    """Where `make run`'s seconds go: set-up steps, the slowest DAG tasks, each trainer's phases."""
    rows = []
    steps = e2e.get("script_steps_s") or {}
    if steps:
        rows.append(("`make run` steps (scripts/run_local.sh)",
                     "; ".join(f"{k} {v:.0f} s" for k, v in steps.items()), "", ""))
    if e2e.get("branches_s"):
        rows.append(("`make run` DAG run (target branches side by side)",
                     f"{_f(e2e.get('dag_run_s'), '{:.0f} s')} wall; "
                     + "; ".join(f"{k} branch {v:.0f} s" for k, v in e2e["branches_s"].items()), "", ""))
    tasks = sorted(((k, v) for k, v in (e2e.get("steps_s") or {}).items() if v), key=lambda kv: -kv[1])
    if tasks:
        rows.append(("`make run` DAG tasks (slowest first)",
                     "; ".join(f"{k} {v:.0f} s" for k, v in tasks[:10]), "", ""))
    for target, tp in sorted((e2e.get("trainer_phases") or {}).items()):
        ph = "; ".join(f"{k} {v:.1f}" for k, v in (tp.get("phases_s") or {}).items() if v is not None)
        rows.append((f"`make run` {target} trainer process (its own phases, s)",
                     f"{_f(tp.get('total_s'), '{:.0f} s')}: {ph}", "", ""))
    return rows


def _trainer_rows(tp: dict) -> list[tuple[str, str, str, str]]:
    """Trainer process rows: where the seconds of one `python -m dualml.trainer` go."""
    if tp.get("error"):
        return [("trainer process", f"error: {tp['error']}", "", "")]
    rows = []
    for m in tp.get("models", []):
        cur, base = m.get("current") or {}, m.get("baseline")
        ph = cur.get("phases") or {}

        def w(k: str, ph=ph) -> str:
            return _f((ph.get(k) or {}).get("wall_s"), "{:.1f}")

        export = sum((ph.get(k) or {}).get("wall_s") or 0 for k in ("export_savedmodel", "export_keras", "export_check"))
        loads = [x for run in cur.get("load_average_1m") or [] for x in run]
        load = f"; load {min(loads)}-{max(loads)}" if loads else ""
        args = " ".join(a.split("=", 1)[1] for a in m.get("args", []) if a.startswith(("--image-size", "--epochs")))
        acc = ", ".join(_pct(a) for a in cur.get("accuracy") or [])
        measured = (
            f"{_f(cur.get('wall_s'), '{:.0f} s')} wall, {_f(cur.get('cpu_s'), '{:.0f} s')} CPU: import {w('import')}, "
            f"data {w('data')}, build {w('build')}, first epoch {w('first_epoch')} (first step "
            f"{_f(cur.get('first_step_s'), '{:.1f}')}), later epochs {w('later_epochs')}, fit end {w('fit_other')}, "
            f"evaluate {w('evaluate')}, export {export:.1f} (check {w('export_check')}), write {w('write')}, "
            f"exit {w('exit')} s; test accuracy {acc}{load}"
        )
        if base:
            anchor = (f"before ({(tp.get('baseline_commit') or '?')[:7]}): {_f(base.get('wall_s'), '{:.0f} s')} wall, "
                      f"{_f(base.get('cpu_s'), '{:.0f} s')} CPU, first epoch "
                      f"{_f(((base.get('phases') or {}).get('first_epoch') or {}).get('wall_s'), '{:.1f} s')}, "
                      f"test accuracy {', '.join(_pct(a) for a in base.get('accuracy') or [])}")
            ratio_txt = f"wall {_x(m.get('ratio_wall_vs_baseline'))}, CPU {_x(m.get('ratio_cpu_vs_baseline'))}"
        else:
            anchor = f"steady-state training {_f(cur.get('steady_training_s'), '{:.0f} s')} (epochs x later-epoch mean)"
            ratio_txt = f"wall {_x(m.get('overhead_ratio'))} of it"
        rows.append((f"trainer process {m.get('architecture')} ({args.replace(' ', ' px, ', 1)} epochs; "
                     f"{tp.get('storage', '')})", measured, anchor, ratio_txt))
    return rows


def replace_block(text: str, block: str) -> str:
    """Put ``block`` between the bench markers of ``text``; add a ``## Performance`` section at the
    end when the markers are missing. Only the text between the markers changes."""
    start, end = text.find(MARK_START), text.find(MARK_END)
    if start != -1 and end != -1 and end > start:
        return text[: start + len(MARK_START)] + "\n" + block.strip("\n") + "\n" + text[end:]
    if start != -1 or end != -1:
        raise ValueError(f"README has only one of {MARK_START} / {MARK_END}; fix the markers by hand")
    section = f"## Performance\n\n{MARK_START}\n{block.strip(chr(10))}\n{MARK_END}\n"
    return text.rstrip("\n") + "\n\n" + section


def update_readme(results: dict, readme: Path = README) -> None:
    readme.write_text(replace_block(readme.read_text(), render_table(results)))


def write_json(path: str | os.PathLike, obj) -> None:
    Path(path).write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def emit(result: dict, out: str | None) -> None:
    """Print a benchmark's result as JSON and, with ``--out``, write it for run_all.py."""
    text = json.dumps(result, indent=1)
    if out:
        Path(out).write_text(text)
    print(text)

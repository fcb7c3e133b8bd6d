"""``make bench``: run every benchmark, write ``bench/results.json`` and the README performance table.

Each benchmark runs in its own Python process (``bench/<name>.py --out ...``) so TensorFlow state,
threads and memory of one never leak into the next; a failing benchmark is recorded with its error
and the others still run. Order: parse_time, task_startup, service_startup, training_throughput,
trainer_profile, tflite_modes, endpoint_latency, e2e (``--skip-e2e`` leaves it out and keeps the previous run's e2e
figure, marked with its date).

``python bench/run_all.py [--quick] [--skip-e2e] [--only a,b] [--no-readme]``
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib

BENCHMARKS = ("parse_time", "task_startup", "service_startup", "training_throughput", "trainer_profile",
              "tflite_modes", "endpoint_latency", "e2e")
USES_DATA = {"training_throughput", "trainer_profile", "tflite_modes", "endpoint_latency"}
TIMEOUT_S = {"e2e": 50 * 60, "trainer_profile": 60 * 60}
DEFAULT_TIMEOUT_S = 30 * 60
NOTES = [
    "Ratios are taken within one run, the two sides measured alternately (medians, warm-up excluded).",
    "TFLite latency: LiteRT interpreter, 1 thread, batch 1 (as the DAG validates); the Keras reference "
    "runs batch 1 through `tf.function` on all cores. Sizes in MB = 10^6 bytes.",
    "Endpoint: `python -m dualml.serving` with Vertex's AIP_* environment and default settings (dynamic "
    "batching), loopback HTTP with keep-alive connections, one 128 px JPEG per request; in-process = the "
    "exported serving signature called with batch 1 on the same bytes from as many threads. Load = 1-minute "
    "load average before-after each row (2 cores shared with other work).",
    "DAG parse: a real `airflow dag-processor` over Composer's dags/ + plugins/ (scripts/composer_bundle.sh) plus "
    "the provider's Vertex AI example DAG (bench/anchors), parsed in the same loop; per-parse time = the manager's "
    "own (fork to result), min_file_process_interval 0, one parse at a time. The first parse's imports of "
    "`airflow.*` modules happen in the dag-processor's parent (pre-import), shown beside it.",
    "Task start-up: the task runner's `startup()` (plugins, DAG file parse, template context) in a process forked "
    "from a worker-like parent, gcp config, Composer layout: what a worker pays before `execute()`, per task.",
]


def run_one(name: str, work: Path, data_dir: str, quick: bool) -> dict:
    out = work / f"{name}.json"
    cmd = [sys.executable, str(benchlib.BENCH_DIR / f"{name}.py"), "--out", str(out)]
    if quick and name != "e2e":
        cmd.append("--quick")
    if name in USES_DATA:
        cmd += ["--data", data_dir]
    benchlib.log(f"=== {name}: {' '.join(cmd[1:])}")
    t0 = time.perf_counter()
    tail: collections.deque[str] = collections.deque(maxlen=40)
    proc = subprocess.Popen(cmd, cwd=benchlib.ROOT, env=benchlib.child_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, errors="replace")
    try:
        for line in proc.stderr:
            tail.append(line.rstrip())
            sys.stderr.write(line)
        rc = proc.wait(TIMEOUT_S.get(name, DEFAULT_TIMEOUT_S))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        rc = "timeout"
    duration = time.perf_counter() - t0
    if rc == 0 and out.is_file():
        res = json.loads(out.read_text())
    else:
        lines = [x for x in tail if x.strip()]
        res = {"error": f"{name} failed ({rc}): {lines[-1][:300] if lines else 'no output'}",
               "stderr_tail": "\n".join(lines[-25:])}
    res["bench_seconds"] = round(duration, 1)
    benchlib.log(f"=== {name}: {'ok' if 'error' not in res else 'FAILED'} in {duration:.0f} s")
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer runs and requests (a few minutes less)")
    p.add_argument("--skip-e2e", action="store_true", help="leave out the local end-to-end run")
    p.add_argument("--only", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    p.add_argument("--no-readme", action="store_true", help="do not touch README.md")
    p.add_argument("--results", default=str(benchlib.RESULTS_FILE), help="results file")
    a = p.parse_args(argv)
    names = [n.strip() for n in a.only.split(",")] if a.only else list(BENCHMARKS)
    unknown = set(names) - set(BENCHMARKS)
    if unknown:
        p.error(f"unknown benchmark(s) {sorted(unknown)}; choose from {', '.join(BENCHMARKS)}")
    if a.skip_e2e and "e2e" in names:
        names.remove("e2e")

    results_path = Path(a.results)
    previous = json.loads(results_path.read_text()) if results_path.is_file() else {}
    machine = benchlib.machine_info()
    results = {"date": benchlib.now_iso(), "machine": machine, "quick": a.quick, "benchmarks": {},
               "notes": list(NOTES)}
    if machine["under_load"]:
        la = machine["load_average_at_start"]
        results["notes"].insert(0, f"Taken under load: 1/5/15-min load average {la[0]}/{la[1]}/{la[2]} on "
                                   f"{machine['nproc']} cores when the run started (machine shared with other work).")
    benchlib.log(f"machine: {benchlib.machine_line(machine)}; load {machine['load_average_at_start']}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        work = Path(tmp)
        data_dir = benchlib.ensure_sample_data(work / "flowers")
        for name in names:
            results["benchmarks"][name] = run_one(name, work, data_dir, a.quick)
    results["total_seconds"] = round(time.perf_counter() - t0, 1)

    # Benchmarks not run this time keep their previous figures, marked with that run's date.
    for name in BENCHMARKS:
        if name in results["benchmarks"]:
            continue
        old = (previous.get("benchmarks") or {}).get(name)
        if old and not old.get("error") and not old.get("skipped"):
            results["benchmarks"][name] = {**old, "carried_over_from": old.get("carried_over_from")
                                           or previous.get("date", "?")}
        elif name == "e2e" and a.skip_e2e:
            results["benchmarks"][name] = {"skipped": "--skip-e2e"}
    benchlib.write_json(results_path, results)
    benchlib.log(f"wrote {results_path}")
    if not a.no_readme:
        benchlib.update_readme(results)
        benchlib.log(f"updated the performance table in {benchlib.README}")
    print(benchlib.render_table(results))
    failed = [n for n, r in results["benchmarks"].items() if r.get("error") and n in names]
    benchlib.log(f"done in {results['total_seconds']:.0f} s" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

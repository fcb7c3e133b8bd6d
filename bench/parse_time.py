"""DAG parse time per DAG file, each parse in a fresh Python process, vs a bare ``import airflow.sdk``.

For every ``dags/*.py`` a child process with the local platform's environment
(``scripts/local_env.sh``, state in a temporary folder) imports DagBag, then times
``DagBag(dag_folder=<that file>)`` - the file's own import, what the DAG processor pays and what
``dagbag_import_timeout`` bounds - and lists the heavy modules left in ``sys.modules``.
The baseline child times ``import airflow.sdk`` alone. Runs are interleaved (baseline, file 1,
file 2, ... per round) after one warm-up round; medians are reported, with the ratio file/baseline.

``python bench/parse_time.py [--runs N] [--out FILE]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib

CHILD_TIMEOUT_S = 300


def _child(target: str) -> None:
    """Runs inside the fresh process; prints one JSON line."""
    t0 = time.perf_counter()
    out: dict = {}
    if target == "baseline":
        import airflow.sdk  # noqa: F401

        out["import_s"] = time.perf_counter() - t0
    else:
        from airflow.dag_processing.dagbag import DagBag

        t1 = time.perf_counter()
        bag = DagBag(dag_folder=target)
        t2 = time.perf_counter()
        out.update(
            dagbag_import_s=t1 - t0,
            parse_s=t2 - t1,
            dag_ids=sorted(bag.dag_ids),
            import_errors={str(k): str(v)[-500:] for k, v in bag.import_errors.items()},
        )
    out["heavy_modules"] = [m for m in benchlib.HEAVY_MODULES if m in sys.modules]
    out["modules_loaded"] = len(sys.modules)
    print("BENCH_JSON " + json.dumps(out), flush=True)


def _spawn(target: str, env: dict) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--child", target],
        cwd=benchlib.ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
    )
    wall = time.perf_counter() - t0
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            res = json.loads(line[len("BENCH_JSON ") :])
            res["process_wall_s"] = wall
            return res
    raise RuntimeError(f"parse child for {target} exited {proc.returncode}: {proc.stderr[-1500:]}")


def run(runs: int = 5, dag_files: list[Path] | None = None) -> dict:
    files = dag_files or sorted((benchlib.ROOT / "dags").glob("*.py"))
    with tempfile.TemporaryDirectory(prefix="bench-parse-") as state:
        env = benchlib.local_env(state)
        env.pop("PYTHONDONTWRITEBYTECODE", None)  # .pyc caches as in a real deployment
        targets = ["baseline"] + [str(f) for f in files]
        samples: dict[str, list[dict]] = {t: [] for t in targets}
        for rnd in range(runs + 1):  # round 0 is the warm-up (disk cache, .pyc, airflow.cfg)
            for t in targets:
                res = _spawn(t, env)
                if rnd:
                    samples[t].append(res)
            benchlib.log(f"parse_time: round {rnd}/{runs} done")
    base = samples["baseline"]
    base_import = statistics.median(r["import_s"] for r in base)
    out = {
        "runs": runs,
        "method": "fresh subprocess per parse, local env; parse_s = DagBag(dag_folder=file) after DagBag is imported",
        "baseline": {
            "what": "import airflow.sdk",
            "import_s": base_import,
            "import_s_min": min(r["import_s"] for r in base),
            "import_s_max": max(r["import_s"] for r in base),
            "process_wall_s": statistics.median(r["process_wall_s"] for r in base),
            "heavy_modules": base[-1]["heavy_modules"],
        },
        "files": [],
    }
    for f in files:
        rs = samples[str(f)]
        parse = [r["parse_s"] for r in rs]
        out["files"].append({
            "file": f"dags/{f.name}",
            "runs": len(rs),
            "parse_s": statistics.median(parse),
            "parse_s_min": min(parse),
            "parse_s_max": max(parse),
            "dagbag_import_s": statistics.median(r["dagbag_import_s"] for r in rs),
            "process_wall_s": statistics.median(r["process_wall_s"] for r in rs),
            "ratio_vs_sdk": benchlib.ratio(statistics.median(parse), base_import),
            "ratio_process_wall_vs_sdk": benchlib.ratio(
                statistics.median(r["process_wall_s"] for r in rs), out["baseline"]["process_wall_s"]
            ),
            "heavy_modules": rs[-1]["heavy_modules"],
            "dag_ids": rs[-1]["dag_ids"],
            "import_errors": rs[-1]["import_errors"],
            "modules_loaded": rs[-1]["modules_loaded"],
        })
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="3 runs")
    p.add_argument("--out", help="write the result JSON here")
    a = p.parse_args(argv)
    if a.child:
        _child(a.child)
        return 0
    res = run(runs=3 if a.quick else a.runs)
    benchlib.emit(res, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Task start-up on a worker: what each task pays before ``execute()`` runs, vs the provider's example DAG.

On Composer (Celery) and with the LocalExecutor alike, a task runs in a process forked from the
worker's supervisor; that process imports the task runner, loads plugins (every ``.py`` under the
plugins folder not excluded by ``plugins/.airflowignore``, plus the providers' plugins), parses the
task's DAG file - with every import it makes: the dag-processor's pre-import does not help here - and
builds the template context. Only then does ``execute()`` start.

This benchmark does exactly that for every task of our DAGs, on a Composer-shaped bundle
(``scripts/composer_bundle.sh``) with the ``gcp`` platform's configuration: a long-lived "worker"
process that has imported what the supervisor has, forks one child per task, and the child calls the
task runner's own ``startup()`` (``airflow.sdk.execution_time.task_runner``) with the
``StartupDetails`` message a supervisor sends. Phases are timed by observing the task runner's
functions (``_get_plugins``: plugin loading; ``parse``: bundle + DAG file, what the task runner logs as
``dag_file_parse_ms``); the total runs from the fork to ``startup()`` returning. Anchors measured the
same way in the same run (after one unrecorded warm-up start per DAG file: page cache, .pyc files):
a task of the provider's Vertex AI example DAG
(``bench/anchors/example_vertex_ai_custom_job.py``) and a one-task DAG with an ``EmptyOperator``
(the floor every task pays). No metadata DB, no API server: ``startup()`` needs neither.

``python bench/task_startup.py [--rounds N] [--out FILE]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib
import parse_time

FLOOR_DAG = '''"""The floor: one EmptyOperator (bench/task_startup.py)."""
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import DAG

with DAG(dag_id="bench_floor", schedule=None):
    EmptyOperator(task_id="noop")
'''
ANCHOR_TASK = ("vertex_ai_custom_job_operations_custom", "custom_task")
CHILD_TIMEOUT_S = 30 * 60
HEAVY = parse_time.HEAVY


# --- inside the worker -------------------------------------------------------------------------------


def _worker(specs_file: str, records_file: str, rounds: int) -> None:
    """A worker-like parent: imports what the supervisor has, then forks one task process per spec."""
    import airflow.sdk.execution_time.supervisor  # noqa: F401 - loaded in every worker before a task forks

    plan = json.loads(Path(specs_file).read_text())
    specs = plan["specs"]
    for spec in plan["warmup"]:  # page cache and .pyc files, as on a worker that has run these DAGs before
        pid = os.fork()
        if pid == 0:
            try:
                _task_process(spec, time.perf_counter())
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
    for rnd in range(rounds):
        for seq, spec in enumerate(specs):
            t_fork = time.perf_counter()
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    res = _task_process(spec, t_fork)
                except BaseException as e:  # noqa: BLE001 - reported as the task's result
                    res, code = {"error": f"{type(e).__name__}: {e}"[-800:]}, 1
                res.update(task=spec["task_id"], dag_id=spec["dag_id"], round=rnd, seq=seq)
                with open(records_file, "a") as f:
                    f.write(json.dumps(res) + "\n")
                os._exit(code)
            _, status = os.waitpid(pid, 0)
            wall = time.perf_counter() - t_fork
            with open(records_file, "a") as f:
                f.write(json.dumps({"task": spec["task_id"], "dag_id": spec["dag_id"], "round": rnd, "seq": seq,
                                    "process_wall_s": wall, "exit": status}) + "\n")


def _task_process(spec: dict, t_fork: float) -> dict:
    """In the forked task process: the task runner's startup(), phases timed."""
    import uuid
    from datetime import UTC, datetime

    t_start = time.perf_counter()
    modules_before = set(sys.modules)
    from airflow.sdk import plugins_manager
    from airflow.sdk.api.datamodels._generated import BundleInfo, DagRun, TaskInstance, TIRunContext
    from airflow.sdk.execution_time import task_runner
    from airflow.sdk.execution_time.comms import StartupDetails

    t_imported = time.perf_counter()
    phases: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - t0
        return wrapper

    plugins_manager._get_plugins = timed("plugins_s", plugins_manager._get_plugins)
    task_runner.parse = timed("parse_s", task_runner.parse)

    now = datetime.now(UTC)
    run_id = f"manual__{now.isoformat()}"
    msg = StartupDetails(
        ti=TaskInstance(id=uuid.uuid4(), task_id=spec["task_id"], dag_id=spec["dag_id"], run_id=run_id,
                        try_number=1, dag_version_id=uuid.uuid4()),
        dag_rel_path=spec["rel_path"],
        bundle_info=BundleInfo(name="dags-folder"),
        start_date=now,
        ti_context=TIRunContext(
            dag_run=DagRun(dag_id=spec["dag_id"], run_id=run_id, logical_date=now, data_interval_start=now,
                           data_interval_end=now, run_after=now, start_date=now, end_date=None,
                           run_type="manual", state="running", consumed_asset_events=[], partition_key=None),
            max_tries=2),
        sentry_integration="",
    )
    ti, _context, _log = task_runner.startup(msg)
    t_done = time.perf_counter()
    new = sorted(set(sys.modules) - modules_before)
    return {
        "operator": f"{type(ti.task).__module__}.{type(ti.task).__name__}",
        "fork_to_child_s": t_start - t_fork,
        "task_runner_import_s": t_imported - t_start,
        "plugins_s": phases.get("plugins_s"),
        "parse_s": phases.get("parse_s"),
        "startup_total_s": t_done - t_fork,
        "modules_imported": len(new),
        "heavy_imported": sorted({h for h in HEAVY for m in new if m == h or m.startswith(h + ".")}),
        "load1": round(os.getloadavg()[0], 2),
    }


# --- the benchmark ----------------------------------------------------------------------------------


def _list_tasks(env: dict, dags: Path) -> list[dict]:
    """dag_id / task_id / operator of every task in the bundle, from a throwaway parse."""
    code = (
        "import json, sys\n"
        "from airflow.dag_processing.dagbag import DagBag\n"
        "bag = DagBag(dag_folder=sys.argv[1])\n"
        "assert not bag.import_errors, bag.import_errors\n"
        "print('TASKS ' + json.dumps([{'dag_id': d.dag_id, 'task_id': t.task_id, 'rel_path': d.relative_fileloc,\n"
        "    'operator': type(t).__name__} for d in bag.dags.values() for t in d.tasks]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(dags)], env=env, cwd=benchlib.ROOT, capture_output=True,
                          text=True, timeout=CHILD_TIMEOUT_S)
    for line in proc.stdout.splitlines():
        if line.startswith("TASKS "):
            return json.loads(line[6:])
    raise RuntimeError(f"listing the tasks failed ({proc.returncode}): {proc.stderr[-2000:]}")


def _order(tasks: list[dict]) -> list[dict]:
    """Anchors first and last (load drifts over minutes), our tasks in DAG order between them."""
    floor = [t for t in tasks if t["dag_id"] == "bench_floor"]
    anchor = [t for t in tasks if (t["dag_id"], t["task_id"]) == ANCHOR_TASK]
    ours = [t for t in tasks if t["dag_id"].startswith("dual_deployment")]
    if not floor or not anchor or not ours:
        raise RuntimeError(f"expected the floor, the anchor task {ANCHOR_TASK} and our DAGs' tasks, got {tasks}")
    return floor + anchor + ours + anchor + floor


def summarize(rows: list[dict], tasks: list[dict]) -> dict:
    done = {(r["seq"], r["round"]): r for r in rows if "process_wall_s" in r}
    out: dict = {"tasks": [], "anchors": {}}
    errors = [r for r in rows if r.get("error")]
    if errors:
        raise RuntimeError(f"task start-up failed for {errors[0]['dag_id']}.{errors[0]['task']}: {errors[0]['error']}")
    by_task: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if "startup_total_s" in r:
            r = {**r, "process_wall_s": done.get((r["seq"], r["round"]), {}).get("process_wall_s")}
            by_task.setdefault((r["dag_id"], r["task"]), []).append(r)

    def entry(key, rs):
        med = {k: statistics.median(x[k] for x in rs) for k in
               ("startup_total_s", "plugins_s", "parse_s", "task_runner_import_s", "fork_to_child_s")}
        return {"dag_id": key[0], "task_id": key[1], "operator": rs[0]["operator"], "samples": len(rs), **med,
                "heavy_imported": rs[-1]["heavy_imported"], "modules_imported": rs[-1]["modules_imported"],
                "load1": [min(x["load1"] for x in rs), max(x["load1"] for x in rs)]}

    seen = set()
    for t in tasks:
        key = (t["dag_id"], t["task_id"])
        if key in seen or key not in by_task:
            continue
        seen.add(key)
        e = entry(key, by_task[key])
        if t["dag_id"] == "bench_floor":
            out["anchors"]["floor"] = e
        elif key == ANCHOR_TASK:
            out["anchors"]["provider_example"] = e
        else:
            out["tasks"].append(e)
    base = out["anchors"]["provider_example"]["startup_total_s"]
    for e in out["tasks"]:
        e["ratio_vs_provider_example"] = benchlib.ratio(e["startup_total_s"], base)
    classes: dict[str, list[dict]] = {}
    for e in out["tasks"]:
        classes.setdefault(e["operator"], []).append(e)
    out["operators"] = [
        {"operator": op, "tasks": [f"{e['dag_id']}.{e['task_id']}" for e in es],
         "startup_total_s": statistics.median(e["startup_total_s"] for e in es),
         "plugins_s": statistics.median(e["plugins_s"] for e in es),
         "parse_s": statistics.median(e["parse_s"] for e in es),
         "heavy_imported": es[0]["heavy_imported"],
         "ratio_vs_provider_example": benchlib.ratio(statistics.median(e["startup_total_s"] for e in es), base)}
        for op, es in classes.items()
    ]
    return out


def run(rounds: int = 1) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        work = Path(tmp)
        dags, plugins = parse_time._bundle(work)
        (dags / "bench_floor.py").write_text(FLOOR_DAG)
        home = work / "airflow"
        home.mkdir()
        env = parse_time._airflow_env(parse_time._platform_env("gcp", work), home, dags, plugins)
        env["AIRFLOW__LOGGING__LOGGING_LEVEL"] = "ERROR"
        tasks = _list_tasks(env, dags)
        specs = _order(tasks)
        specs_file, records = work / "specs.json", work / "records.jsonl"
        warmup = list({t["rel_path"]: t for t in reversed(specs)}.values())  # one task per DAG file
        specs_file.write_text(json.dumps({"warmup": warmup, "specs": specs}))
        load_before = round(os.getloadavg()[0], 2)
        benchlib.log(f"task_startup: {len(specs)} task processes x {rounds} round(s) (load {load_before})")
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--worker", str(specs_file), str(records), str(rounds)],
                              env=env, cwd=benchlib.ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, timeout=CHILD_TIMEOUT_S)
        if proc.returncode:
            raise RuntimeError(f"worker exited {proc.returncode}: {proc.stderr[-2000:]}")
        rows = [json.loads(x) for x in records.read_text().splitlines() if x.strip()]
        out = summarize(rows, specs)
        out.update(
            method="per task: a process forked from a worker-like parent (supervisor imported) runs the task runner's "
                   "startup() with a StartupDetails message; Composer-shaped bundle, gcp config; total = fork to "
                   "startup() returned (plugins, DAG file parse, template context), i.e. before execute()",
            rounds=rounds, wall_s=time.perf_counter() - t0,
            load_average_1m=[load_before, round(os.getloadavg()[0], 2)],
        )
        return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    p.add_argument("--rounds", type=int, default=1, help="start-ups per task (each costs a full DAG import)")
    p.add_argument("--quick", action="store_true", help="1 round (the default)")
    p.add_argument("--out", help="write the result JSON here")
    a = p.parse_args(argv)
    if a.worker:
        _worker(a.worker[0], a.worker[1], int(a.worker[2]))
        return 0
    res = run(rounds=1 if a.quick else a.rounds)
    benchlib.emit(res, a.out)
    for e in res["tasks"]:
        benchlib.log(f"  {e['dag_id']}.{e['task_id']}: {e['startup_total_s']:.1f} s (plugins {e['plugins_s']:.1f}, "
                     f"parse {e['parse_s']:.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

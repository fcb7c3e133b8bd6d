"""Follow a DAG run: one line per finished task with its duration, and the overall elapsed time.

    python -m dual_deploy.progress db .state/airflow/airflow.db --dag dual_deployment   (make run)
    python -m dual_deploy.progress api --dag dual_deployment --run <run id>            (make up's stack)

Two sources of the same facts, Airflow's own task-instance records: the REST API of a running
api-server (``make trigger``), or the SQLite metadata database ``airflow dags test`` writes
(``make run``), read-only, for the next run of the DAG created after the follower started. Log
lines are not parsed: their wording changes between Airflow releases, the records do not.
Standard library only.
"""

from __future__ import annotations

import argparse
import signal
import sqlite3
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from dual_deploy.local_stack import LocalStack

FINISHED = {"success", "failed", "skipped", "upstream_failed", "removed"}
RUN_DONE = {"success", "failed"}


@dataclass(frozen=True)
class Task:
    task_id: str
    map_index: int
    state: str | None
    duration_s: float | None
    end: str | None  # ISO time, for ordering tasks that finished between two polls


@dataclass(frozen=True)
class Snapshot:
    run_id: str
    state: str | None
    tasks: list[Task]


class Source(Protocol):
    def snapshot(self) -> Snapshot | None: ...  # None: no run yet


class ApiSource:
    """A run of the local stack, through its REST API (GET .../taskInstances)."""

    def __init__(self, stack: LocalStack, dag_id: str, run_id: str):
        self.stack, self.dag_id, self.run_id = stack, dag_id, run_id

    def snapshot(self) -> Snapshot:
        run = self.stack.run(self.dag_id, self.run_id)
        tasks = [Task(ti["task_id"], ti.get("map_index", -1), ti["state"], ti.get("duration"), ti.get("end_date"))
                 for ti in self.stack.task_instances(self.dag_id, self.run_id)]
        return Snapshot(self.run_id, run["state"], tasks)


class DbSource:
    """The next run of ``dag_id`` in an Airflow SQLite database (what ``airflow dags test`` uses)."""

    def __init__(self, db: Path, dag_id: str):
        self.db, self.dag_id = Path(db), dag_id
        self.after_id = self._query("SELECT COALESCE(MAX(id), 0) FROM dag_run WHERE dag_id = ?", (dag_id,))
        self.after_id = self.after_id[0][0] if self.after_id else 0

    def _query(self, sql: str, params: tuple) -> list[tuple] | None:
        if not self.db.exists():
            return None
        try:
            con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5)
            try:
                return con.execute(sql, params).fetchall()
            finally:
                con.close()
        except sqlite3.OperationalError:  # no tables yet (before migrate), or a writer holds the lock
            return None

    def snapshot(self) -> Snapshot | None:
        runs = self._query("SELECT run_id, state FROM dag_run WHERE dag_id = ? AND id > ? ORDER BY id LIMIT 1",
                           (self.dag_id, self.after_id or 0))
        if not runs:
            return None
        run_id, state = runs[0]
        rows = self._query("SELECT task_id, map_index, state, duration, end_date FROM task_instance "
                           "WHERE dag_id = ? AND run_id = ?", (self.dag_id, run_id)) or []
        return Snapshot(run_id, state, [Task(*row) for row in rows])


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m:2d}:{s:02d}"


def task_line(task: Task, elapsed_s: float, width: int = 28) -> str:
    name = task.task_id if task.map_index in (-1, None) else f"{task.task_id}[{task.map_index}]"
    took = f"{task.duration_s:7.1f} s" if task.duration_s is not None else "      -  "
    return f"[{_clock(elapsed_s)}] {name:<{width}} {task.state:<15} {took}"


def follow(source: Source, out: Callable[[str], None] = print, interval_s: float = 2.0,
           stop: Callable[[], bool] = lambda: False) -> str | None:
    """Print each task as it finishes until the run is done (returns its state) or ``stop()`` says so
    (one last look first; returns the run's state then, or None when no run was seen)."""
    t0 = time.monotonic()
    printed: set[tuple[str, int]] = set()
    announced: str | None = None  # the run state last announced ("queued", "running")
    last: Snapshot | None = None
    while True:
        stopping = stop()
        try:
            snap = source.snapshot()
        except OSError:  # the API server restarting, a network hiccup: try again next poll
            snap = None
        if snap is not None:
            last = snap
            if snap.state in ("queued", "running") and snap.state != announced:
                what = "started" if snap.state == "running" else "queued (waits for an earlier run or a free slot)"
                out(f"[{_clock(time.monotonic() - t0)}] run {snap.run_id} {what}")
                announced = snap.state
            done = [t for t in snap.tasks if t.state in FINISHED and (t.task_id, t.map_index) not in printed]
            for task in sorted(done, key=lambda t: (t.end or "~", t.task_id)):
                out(task_line(task, time.monotonic() - t0))
                printed.add((task.task_id, task.map_index))
            if snap.state in RUN_DONE:
                out(f"[{_clock(time.monotonic() - t0)}] run {snap.run_id}: {snap.state} "
                    f"({len(printed)} tasks, {_clock(time.monotonic() - t0).strip()} elapsed)")
                return snap.state
        if stopping:
            return last.state if last else None
        time.sleep(interval_s)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dual_deploy.progress", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="source", required=True)
    d = sub.add_parser("db", help="the next run of --dag in an Airflow SQLite database (airflow dags test)")
    d.add_argument("path", type=Path)
    d.add_argument("--dag", required=True)
    a = sub.add_parser("api", help="a run of the local stack (make up), through its REST API")
    a.add_argument("--dag", required=True)
    a.add_argument("--run", required=True)
    a.add_argument("--state-dir", default=".state")
    p.add_argument("--interval", type=float, default=2.0)
    args = p.parse_args(argv)

    # SIGTERM (the caller's run ended): one last look, print what finished, exit.
    stopping = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stopping.update(now=True))
    if args.source == "db":
        source: Source = DbSource(args.path, args.dag)
    else:
        from dual_deploy.local_stack import LocalStack, Ports

        source = ApiSource(LocalStack(Path(args.state_dir), ports=Ports.from_env()), args.dag, args.run)
    try:
        state = follow(source, interval_s=args.interval, stop=lambda: stopping["now"])
    except KeyboardInterrupt:
        return 130
    sys.stdout.flush()
    return 0 if state in (None, "success") else 1


if __name__ == "__main__":
    sys.exit(main())

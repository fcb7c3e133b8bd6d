"""The pure parts of the benchmark suite (bench/benchlib.py): statistics, bounded runs and the
README performance table, and how parse_time / task_startup turn their records into figures. No
timings are asserted; nothing here imports TensorFlow or Airflow."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import benchlib  # noqa: E402
import e2e  # noqa: E402
import parse_time  # noqa: E402
import task_startup  # noqa: E402

FAKE = {
    "date": "2026-11-22T10:00:00+00:00",
    "quick": False,
    "machine": {
        "nproc": 2, "memory_gib": 23.4, "cpu_model": "Fake CPU @ 2.00GHz", "python": "3.11.9",
        "tensorflow": "2.21.0", "airflow": "3.3.2", "load_average_at_start": [4.2, 3.9, 3.3], "under_load": True,
    },
    "notes": ["a note"],
    "benchmarks": {
        "parse_time": {
            "anchor": {"file": "example.py"},
            "targets": {"steady_limit_s": 2.0, "anchor_margin_s": 0.3, "met": {"a.py": True, "b.py": False}},
            "platforms": {"gcp": {"files": {
                "a.py": {"parses": 8, "first_parse_s": 1.2, "first_pre_import_s": 9.5, "steady_parse_s": 0.5,
                         "steady_parse_s_min": 0.4, "steady_parse_s_max": 0.7, "modules_imported_per_parse": 40,
                         "packages_imported_per_parse": ["dual_deploy", "unusual_prefix_x_a"],
                         "steady_dag_file_s": 0.2, "steady_serialize_s": 0.15,
                         "load1_during": [4.0, 5.0], "steady_minus_anchor_s": 0.1, "ratio_vs_anchor": 1.25},
                "b.py": {"parses": 8, "first_parse_s": 20.0, "steady_parse_s": 12.0, "steady_minus_anchor_s": 11.6,
                         "ratio_vs_anchor": 30.0},
                "example.py": {"parses": 8, "first_parse_s": 0.3, "first_pre_import_s": 0.01, "steady_parse_s": 0.4,
                               "steady_dag_file_s": 0.05, "steady_serialize_s": 0.07},
            }}},
        },
        "task_startup": {
            "anchors": {"provider_example": {"task_id": "custom_task", "startup_total_s": 20.0},
                        "floor": {"task_id": "noop", "startup_total_s": 2.5}},
            "operators": [{"operator": "dual_deploy.operators.dataset.ValidateDatasetOperator",
                           "tasks": ["dual_deployment.validate_dataset"], "startup_total_s": 10.0, "plugins_s": 0.01,
                           "parse_s": 9.9, "heavy_imported": ["google.cloud.aiplatform"],
                           "ratio_vs_provider_example": 0.5}],
            "load_average_1m": [5.0, 6.0],
        },
        "service_startup": {
            "rounds": 3, "load_average_1m": [3.0, 4.0],
            "median": {"python_pass_s": 0.1, "http_server_s": 0.3, "gcs_emulator_command_s": 3.0,
                       "gcs_emulator_server_s": 0.6, "localcloud_command_s": 9.0, "localcloud_server_s": 8.0},
            "ratio_vs_http_server": {"gcs_emulator_command_s": 10.0, "gcs_emulator_server_s": 2.0,
                                     "localcloud_command_s": 30.0, "localcloud_server_s": 26.7},
        },
        "e2e": {"wall_s": 400.0, "status": "success", "dag_steps_s": 300.0, "carried_over_from": "2026-11-20T08:00:00",
                "accuracy": {"cloud": 0.9, "mobile": 0.8},
                "script_steps_s": {"GCS emulator on http://127.0.0.1:9023": 1.2, "running DAG dual_deployment": 350.0},
                "steps_s": {"cloud.train": 120.0, "mobile.train": 90.0, "validate_dataset": 2.0, "cloud.smoke": None},
                "trainer_phases": {"cloud": {"total_s": 100.0, "phases_s": {"data": 1.0, "train": 80.0}}},
                "dag_run_s": 340.0, "branches_s": {"cloud": 300.0, "mobile": 150.0}},
        "training_throughput": {"models": [
            {"architecture": "densenet121", "image_size": 64, "batch_size": 16, "pipeline_img_s": 40.0,
             "in_memory_img_s": 50.0, "ratio_pipeline_vs_in_memory": 0.8},
        ]},
        "tflite_modes": {
            "architecture": "mobilenet_v3_small", "image_size": 96, "num_examples": 45,
            "keras": {"size_mb": 3.77, "latency_ms_mean": 10.0, "latency_ms_p95": 12.0, "accuracy": 0.95},
            "modes": [
                {"mode": "float32", "size_mb": 3.77, "latency_ms_mean": 0.3, "latency_ms_p95": 0.4, "accuracy": 0.95,
                 "agreement": 1.0, "size_ratio_vs_float32": 1.0, "latency_ratio_vs_keras": 0.03},
                {"mode": "int8", "error": "ValueError: no"},
            ],
        },
        "endpoint_latency": {"architecture": "densenet121", "image_size": 64, "concurrency": [
            {"clients": 1, "http": {"p50_ms": 60.0, "p99_ms": 90.0, "req_s": 15.0},
             "in_process": {"p50_ms": 20.0, "p99_ms": 30.0, "req_s": 45.0}, "p50_ratio": 3.0,
             "throughput_ratio": 0.333},
        ]},
    },
}


@pytest.mark.parametrize("values", [[3.0], [1.0, 2.0], [5.0, 1.0, 4.0, 2.0, 3.0], list(np.linspace(0, 7, 101))])
@pytest.mark.parametrize("q", [0, 1, 50, 95, 99, 100])
def test_percentile_matches_numpy(values, q):
    assert benchlib.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_rejects_bad_input():
    with pytest.raises(ValueError):
        benchlib.percentile([], 50)
    with pytest.raises(ValueError):
        benchlib.percentile([1.0], 101)


def test_summarize_ms_and_ratio():
    s = benchlib.summarize_ms([0.001, 0.002, 0.003])
    assert s["n"] == 3
    assert s["p50_ms"] == pytest.approx(2.0)
    assert s["mean_ms"] == pytest.approx(2.0)
    assert s["min_ms"] == pytest.approx(1.0) and s["max_ms"] == pytest.approx(3.0)
    assert benchlib.ratio(1.0, 4.0) == 0.25
    assert benchlib.ratio(1.0, 0) is None and benchlib.ratio(None, 1.0) is None


def test_run_bounded_respects_count_and_concurrency():
    calls = []
    durations, wall = benchlib.run_bounded(lambda: calls.append(1), count=25, seconds=30, concurrency=8)
    assert len(calls) == 25 and len(durations) == 25 and wall >= 0


def test_run_bounded_stops_at_the_time_limit():
    import time

    durations, _ = benchlib.run_bounded(lambda: time.sleep(0.02), count=10_000, seconds=0.2, concurrency=2)
    assert 0 < len(durations) < 10_000


def test_run_bounded_reraises_errors():
    def boom():
        raise RuntimeError("server said 500")

    with pytest.raises(RuntimeError, match="500"):
        benchlib.run_bounded(boom, count=5, seconds=5, concurrency=2)


def test_render_table_rows():
    md = benchlib.render_table(FAKE)
    assert md.startswith("Measured by `make bench` on 2026-11-22, Fake CPU @ 2.00GHz, 2 CPU cores, 23.4 GiB RAM")
    assert "Taken under load" in md
    assert ("| DAG parse `dags/a.py`, platform `gcp` (dag-processor, median of 7 parses after the first) | 0.50 s "
            "(0.40 s-0.70 s; running the file 0.20 s, serializing 0.15 s); first parse 1.20 s + 9.5 s pre-import in "
            "the parent; each parse imports 40 modules itself (dual_deploy); load 4.0-5.0 | provider example DAG "
            "`example.py` 0.40 s (running the file 0.05 s, serializing 0.07 s; first 0.30 s + 0.0 s pre-import) | "
            "+0.10 s, 1.25x (target <= 2.0 s and <= example + 0.3 s: met) |") in md
    assert "| +11.60 s, 30.00x (target <= 2.0 s and <= example + 0.3 s: MISSED) |" in md
    assert "DAG parse `dags/example.py`" not in md, "the anchor is the comparison, not a row"
    assert ("| task start-up `ValidateDatasetOperator` (validate_dataset) | 10.0 s before `execute()` (plugins 0.01 s, "
            "DAG file parse 9.9 s); imports google.cloud.aiplatform; load 5.0-6.0 | provider example task "
            "`custom_task` 20.0 s; one-EmptyOperator DAG 2.5 s | 0.50x |") in md
    assert ("| GCS emulator start-up (`local_platform emulator-start`, median of 3) | 3.0 s until it answers (server "
            "process alone 0.6 s); load 3.0-4.0 | `python -m http.server` 0.30 s; `python -c pass` 0.10 s | "
            "10.00x (server alone 2.00x) |") in md
    assert "local Vertex AI server start-up (`local_platform localcloud-start`, median of 3) | 9.0 s" in md
    assert "| local end-to-end (`make run`, fresh state) | 400 s wall (success; target <= 180 s: MISSED); test accuracy " \
           "cloud 90.0 %, mobile 80.0 % | sum of DAG task durations 300 s |" in md
    assert "| `make run` steps (scripts/run_local.sh) | GCS emulator on http://127.0.0.1:9023 1 s; " \
           "running DAG dual_deployment 350 s |" in md
    assert "| `make run` DAG run (target branches side by side) | 340 s wall; cloud branch 300 s; mobile branch " \
           "150 s |" in md
    assert "| `make run` DAG tasks (slowest first) | cloud.train 120 s; mobile.train 90 s; validate_dataset 2 s |" in md
    assert "| `make run` cloud trainer process (its own phases, s) | 100 s: data 1.0; train 80.0 |" in md
    assert "`e2e`: not re-run; figures from the run of 2026-11-20." in md
    assert "| training densenet121 64 px, batch 16 | input pipeline 40.0 img/s | in-memory tensors 50.0 img/s | 0.80x |" in md
    assert "TFLite `float32`" in md and "TFLite `int8` | error: ValueError: no" in md
    assert "HTTP p50/p99 60.0/90.0 ms, 15.0 req/s" in md and "p50 3.00x, throughput 0.33x" in md
    assert "- a note" in md
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert all(line.count(" | ") == 3 for line in table[2:]), "every row has 4 cells"


def test_render_table_tolerates_missing_and_skipped_benchmarks():
    md = benchlib.render_table({"date": "2026-01-01", "machine": {}, "benchmarks": {"e2e": {"skipped": "--skip-e2e"}}})
    assert "skipped (--skip-e2e)" in md
    assert "Taken under load" not in md


def test_replace_block_only_between_markers():
    before = "# Title\n\nintro\n\n## Performance\n\n<!-- bench:start -->\nold table\n<!-- bench:end -->\n\n## After\ntext\n"
    out = benchlib.replace_block(before, "new table\n")
    assert out == before.replace("old table", "new table")
    assert benchlib.replace_block(out, "new table") == out  # idempotent


def test_replace_block_appends_a_section_when_markers_are_missing():
    out = benchlib.replace_block("# Title\n\ntext\n", "the table")
    assert out == "# Title\n\ntext\n\n## Performance\n\n<!-- bench:start -->\nthe table\n<!-- bench:end -->\n"


def test_replace_block_refuses_a_single_marker():
    with pytest.raises(ValueError, match="only one"):
        benchlib.replace_block("x\n<!-- bench:start -->\n", "t")


def test_update_readme_rewrites_the_file(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# dual-deploy\n")
    benchlib.update_readme(FAKE, readme)
    text = readme.read_text()
    assert text.startswith("# dual-deploy\n\n## Performance\n\n<!-- bench:start -->\nMeasured by `make bench`")
    assert text.rstrip().endswith("<!-- bench:end -->")


# --- the benchmarks' own summaries (pure: records in, figures out) ----------------------------------


def _parse(file, seconds, dags=1, errors=None):
    return {"kind": "parse", "file": file, "seconds": seconds, "dags": dags, "import_errors": errors or {}, "load1": 3.0}


def test_parse_summary_first_steady_and_anchor():
    rows = [
        {"kind": "pre_import", "file": "a.py", "seconds": 9.0, "new_modules": 2000},
        _parse("a.py", 1.5), _parse("x.py", 0.4),
        {"kind": "child_imports", "file": "a.py", "count": 2000, "heavy": ["google.cloud.aiplatform"], "top": [],
         "airflow": [], "dag_file_s": 1.0, "serialize_s": 0.3},
        {"kind": "pre_import", "file": "a.py", "seconds": 0.01, "new_modules": 0},
        {"kind": "child_imports", "file": "a.py", "count": 40, "heavy": ["firebase_admin"], "top": ["dual_deploy"],
         "airflow": [], "dag_file_s": 0.2, "serialize_s": 0.1},
        _parse("a.py", 0.6), _parse("x.py", 0.5), _parse("a.py", 0.8), _parse("x.py", 0.3), _parse("a.py", 0.7),
    ]
    out = parse_time.summarize(rows, ["a.py", "x.py"], anchor="x.py")
    a = out["a.py"]
    assert a["parses"] == 4 and a["first_parse_s"] == 1.5 and a["first_pre_import_s"] == 9.0
    assert a["steady_parse_s"] == 0.7 and a["steady_parse_s_min"] == 0.6 and a["steady_parse_s_max"] == 0.8
    assert a["heavy_imported_per_parse"] == ["firebase_admin"] and a["modules_imported_per_parse"] == 40
    assert a["steady_dag_file_s"] == 0.2 and a["steady_serialize_s"] == 0.1, "the first parse's phases are not steady"
    assert out["x.py"]["steady_parse_s"] == 0.4
    assert a["steady_minus_anchor_s"] == pytest.approx(0.3) and a["ratio_vs_anchor"] == pytest.approx(1.75)
    assert "steady_minus_anchor_s" not in out["x.py"]


@pytest.mark.parametrize("bad", [_parse("a.py", 0.1, errors={"a.py": "ModuleNotFoundError: boom"}),
                                 _parse("a.py", 0.1, dags=0)])
def test_parse_summary_refuses_a_file_that_did_not_parse(bad):
    # A parse that fails is fast: it must never pass for a good figure.
    rows = [_parse("a.py", 1.0), bad, _parse("x.py", 0.4)]
    with pytest.raises(RuntimeError, match="did not parse cleanly"):
        parse_time.summarize(rows, ["a.py", "x.py"], anchor="x.py")
    with pytest.raises(RuntimeError, match="never parsed"):
        parse_time.summarize([_parse("x.py", 0.4)], ["a.py", "x.py"], anchor="x.py")


def _spec(dag_id, task_id, rel="d.py"):
    return {"dag_id": dag_id, "task_id": task_id, "rel_path": rel, "operator": "Op"}


def _startup(seq, dag_id, task, total, op="pkg.Op"):
    return [{"task": task, "dag_id": dag_id, "round": 0, "seq": seq, "operator": op, "startup_total_s": total,
             "plugins_s": 0.01, "parse_s": total - 0.1, "task_runner_import_s": 0.01, "fork_to_child_s": 0.01,
             "modules_imported": 100, "heavy_imported": [], "load1": 4.0},
            {"task": task, "dag_id": dag_id, "round": 0, "seq": seq, "process_wall_s": total + 0.05, "exit": 0}]


def test_task_startup_order_and_summary():
    tasks = [_spec("dual_deployment", "validate_dataset"), _spec("dual_deployment", "cloud.train"),
             _spec("bench_floor", "noop"), _spec(*task_startup.ANCHOR_TASK)]
    order = task_startup._order(tasks)
    assert [t["task_id"] for t in order] == ["noop", "custom_task", "validate_dataset", "cloud.train",
                                             "custom_task", "noop"]
    rows = (_startup(0, "bench_floor", "noop", 2.0, "x.EmptyOperator")
            + _startup(1, *task_startup.ANCHOR_TASK, 30.0, "x.CreateCustomTrainingJobOperator")
            + _startup(2, "dual_deployment", "validate_dataset", 10.0, "dd.ValidateDatasetOperator")
            + _startup(3, "dual_deployment", "cloud.train", 14.0, "dd.VertexCustomJobOperator")
            + _startup(4, *task_startup.ANCHOR_TASK, 20.0, "x.CreateCustomTrainingJobOperator")
            + _startup(5, "bench_floor", "noop", 3.0, "x.EmptyOperator"))
    out = task_startup.summarize(rows, order)
    assert out["anchors"]["provider_example"]["startup_total_s"] == 25.0  # first and last sample
    assert out["anchors"]["provider_example"]["samples"] == 2 and out["anchors"]["floor"]["startup_total_s"] == 2.5
    assert [(t["task_id"], t["startup_total_s"]) for t in out["tasks"]] == [("validate_dataset", 10.0),
                                                                           ("cloud.train", 14.0)]
    assert out["tasks"][0]["ratio_vs_provider_example"] == pytest.approx(0.4)
    assert [o["operator"] for o in out["operators"]] == ["dd.ValidateDatasetOperator", "dd.VertexCustomJobOperator"]
    assert out["operators"][1]["tasks"] == ["dual_deployment.cloud.train"]


def test_task_startup_needs_its_anchors_and_reports_a_failed_start():
    with pytest.raises(RuntimeError, match="anchor"):
        task_startup._order([_spec("dual_deployment", "validate_dataset")])
    tasks = task_startup._order([_spec("dual_deployment", "validate_dataset"), _spec("bench_floor", "noop"),
                                 _spec(*task_startup.ANCHOR_TASK)])
    rows = [{"task": "validate_dataset", "dag_id": "dual_deployment", "round": 0, "seq": 2,
             "error": "ImportError: no module named dual_deploy"}]
    with pytest.raises(RuntimeError, match="dual_deployment.validate_dataset: ImportError"):
        task_startup.summarize(rows, tasks)


def test_render_table_shows_benchmark_errors():
    md = benchlib.render_table({"date": "2026-01-01", "machine": {}, "benchmarks": {
        "parse_time": {"error": "parse_time failed (1): boom"}, "task_startup": {"error": "worker exited 1"},
        "service_startup": {"error": "localcloud did not answer"}}})
    assert "| DAG parse time | error: parse_time failed (1): boom |" in md
    assert "| task start-up | error: worker exited 1 |" in md and "| service start-up | error: localcloud did not answer |" in md


def test_e2e_branch_spans_from_the_runs_airflow_db(tmp_path):
    """Each target branch spans its first task's start to its last task's end; tasks outside a group
    (validate_dataset) belong to none; the DAG run's wall time is its own start to end."""
    import sqlite3

    (tmp_path / "airflow").mkdir()
    db = sqlite3.connect(tmp_path / "airflow" / "airflow.db")
    db.execute("CREATE TABLE dag_run (dag_id, start_date, end_date)")
    db.execute("CREATE TABLE task_instance (dag_id, task_id, start_date, end_date)")
    db.execute("INSERT INTO dag_run VALUES ('dual_deployment', '2026-11-23 10:00:00.000000', '2026-11-23 10:02:30.500000')")
    db.executemany("INSERT INTO task_instance VALUES ('dual_deployment', ?, ?, ?)", [
        ("validate_dataset", "2026-11-23 10:00:01", "2026-11-23 10:00:03"),
        ("cloud.train", "2026-11-23 10:00:05", "2026-11-23 10:02:00"),
        ("cloud.deploy", "2026-11-23 10:02:05", "2026-11-23 10:02:25"),
        ("mobile.train", "2026-11-23 10:00:05", "2026-11-23 10:00:50"),
        ("mobile.publish", "2026-11-23 10:01:10", "2026-11-23 10:01:15"),
        ("mobile.convert_tflite", None, None),
    ])
    db.commit()
    db.close()
    assert e2e._branch_spans(str(tmp_path)) == {"dag_run_s": 150.5, "branches_s": {"cloud": 140.0, "mobile": 70.0}}
    assert e2e._branch_spans(str(tmp_path / "nothing")) == {}

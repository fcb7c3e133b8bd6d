"""The pure parts of the benchmark suite (bench/benchlib.py): statistics, bounded runs and the
README performance table. No timings are asserted; nothing here imports TensorFlow or Airflow."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import benchlib  # noqa: E402

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
            "baseline": {"import_s": 2.0},
            "files": [
                {"file": "dags/a.py", "runs": 5, "parse_s": 1.0, "ratio_vs_sdk": 0.5, "heavy_modules": [],
                 "import_errors": {}},
                {"file": "dags/b.py", "runs": 5, "parse_s": 12.0, "ratio_vs_sdk": 6.0,
                 "heavy_modules": ["tensorflow", "keras"], "import_errors": {"dags/b.py": "boom"}},
            ],
        },
        "e2e": {"wall_s": 400.0, "status": "success", "dag_steps_s": 300.0, "carried_over_from": "2026-11-20T08:00:00"},
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
    assert "| DAG parse `dags/b.py` (median of 5) | 12.00 s (1 import errors) (whole process n/a); heavy imports: tensorflow, keras |" in md
    assert "heavy imports: none" in md and "6.00x" in md
    assert "400 s wall (success)" in md
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

"""A manual run with ``targets=["mobile"]`` succeeds: the left-out target is ``not_selected``, not failed.

Airflow 3's ShortCircuitOperator skips downstream by raising (DownstreamTasksSkipped), so the
``selected`` task of a left-out target ends ``success`` without pushing its False: the summary sees
no XCom and every other task of the group ``skipped``, exactly as read back from a real run's
metadata database (tests/test_ui_browser.py runs one through the UI).
"""

from __future__ import annotations

from dual_deploy.operators.summary import build_summary

CLOUD = ["cloud.selected", "cloud.train", "cloud.champion_gate", "cloud.register_model", "cloud.deploy"]
MOBILE = ["mobile.selected", "mobile.train", "mobile.champion_gate", "mobile.convert_tflite", "mobile.publish"]


def _summary(states: dict[str, str], xcoms: dict) -> dict:
    return build_summary(dag_id="dual_deployment", run_id="manual__1", platform="local",
                         targets={"cloud": "endpoint", "mobile": "mobile"}, states=states, xcoms=xcoms,
                         artifacts_uri="gs://b/runs/manual-1", order=[*CLOUD, *MOBILE])


def test_a_left_out_target_is_not_selected_and_the_run_succeeds():
    states = {"validate_dataset": "success", "stage_split": "success", "cloud.selected": "success",
              **{t: "skipped" for t in CLOUD[1:]}, **{t: "success" for t in MOBILE}}
    summary = _summary(states, {"mobile.selected": True})  # no XCom from cloud.selected
    assert summary["targets"]["cloud"]["status"] == "not_selected"
    assert summary["targets"]["mobile"]["status"] == "success"
    assert summary["status"] == "success"


def test_a_selected_target_whose_tasks_did_not_run_is_still_failed():
    # `selected` pushed True (the target was wanted) but its training was skipped/never ran: not "not_selected".
    states = {"cloud.selected": "success", "cloud.train": "upstream_failed",
              **{t: "skipped" for t in CLOUD[2:]}, **{t: "success" for t in MOBILE}}
    summary = _summary(states, {"cloud.selected": True, "mobile.selected": True})
    assert summary["targets"]["cloud"]["status"] == "failed"
    assert summary["status"] == "failed"

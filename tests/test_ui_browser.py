"""The Airflow UI of `make up`, in a real browser (slow: brings up Airflow and trains one tiny model).

Debian's Chromium (``make tools`` installs it) driven by Playwright's Python package, against the
`make up` stack (plugins/dual_deploy/local_stack.py via tests/tiny_stack.py) with its login on:

1. sign in with the generated password, as a user would after `make up`;
2. both DAGs are listed; the ``dual_deployment`` graph shows the ``cloud`` and ``mobile`` TaskGroups,
   and their tasks once expanded;
3. the Trigger form shows the Params (data_uri, epochs, targets); a run is triggered from it with
   ``targets`` = mobile and epochs = 1 (the DAG is paused: the form's "unpause on trigger" does it);
4. while ``mobile.train`` is unfinished (its CustomJob training on the local Vertex AI server) its log
   page shows the job it created (live logs); the run finishes with success: mobile delivered, cloud
   skipped (not_selected);
5. `down` leaves no process behind.

Screenshots go to ``$UI_ARTIFACTS`` (default ``.state/ui-artifacts/``): login, dags, graph,
graph-expanded, trigger-form, task-log-live, run-success. README's ``docs/airflow-graph.png`` is
this test's graph-expanded.png, quantized to 64 colours (PIL) to keep the repository small.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import urllib.parse
from pathlib import Path

import pytest
from tiny_stack import CLASSES, Bucket, make_stack, sample_batch

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

ROOT = Path(__file__).resolve().parents[1]
MAIN = "dual_deployment"
WATCHER = "dual_deployment_new_data"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# As root, in a sandbox with no network but the package registries (/work/.library/env/machines/python.md):
# without the background-networking flags Chromium keeps dialing Google's hosts.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
UI_TIMEOUT_MS = 60_000  # a page on 2 busy cores (the first load compiles nothing, but the API is slow then)


@pytest.fixture(scope="module")
def artifacts() -> Path:
    path = Path(os.environ.get("UI_ARTIFACTS") or ROOT / ".state" / "ui-artifacts")
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `make tools` installs Debian's chromium (as root), or set CHROMIUM")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def test_sign_in_see_the_graph_and_params_trigger_a_mobile_run_and_see_it_succeed(tmp_path, browser, artifacts):
    from playwright.sync_api import expect

    timings: dict[str, float] = {}
    stack = make_stack(tmp_path, all_admins=False)
    t0 = time.monotonic()
    leftover: list[int] = []
    try:
        stack.up([MAIN, WATCHER], timeout_s=420)  # `make up`: DAGs stay paused
        gcs = Bucket(stack.gcs_url, stack.bucket_name)
        gcs.create()
        gcs.upload_tree("datasets/tiny", sample_batch(tmp_path / "data", per_class=8))  # the config's data.uri
        assert stack.password(), f"no generated password in {stack.passwords_file}"
        timings["bring-up"] = time.monotonic() - t0

        t = time.monotonic()
        page = browser.new_page(viewport={"width": 1400, "height": 720})
        page.set_default_timeout(UI_TIMEOUT_MS)
        expect.set_options(timeout=UI_TIMEOUT_MS)
        ui = stack.ui_url

        # 1. sign in
        page.goto(f"{ui}/")
        expect(page).to_have_url(re.compile(r"/auth/login"))
        page.get_by_label("Username").fill("admin")
        page.get_by_label("Password").fill(stack.password())
        page.screenshot(path=artifacts / "login.png")
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(f"{ui}/")

        # 2. the DAGs, the graph and its TaskGroups
        page.goto(f"{ui}/dags")
        for dag_id in (MAIN, WATCHER):
            expect(page.get_by_role("link", name=dag_id, exact=True)).to_be_visible()
        page.screenshot(path=artifacts / "dags.png")
        page.goto(f"{ui}/dags/{MAIN}")
        page.get_by_role("button", name=re.compile(r"^Show Graph")).click()
        graph = page.locator(".react-flow")
        for node in ("validate_dataset", "stage_split", "run_summary"):
            expect(graph.get_by_text(node, exact=True)).to_be_visible()
        for group in ("cloud", "mobile"):
            node = graph.locator(".react-flow__node").filter(has=page.get_by_text(group, exact=True))
            expect(node.filter(has_text="Task Group")).to_have_count(1)
        page.screenshot(path=artifacts / "graph.png")
        page.get_by_role("button", name="Expand all task groups").click()
        for task in ("train", "champion_gate", "deploy", "convert_tflite", "publish"):
            expect(graph.get_by_text(task, exact=True).first).to_be_visible()
        page.get_by_role("button", name=re.compile("Collapse Details Panel")).click()
        page.locator(".react-flow__controls-fitview").click()  # re-fit the graph to the wider panel
        page.wait_for_timeout(1000)  # the fit is animated
        graph.screenshot(path=artifacts / "graph-expanded.png")
        timings["UI: sign in, graph"] = time.monotonic() - t

        # 3. the Params form; trigger a mobile-only run of one epoch
        t = time.monotonic()
        page.get_by_role("button", name="Trigger Dag").click()
        dialog = page.get_by_role("dialog")
        expect(dialog.get_by_text("Run Parameters")).to_be_visible()
        params = {name: dialog.get_by_role("group").filter(has=page.get_by_text(re.compile(rf"^{name}\s*\*?$")))
                  for name in ("data_uri", "epochs", "targets")}  # (a required Param's label ends with "*")
        for group in params.values():
            expect(group).to_have_count(1)
        # The defaults come from the config: the dataset and every configured target.
        expect(params["data_uri"].get_by_role("textbox")).to_have_value(f"gs://{stack.bucket_name}/datasets/tiny")
        targets = params["targets"].get_by_role("textbox")  # an array Param: one item per line
        expect(targets).to_have_value("cloud\nmobile")
        expect(dialog.get_by_role("checkbox", name=f"Unpause {MAIN} on trigger")).to_be_checked()
        targets.fill("mobile")
        params["epochs"].get_by_role("spinbutton").fill("1")
        dialog.screenshot(path=artifacts / "trigger-form.png")
        dialog.get_by_role("button", name="Trigger", exact=True).click()
        runs = stack.wait_for("the triggered run", lambda: stack.runs(MAIN), 60, 1)
        assert len(runs) == 1, runs  # schedule is off: only the form's run
        run_id = runs[0]["dag_run_id"]
        assert runs[0]["conf"]["targets"] == ["mobile"] and runs[0]["conf"]["epochs"] == 1, runs[0]["conf"]
        assert stack.dag(MAIN)["is_paused"] is False  # "unpause on trigger"

        # 4. live log of mobile.train, then the run's outcome
        # The training task creates a CustomJob on the local Vertex AI server, then waits for it deferred
        # (in the triggerer) for tens of seconds: its log must show while it is still unfinished.
        stack.wait_for("mobile.train started", lambda: stack.task_states(MAIN, run_id).get("mobile.train")
                       in ("running", "deferred"), 600, 1)
        run_url = f"{ui}/dags/{MAIN}/runs/{urllib.parse.quote(run_id, safe='')}"
        page.goto(f"{run_url}/tasks/mobile.train")
        expect(page.get_by_text(re.compile(r"Custom job was created")).first).to_be_visible()
        live = stack.task_states(MAIN, run_id)["mobile.train"]
        assert live not in ("success", "failed", "skipped", "upstream_failed"), f"the log showed only after ({live})"
        page.screenshot(path=artifacts / "task-log-live.png")
        page.goto("about:blank")  # a live log page polls the API: costs CPU the training needs
        result = stack.wait_run_done(MAIN, run_id, 900)
        states = stack.task_states(MAIN, run_id)
        assert result["state"] == "success", stack.diagnose(MAIN, run_id)
        assert {t: s for t, s in states.items() if t.startswith("mobile.")} and all(
            s == "success" for t, s in states.items() if t.startswith("mobile.")), states
        assert states["cloud.train"] == "skipped" and states["run_summary"] == "success", states
        page.goto(run_url)
        expect(page.get_by_text(re.compile(r"^success$", re.I)).first).to_be_visible()
        expect(page.locator(".react-flow__node").first).to_be_visible()  # the graph with the task states
        page.screenshot(path=artifacts / "run-success.png")
        summaries = [n for n in gcs.names("runs/") if n.endswith("/run_summary.json")]
        assert len(summaries) == 1, summaries
        summary = gcs.read_json(summaries[0])
        assert summary["data"]["classes"] == {c: 8 for c in CLASSES}
        assert summary["targets"]["mobile"]["status"] == "success", summary["targets"]
        assert summary["targets"]["cloud"]["status"] == "not_selected" and summary["status"] == "success"
        timings["trigger form -> run success"] = time.monotonic() - t
    finally:
        t = time.monotonic()
        _, leftover = stack.down()
        timings["down"] = time.monotonic() - t
        timings["total"] = time.monotonic() - t0
        print("\ntimings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
        print(f"screenshots: {artifacts}")
    assert leftover == [], f"processes the stack started are still running: {leftover}"
    assert not any(stack.running().values())

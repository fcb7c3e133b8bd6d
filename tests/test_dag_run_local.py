"""End-to-end runs of the dual_deployment DAG on the local platform (slow: trains tiny real models).

scripts/dags_test.sh (what ``make run`` runs: ``airflow dags test --use-executor`` with LocalExecutor
workers, an Execution API server and a triggerer) runs the whole DAG in a subprocess with the environment
of scripts/local_env.sh, against the session's GCS emulator and local Vertex AI server, a throw-away
AIRFLOW_HOME (SQLite, migrated first) and a temporary state dir, with a config that shrinks every
target to seconds of training. The production operators throughout: the provider's CustomJob
operator deferring on its trigger (the trainer runs as the server's custom job), the Model
Registry, a canary deployment of the real serving app behind the endpoint, Firebase Storage
publishing with a Remote Config pointer, the LiteRT interpreter for TFLite validation.

- the two targets' branches run side by side, their training jobs' waits deferred to the triggerer;
- two successful runs: the second registers model version 2 and deploys it as a canary on the same
  endpoint, then promotes it; a client predicting through both runs sees no failed request;
- a run on unusable data fails at validate_dataset and leaves no trace in the registry,
  the endpoints or the mobile models.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from dual_deploy.config import DEFAULT_CONFIG

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
CLASSES = ("daisy", "roses", "tulips")
ANON_CONN = json.dumps(
    {"conn_type": "google_cloud_platform", "extra": {"is_anonymous": True, "project": "local-project"}}
)
# deterministic: a re-run on the same data ties with its champion, so the champion gate promotes it.
TINY_TRAINING = {"image_size": 32, "batch_size": 8, "epochs": 1, "weights": None, "fine_tune_epochs": 0,
                 "augment": False, "deterministic": True}
# One epoch from scratch scores about chance: the gate's absolute minimum would (rightly) stop it.
TINY_GATE = {"min_accuracy": 0.0, "min_macro_f1": 0.0}
# The cloud target's architecture in these runs. DenseNet121's graph makes each run ~3 minutes
# slower on 2 cores (tracing for fit, the serving export and its reload, two serving starts), which
# puts two runs far over this file's budget; MobileNetV3 goes through exactly the same tasks,
# operators, registry, endpoint and serving app. DUAL_DEPLOY_E2E_CLOUD_ARCH=densenet121 runs the
# configured model (the trainer's own tests cover both architectures' model code).
CLOUD_ARCH = os.environ.get("DUAL_DEPLOY_E2E_CLOUD_ARCH", "mobilenet_v3_small")


# ---------------------------------------------------------------- environment and helpers


def _base_env(emulator: str, airflow_home: Path, localcloud) -> dict[str, str]:
    """scripts/local_env.sh, with this test's AIRFLOW_HOME, GCS emulator and local Vertex AI server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "DUAL_DEPLOY", "AIP_"))}
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        STORAGE_EMULATOR_HOST=emulator,
        **localcloud.env(),
        GOOGLE_CLOUD_PROJECT="local-project",
        DUAL_DEPLOY_PLATFORM="local",
        AIRFLOW_HOME=str(airflow_home),
        AIRFLOW__CORE__DAGS_FOLDER=str(ROOT / "dags"),
        AIRFLOW__CORE__PLUGINS_FOLDER=str(ROOT / "plugins"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__UNIT_TEST_MODE="False",
        AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT="300",
        AIRFLOW__LOGGING__LOGGING_LEVEL="INFO",
        AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT=ANON_CONN,
        AIRFLOW_CONN_FIREBASE_DEFAULT=ANON_CONN,
        PYTHONPATH=os.pathsep.join([str(ROOT / "include"), str(ROOT / "plugins"), str(ROOT / "emulators")]),
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    return env


def _write_config(path: Path, bucket: str, state_dir: Path) -> Path:
    """The default config with the local platform shrunk to a tiny, fast run in ``bucket``, with its own
    endpoint and model names (the local Vertex AI server is shared by the test session)."""
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    local = raw["platforms"]["local"]
    local["artifacts_uri"] = f"gs://{bucket}/runs"
    local["data"] = {"uri": f"gs://{bucket}/datasets/flowers"}
    local["local"] = {"bucket": bucket, "state_dir": str(state_dir)}
    local["gcp"]["firebase_storage_bucket"] = bucket
    local["gcp"]["poll_interval_s"] = 2
    if "triggers" in raw:  # keep every object this run writes inside its own bucket
        local.setdefault("triggers", {}).update(incoming_uri=f"gs://{bucket}/incoming",
                                                ledger_uri=f"gs://{bucket}/ledger.json")
    targets = local.setdefault("targets", {})
    cloud = targets.setdefault("cloud", {})
    cloud["training"] = dict(TINY_TRAINING)
    cloud["architecture"] = CLOUD_ARCH
    cloud["gate"] = dict(TINY_GATE)
    cloud["endpoint"] = {"min_replica_count": 1, "max_replica_count": 1, "display_name": f"ep-{bucket}",
                         "model_display_name": f"model-{bucket}"[:40]}
    mobile = targets.setdefault("mobile", {})
    mobile["training"] = dict(TINY_TRAINING)
    mobile["gate"] = dict(TINY_GATE)
    # A 1-epoch model's class scores are nearly tied, so dynamic-range (int8) quantization could flip
    # a top-1 on some CPU; float16 error is ~10x smaller, which keeps a realistic agreement gate
    # stable (tests/test_tflite.py covers every mode). 3 test images: one flip moves accuracy 33 points.
    mobile["tflite"] = {"mode": "float16", "min_agreement": 0.9, "max_accuracy_drop": 0.34,
                        "num_calibration_images": 8}
    mobile["publish"] = {"remote_config_parameter": f"m_{bucket.replace('-', '_')}"}
    path.write_text(yaml.safe_dump(raw))
    return path


def _gcs_client():
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage as gcs

    return gcs.Client(project="local-project", credentials=AnonymousCredentials())


def _objects(bucket: str, prefix: str) -> list[str]:
    return sorted(b.name for b in _gcs_client().list_blobs(bucket, prefix=prefix))


def _read_json(uri: str) -> dict:
    bucket, name = uri[len("gs://"):].split("/", 1)
    return json.loads(_gcs_client().bucket(bucket).blob(name).download_as_bytes())


def _upload_dataset(tmp: Path, bucket: str, classes: tuple[str, ...], per_class: int = 8) -> tuple[Path, str]:
    from dual_deploy.local_platform import upload_dataset
    from dualml import sample_data

    local = tmp / f"data-{bucket}"
    sample_data.generate(local, per_class=per_class, size=48, seed=3, classes=classes)
    uri = f"gs://{bucket}/datasets/flowers"
    assert upload_dataset(str(local), uri) == per_class * len(classes)
    return local, uri


def _dags_test(env: dict[str, str], config: Path, data_uri: str, log: Path, timeout_s: float = 900) -> int:
    """scripts/dags_test.sh dual_deployment with the run's conf (as make run runs it); its exit code.
    The Execution API server's and the triggerer's logs go beside ``log``."""
    cmd = ["bash", str(ROOT / "scripts" / "dags_test.sh"), "dual_deployment", json.dumps({"data_uri": data_uri})]
    with open(log, "wb") as out:
        proc = subprocess.run(cmd, env={**env, "DUAL_DEPLOY_CONFIG": str(config), "DAGS_TEST_LOG_DIR": str(log.parent)},
                              cwd=config.parent,
                              stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s)
    return proc.returncode


def _tail(log: Path, n: int = 80) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:])


def _summary(state_dir: Path, log: Path) -> dict:
    path = state_dir / "run_summary.json"
    assert path.exists(), f"the run wrote no summary; log tail:\n{_tail(log)}"
    return json.loads(path.read_text())


def _undeploy_all(localcloud, endpoint_display_name: str) -> None:
    """Free the serving processes of the test's endpoint (the server outlives this module)."""
    from airflow.providers.google.cloud.hooks.vertex_ai.endpoint_service import EndpointServiceHook

    hook = EndpointServiceHook()
    for ep in hook.list_endpoints(project_id="local-project", region="us-central1",
                                  filter=f'display_name="{endpoint_display_name}"'):
        endpoint_id = ep.name.rsplit("/", 1)[-1]
        for dm in ep.deployed_models:
            op = hook.undeploy_model(project_id="local-project", region="us-central1", endpoint=endpoint_id,
                                     deployed_model_id=dm.id, traffic_split={})
            hook.wait_for_operation(operation=op, timeout=120)


def _predict(url: str, images: list[bytes]) -> dict:
    """Vertex AI's REST predict (the local server's HTTP port), as a REST client of the cloud model calls it."""
    body = json.dumps({"instances": [{"b64": base64.b64encode(b).decode()} for b in images]}).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.status == 200
        return json.loads(r.read())


class Poller(threading.Thread):
    """Predicts through the endpoint's REST URL until stopped; counts answers per deployed model and
    every failed request."""

    def __init__(self, url: str, image: bytes):
        super().__init__(daemon=True)
        self.url, self.image = url, image
        self.stop = threading.Event()
        self.served: dict[str, int] = {}
        self.failures: list[str] = []

    def run(self):
        while not self.stop.is_set():
            try:
                body = _predict(self.url, [self.image])
                self.served[body["deployedModelId"]] = self.served.get(body["deployedModelId"], 0) + 1
            except (urllib.error.URLError, OSError, AssertionError, KeyError, ValueError) as e:
                self.failures.append(f"{type(e).__name__}: {str(getattr(e, 'read', lambda: b'')())[:200] or e}")
            self.stop.wait(0.2)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def airflow_env(gcs_emulator, localcloud, tmp_path_factory) -> dict[str, str]:
    """The local platform's environment with a freshly migrated SQLite AIRFLOW_HOME."""
    home = tmp_path_factory.mktemp("airflow_home")
    env = _base_env(gcs_emulator, home, localcloud)
    proc = subprocess.run([str(VENV_BIN / "airflow"), "db", "migrate"], env=env, cwd=home,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"airflow db migrate failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return env


@pytest.fixture(scope="module")
def deployment(airflow_env, localcloud, tmp_path_factory):
    """A bucket, state dir, config and dataset for the successful runs; the endpoint freed after."""
    tmp = tmp_path_factory.mktemp("deploy")
    bucket = f"dd-e2e-{uuid.uuid4().hex[:10]}"
    state_dir = tmp / "state"
    config = _write_config(tmp / "dual_deploy.yaml", bucket, state_dir)
    local_data, data_uri = _upload_dataset(tmp, bucket, CLASSES)
    ctx = {"tmp": tmp, "bucket": bucket, "state_dir": state_dir, "config": config, "data_uri": data_uri,
           "local_data": local_data, "endpoint": f"ep-{bucket}"}
    try:
        yield ctx
    finally:
        _undeploy_all(localcloud, ctx["endpoint"])


def _images(deployment) -> list[bytes]:
    return [sorted((deployment["local_data"] / c).glob("*.jpg"))[0].read_bytes() for c in CLASSES]


def _run(airflow_env, deployment, name: str) -> dict:
    log = deployment["tmp"] / f"{name}.log"
    (deployment["state_dir"] / "run_summary.json").unlink(missing_ok=True)
    t0 = time.monotonic()
    rc = _dags_test(airflow_env, deployment["config"], deployment["data_uri"], log)
    duration = time.monotonic() - t0
    summary = _summary(deployment["state_dir"], log)
    assert summary["status"] == "success", f"{json.dumps(summary, indent=1)[:4000]}\nlog tail:\n{_tail(log)}"
    assert rc == 0, _tail(log)
    return {"summary": summary, "duration_s": duration, "log": log}


@pytest.fixture(scope="module")
def first_run(airflow_env, deployment) -> dict:
    out = _run(airflow_env, deployment, "run1")
    url = out["summary"]["targets"]["cloud"]["endpoint"]["prediction_url"]
    out["prediction"] = _predict(url, _images(deployment))
    return out


@pytest.fixture(scope="module")
def second_run(airflow_env, deployment, first_run) -> dict:
    """The second run, with a client predicting through the endpoint the whole time."""
    url = first_run["summary"]["targets"]["cloud"]["endpoint"]["prediction_url"]
    poller = Poller(url, _images(deployment)[0])
    poller.start()
    try:
        out = _run(airflow_env, deployment, "run2")
        time.sleep(1)
    finally:
        poller.stop.set()
        poller.join(30)
    out["poller"] = poller
    out["prediction"] = _predict(url, _images(deployment))
    return out


# ---------------------------------------------------------------- successful runs


def test_first_run_trains_deploys_and_publishes(first_run, deployment):
    s = first_run["summary"]
    bucket = deployment["bucket"]
    assert s["dag_id"] == "dual_deployment" and s["platform"] == "local"
    assert s["artifacts_uri"].startswith(f"gs://{bucket}/runs/")
    assert s["data"]["classes"] == {c: 8 for c in CLASSES}
    assert s["split"]["labels"] == list(CLASSES)
    assert set(s["targets"]) == {"cloud", "mobile"}
    for name, t in s["targets"].items():
        assert t["status"] == "success", (name, t)
        assert t["failed_steps"] == []
        assert t["metrics"]["labels"] == list(CLASSES)
        assert 0.0 <= t["metrics"]["accuracy"] <= 1.0
        assert t["training"]["model_dir"] == f"{s['artifacts_uri']}/{name}/model"
    assert all(step["state"] == "success" for step in s["steps"].values()), s["steps"]
    # The summary is also in the run's artifacts, identical to the local copy.
    remote = _read_json(s["summary_uri"])
    assert remote["run_id"] == s["run_id"] and remote["targets"] == s["targets"]

    for t in s["targets"].values():  # no champion yet: the first model is delivered
        assert t["decision"]["promote"] is True and t["decision"]["champion"] is None
    for name in ("cloud", "mobile"):
        champion = _read_json(f"gs://{bucket}/champions/{name}.json")
        assert champion["model_dir"] == f"{s['artifacts_uri']}/{name}/model" and champion["run_id"] == s["run_id"]

    cloud = s["targets"]["cloud"]
    assert cloud["model"]["model_version_id"] == "1"
    assert cloud["endpoint"]["endpoint_created"] is True
    assert cloud["endpoint"]["model_version_id"] == "1"
    assert cloud["endpoint"]["smoke_test"]["instances"] == 2
    assert cloud["training"]["custom_job_name"].startswith("projects/local-project/locations/us-central1/customJobs/")

    mobile = s["targets"]["mobile"]
    tfl = mobile["tflite"]
    assert tfl["passed"] is True and tfl["mode"] == "float16"
    assert 0 < tfl["size_bytes"] < 20e6
    assert tfl["top1_agreement"] >= 0.9
    assert tfl["tflite_uri"] == f"{s['artifacts_uri']}/mobile/tflite/model.tflite"
    pub = mobile["published"]
    assert pub["backend"] == "firebase_storage"
    assert pub["version"] == 1 and pub["created"] is True and pub["published"] is True
    assert pub["tflite_uri"] == f"gs://{bucket}/mobile-models/flowers_mobilenet_v3/v1/model.tflite"
    manifest = _read_json(pub["manifest_uri"])
    assert manifest["version"] == 1 and manifest["sha256"] == pub["model_hash"]
    # The Remote Config pointer apps read, through the same REST code as on Firebase.
    assert pub["remote_config"]["changed"] is True
    assert json.loads(pub["remote_config"]["value"])["version"] == 1


def _task_spans(airflow_env, run_id: str) -> dict[str, tuple[float, float]]:
    """task_id -> (start, end) in epoch seconds, from the run's Airflow DB."""
    import sqlite3

    def ts(value: str) -> float:
        return datetime.fromisoformat(value).replace(tzinfo=UTC).timestamp()

    db = sqlite3.connect(Path(airflow_env["AIRFLOW_HOME"]) / "airflow.db")
    try:
        rows = db.execute("SELECT task_id, start_date, end_date FROM task_instance WHERE run_id = ?",
                          (run_id,)).fetchall()
    finally:
        db.close()
    return {t: (ts(s), ts(e)) for t, s, e in rows if s and e}


def test_the_targets_train_side_by_side_and_their_waits_run_in_the_triggerer(first_run, airflow_env):
    """The point of scripts/dags_test.sh: both training jobs are submitted before either finishes (their
    tasks overlap), and each wait is the provider's trigger run by the triggerer process, not inline."""
    spans = _task_spans(airflow_env, first_run["summary"]["run_id"])
    (c0, c1), (m0, m1) = spans["cloud.train"], spans["mobile.train"]
    assert max(c0, m0) < min(c1, m1), spans
    logs = Path(airflow_env["AIRFLOW_HOME"]) / "logs" / "dag_id=dual_deployment"
    for target in ("cloud", "mobile"):
        job = first_run["summary"]["targets"][target]["training"]["custom_job_name"]
        # The triggerer writes each trigger's log beside its task's: attempt=N.log.trigger.<triggerer job>.log
        trigger_logs = list(logs.glob(f"run_id=*/task_id={target}.train/attempt=1.log.trigger.*.log"))
        assert trigger_logs, f"no triggerer log for {target}.train under {logs}"
        assert f"Status of the custom job {job} is JOB_STATE_SUCCEEDED" in trigger_logs[0].read_text(errors="replace")
    assert "running trigger in line" not in first_run["log"].read_text(errors="replace")


def _links(airflow_env, run_id: str) -> dict[tuple[str, str], str]:
    """(task_id, link XCom key) -> URL, as the task runner stored them for the UI (Airflow 3 computes
    operator extra links when a task finishes)."""
    import sqlite3

    db = sqlite3.connect(Path(airflow_env["AIRFLOW_HOME"]) / "airflow.db")
    try:
        rows = db.execute("SELECT task_id, key, value FROM xcom WHERE run_id = ? AND key LIKE '%link%' "
                          "OR (run_id = ? AND key IN ('custom_job_conf', 'model_conf', 'endpoint_conf'))",
                          (run_id, run_id)).fetchall()
    finally:
        db.close()
    return {(t, k): json.loads(v) if isinstance(v, str) else v for t, k, v in rows}


def test_console_links_for_the_job_the_model_version_the_endpoint_and_the_report(first_run, airflow_env):
    s = first_run["summary"]
    links = _links(airflow_env, s["run_id"])
    report = links[("run_summary", "_link_RunReportLink")]
    bucket, _, path = s["report_uri"].removeprefix("gs://").partition("/")
    assert report == f"{airflow_env['STORAGE_EMULATOR_HOST']}/{bucket}/{path}"
    with urllib.request.urlopen(report, timeout=30) as r:  # the emulator serves it like storage.cloud.google.com
        assert b"<html" in r.read(2000).lower()
    # The provider's link classes keep their URL under their own keys.
    for task, key in (("cloud.train", "custom_job_conf"), ("cloud.register_model", "model_conf"),
                      ("cloud.deploy", "endpoint_conf")):
        url = links[(task, key)]
        assert url.startswith("https://console.cloud.google.com/vertex-ai/") and "local-project" in url, (task, url)
    assert s["targets"]["cloud"]["endpoint"]["endpoint_id"] in links[("cloud.deploy", "endpoint_conf")]


def _registry(localcloud, deployment) -> tuple[dict, dict]:
    """(version id -> aliases of the test's model, the test's endpoint) as the local Vertex AI server holds them."""
    state = localcloud.state()
    name = f"model-{deployment['bucket']}"[:40]
    versions = {v["version_id"]: sorted(v["version_aliases"]) for v in state["model_versions"]
                if v["display_name"] == name}
    [endpoint] = [e for e in state["endpoints"] if e["display_name"] == deployment["endpoint"]]
    return versions, endpoint


def test_endpoint_answers_a_vertex_format_request(first_run, localcloud, deployment):
    body = first_run["prediction"]
    preds = body["predictions"]
    assert len(preds) == len(CLASSES)
    for p in preds:
        assert p["label"] in CLASSES
        assert 0.0 <= p["confidence"] <= 1.0
        assert set(p["probabilities"]) == set(CLASSES)
    # Vertex AI's response names the deployed model and version that answered.
    endpoint = first_run["summary"]["targets"]["cloud"]["endpoint"]
    assert body["deployedModelId"] == endpoint["deployed_model_id"] and body["modelVersionId"] == "1"
    versions, ep = _registry(localcloud, deployment)
    run_alias = first_run["summary"]["targets"]["cloud"]["model"]["version_aliases"]
    assert list(versions) == ["1"] and "default" in versions["1"] and set(run_alias) <= set(versions["1"])
    assert ep["traffic_split"] == {endpoint["deployed_model_id"]: 100}


def test_second_run_canaries_version_2_on_the_same_endpoint(first_run, second_run, deployment, localcloud):
    s1, s2 = first_run["summary"], second_run["summary"]
    bucket = deployment["bucket"]
    assert s2["run_id"] != s1["run_id"] and s2["artifacts_uri"] != s1["artifacts_uri"]
    assert all(t["status"] == "success" for t in s2["targets"].values())

    for name, t in s2["targets"].items():  # same data, deterministic training: ties with the champion
        assert t["decision"]["promote"] is True, t["decision"]
        assert t["decision"]["champion"]["model_dir"] == f"{s1['artifacts_uri']}/{name}/model"
        assert _read_json(f"gs://{bucket}/champions/{name}.json")["run_id"] == s2["run_id"]

    c1, c2 = s1["targets"]["cloud"], s2["targets"]["cloud"]
    assert c2["model"]["model_id"] == c1["model"]["model_id"]
    assert c2["model"]["model_version_id"] == "2"
    e1, e2 = c1["endpoint"], c2["endpoint"]
    assert e2["endpoint_id"] == e1["endpoint_id"] and e2["prediction_url"] == e1["prediction_url"]
    assert e2["endpoint_created"] is False and e2["model_version_id"] == "2"
    assert e2["canary_traffic_percent"] == 10  # the configured canary share while it was smoke-tested
    assert e2["undeployed"] == [e1["deployed_model_id"]]

    # The server's state is exactly what the summary says: one model, two versions, default on the
    # served one; the endpoint serves only version 2.
    versions, ep = _registry(localcloud, deployment)
    assert sorted(versions) == ["1", "2"]
    assert "default" in versions["2"] and "default" not in versions["1"]
    assert [(d["id"], d["model_version_id"]) for d in ep["deployed_models"]] == [(e2["deployed_model_id"], "2")]
    assert ep["traffic_split"] == {e2["deployed_model_id"]: 100}

    # Mobile: identical bytes (deterministic training) publish nothing new; the pointer stays.
    p1, p2 = s1["targets"]["mobile"]["published"], s2["targets"]["mobile"]["published"]
    assert p2["model_id"] == p1["model_id"] and p2["created"] is False
    assert p2["version"] == _read_json(p2["manifest_uri"])["version"]

    # A client predicting through the whole second run never failed, and saw both versions serve.
    poller = second_run["poller"]
    assert poller.failures == [], poller.failures[:5]
    assert poller.served.get(e1["deployed_model_id"]) and poller.served.get(e2["deployed_model_id"]), poller.served
    body = second_run["prediction"]
    assert all(p["label"] in CLASSES for p in body["predictions"]) and body["modelVersionId"] == "2"


# ---------------------------------------------------------------- unusable data


def test_run_on_single_class_data_fails_before_training(airflow_env, localcloud, tmp_path):
    bucket = f"dd-bad-{uuid.uuid4().hex[:10]}"
    state_dir = tmp_path / "state"
    config = _write_config(tmp_path / "dual_deploy.yaml", bucket, state_dir)
    _, data_uri = _upload_dataset(tmp_path, bucket, ("daisy",))
    log = tmp_path / "bad.log"
    jobs_before = len(localcloud.state()["custom_jobs"])
    rc = _dags_test(airflow_env, config, data_uri, log, timeout_s=300)
    text = log.read_text(errors="replace")
    assert rc != 0 and "DagRun failed" in text, _tail(log)  # `airflow dags test` exits 1 on a failed run
    assert "found 1 class folder(s)" in text and "need at least 2" in text, _tail(log)

    summary_path = state_dir / "run_summary.json"
    assert summary_path.exists(), _tail(log)  # run_summary runs whatever happened upstream (all_done)
    s = json.loads(summary_path.read_text())
    assert s["status"] == "failed"
    assert s["steps"]["validate_dataset"]["state"] == "failed"
    assert s["steps"]["stage_split"]["state"] == "upstream_failed"
    for t in s["targets"].values():
        assert t["status"] == "failed" and "metrics" not in t and "model" not in t and "published" not in t
    # The real error is what the user sees (issue 15 item 5): first in the summary and in what `make run`
    # prints, never "cloud.train" (tests/test_failure_reporting.py has more bad-data cases).
    assert s["first_failure"]["task_id"] == "validate_dataset"
    assert "found 1 class folder(s)" in s["first_failure"]["message"]
    console = subprocess.run([str(VENV_BIN / "python"), "-m", "dual_deploy.local_platform", "show-summary",
                              str(summary_path)], env=airflow_env, capture_output=True, text=True, timeout=120)
    assert "FAILED at validate_dataset:" in console.stdout and "found 1 class folder(s)" in console.stdout
    assert ".train" not in console.stdout, console.stdout

    # Nothing was trained, registered, deployed or published.
    state = localcloud.state()
    assert len(state["custom_jobs"]) == jobs_before
    assert not [e for e in state["endpoints"] if e["display_name"] == f"ep-{bucket}"]
    assert not [v for v in state["model_versions"] if v["display_name"] == f"model-{bucket}"[:40]]
    assert _objects(bucket, "mobile-models/") == []
    assert not any(name.endswith(("/model.keras", "/split.json")) for name in _objects(bucket, "runs/"))

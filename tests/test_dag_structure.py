"""The dual_deployment DAG's shape, parse-time cost and configuration validation. Fast: no training.

The DAG is parsed the way Airflow parses it (DagBag over dags/) in fresh subprocesses, so the
checks see exactly what the scheduler sees: one run with the default config, one with a config
that adds a third target, both started together to save time.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest
import yaml

from dual_deploy import target_group
from dual_deploy.config import DEFAULT_CONFIG, ConfigError, build_config, load_config, resolve_platform

ROOT = Path(__file__).resolve().parents[1]
HEAVY_MODULES = ("tensorflow", "keras", "ai_edge_litert", "firebase_admin.ml")

STEPS = {
    "endpoint": ("selected", "train", "champion_gate", "register_model", "deploy"),
    "mobile": ("selected", "train", "champion_gate", "convert_tflite", "publish"),
}


# Delivery steps read the trained model's folder from train's XCom, which links them to train as
# well (implied by the chain anyway).
DATA_EDGES = {
    "endpoint": (("train", "register_model"),),
    "mobile": (("train", "convert_tflite"), ("train", "publish")),
}


def expected_edges(targets: dict[str, str]) -> set[tuple[str, str]]:
    """validate_dataset >> stage_split >> [one chain per target] >> run_summary."""
    edges = {("validate_dataset", "stage_split")}
    for name, kind in targets.items():
        chain = [f"{name}.{step}" for step in STEPS[kind]]
        edges |= {("stage_split", chain[0]), (chain[-1], "run_summary")}
        edges |= set(zip(chain, chain[1:], strict=False))
        edges |= {(f"{name}.{a}", f"{name}.{b}") for a, b in DATA_EDGES[kind]}
    return edges


EXPECTED_EDGES = expected_edges({"cloud": "endpoint", "mobile": "mobile"})

# Parses dags/ with DagBag in a fresh interpreter and prints what the tests check as JSON.
_DESCRIBE = r"""
import json, sys
from airflow.dag_processing.dagbag import DagBag

bag = DagBag(dag_folder=sys.argv[1])
out = {"import_errors": {k: str(v) for k, v in bag.import_errors.items()}, "dag_ids": sorted(bag.dags)}
dag = bag.dags.get("dual_deployment")
if dag is not None:
    out.update(
        tags=sorted(dag.tags),
        doc_md=dag.doc_md,
        params={k: dag.params.get_param(k).value for k in dag.params},
        catchup=dag.catchup,
        max_active_runs=dag.max_active_runs,
        default_args={k: str(v) for k, v in dag.default_args.items()},
        tasks={
            t.task_id: {
                "upstream": sorted(t.upstream_task_ids),
                "trigger_rule": str(t.trigger_rule.value if hasattr(t.trigger_rule, "value") else t.trigger_rule),
                "retries": t.retries,
                "operator": type(t).__name__,
                "group": t.task_group.group_id if t.task_group else None,
            }
            for t in dag.tasks
        },
        groups=sorted(k for k, v in dag.task_group.children.items() if hasattr(v, "children")),
        train_args={t.task_id: list(t.custom_job["job_spec"]["worker_pool_specs"][0]["container_spec"]["args"])
                    for t in dag.tasks if t.task_id.endswith(".train")},
    )
out["heavy_modules"] = sorted(m for m in sys.argv[2:] if m in sys.modules)
print("DESCRIBE=" + json.dumps(out))
"""


def _parse_env(tmp: Path, config_path: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "DUAL_DEPLOY"))}
    env.update(
        AIRFLOW_HOME=str(tmp / "airflow"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__DAGS_FOLDER=str(ROOT / "dags"),
        AIRFLOW__CORE__PLUGINS_FOLDER=str(ROOT / "plugins"),
        PYTHONPATH=os.pathsep.join([str(ROOT / "include"), str(ROOT / "plugins")]),
        AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT="300",
        DUAL_DEPLOY_PLATFORM="local",
    )
    if config_path is not None:
        env["DUAL_DEPLOY_CONFIG"] = str(config_path)
    return env


def _default_raw() -> dict:
    return yaml.safe_load(DEFAULT_CONFIG.read_text())


def _third_target_raw() -> dict:
    raw = _default_raw()
    third = copy.deepcopy(next(t for t in raw["targets"] if t["name"] == "mobile"))
    third.update(name="mobile_large", architecture="mobilenet_v3_large")
    third["publish"]["display_name"] = "flowers_mobilenet_v3_large"
    raw["targets"].append(third)
    return raw


@pytest.fixture(scope="module")
def parsed(tmp_path_factory) -> dict[str, dict]:
    """{"default": description, "three_targets": description}, parsed in parallel subprocesses."""
    tmp = tmp_path_factory.mktemp("parse")
    config3 = tmp / "three_targets.yaml"
    config3.write_text(yaml.safe_dump(_third_target_raw()))
    procs = {}
    for name, cfg in (("default", None), ("three_targets", config3)):
        (tmp / name).mkdir()
        procs[name] = subprocess.Popen(
            [sys.executable, "-c", _DESCRIBE, str(ROOT / "dags"), *HEAVY_MODULES],
            env=_parse_env(tmp / name, cfg), cwd=tmp / name,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=180)
        line = next((x for x in stdout.splitlines() if x.startswith("DESCRIBE=")), None)
        assert proc.returncode == 0 and line, f"parsing ({name}) failed:\n{stdout[-3000:]}\n{stderr[-3000:]}"
        out[name] = json.loads(line[len("DESCRIBE="):])
    return out


def _edges(desc: dict) -> set[tuple[str, str]]:
    return {(up, tid) for tid, t in desc["tasks"].items() for up in t["upstream"]}


def _reachable(desc: dict, start: str) -> set[str]:
    down: dict[str, set[str]] = {}
    for up, tid in _edges(desc):
        down.setdefault(up, set()).add(tid)
    seen, todo = set(), [start]
    while todo:
        for nxt in down.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


# ================================================================ the DAG as Airflow parses it


def test_dag_folder_imports_cleanly(parsed):
    d = parsed["default"]
    assert d["import_errors"] == {}
    assert "dual_deployment" in d["dag_ids"]


def test_dag_attributes(parsed):
    d = parsed["default"]
    assert {"ml", "vertex-ai", "tflite", "local"} <= set(d["tags"])
    assert d["doc_md"] and "dual_deployment" in d["doc_md"] and "run_summary" in d["doc_md"]
    assert d["params"] == {"data_uri": "gs://dual-deploy-local/datasets/flowers", "epochs": None,
                           "targets": ["cloud", "mobile"], "allow_class_change": False}
    assert d["catchup"] is False
    assert d["max_active_runs"] == 1
    retries = int(d["default_args"]["retries"])
    assert retries >= 1
    # Every task retries (transient errors) except the gate, whose decision a retry cannot change.
    assert {tid for tid, t in d["tasks"].items() if t["retries"] != retries} == {
        "cloud.champion_gate", "mobile.champion_gate"}


def test_exact_task_ids_and_dependencies(parsed):
    d = parsed["default"]
    assert set(d["tasks"]) == {
        "validate_dataset", "stage_split",
        "cloud.selected", "cloud.train", "cloud.champion_gate", "cloud.register_model", "cloud.deploy",
        "mobile.selected", "mobile.train", "mobile.champion_gate", "mobile.convert_tflite", "mobile.publish",
        "run_summary",
    }
    assert _edges(d) == EXPECTED_EDGES
    assert d["groups"] == ["cloud", "mobile"]
    assert d["tasks"]["run_summary"]["trigger_rule"] == "all_done"
    others = {tid: t["trigger_rule"] for tid, t in d["tasks"].items() if tid != "run_summary"}
    assert set(others.values()) == {"all_success"}
    ops = {tid: t["operator"] for tid, t in d["tasks"].items()}
    assert ops["validate_dataset"] == "ValidateDatasetOperator" and ops["stage_split"] == "StageSplitOperator"
    assert ops["cloud.selected"] == ops["mobile.selected"] == "ShortCircuitOperator"
    assert ops["cloud.train"] == ops["mobile.train"] == "VertexCustomJobOperator"
    assert ops["cloud.champion_gate"] == ops["mobile.champion_gate"] == "ChampionGateOperator"
    assert ops["cloud.register_model"] == "RegisterModelVersionOperator"
    assert ops["cloud.deploy"] == "CanaryDeployModelOperator"
    assert ops["mobile.convert_tflite"] == "ConvertToTFLiteOperator"
    assert ops["mobile.publish"] == "PublishMobileModelOperator"
    assert ops["run_summary"] == "RunSummaryOperator"


def test_cloud_and_mobile_branches_are_parallel(parsed):
    d = parsed["default"]
    cloud = {t for t in d["tasks"] if t.startswith("cloud.")}
    mobile = {t for t in d["tasks"] if t.startswith("mobile.")}
    assert not any((a in cloud and b in mobile) or (a in mobile and b in cloud) for a, b in _edges(d))
    for task in cloud:
        assert not _reachable(d, task) & mobile
    for task in mobile:
        assert not _reachable(d, task) & cloud


def test_trainers_get_the_templated_trainer_args(parsed):
    args = parsed["default"]["train_args"]
    assert "--architecture=densenet121" in args["cloud.train"]
    assert "--architecture=mobilenet_v3_small" in args["mobile.train"]
    cfg = load_config(DEFAULT_CONFIG, platform="local")
    for task_id, a in args.items():
        epochs = cfg.target(task_id.split(".")[0]).training.epochs
        assert any(x.startswith("--split-uri=gs://dual-deploy-local/runs/") and x.endswith("/split.json") for x in a)
        assert [x for x in a if x.startswith("--epochs=")] == [f"--epochs={{{{ params.epochs or {epochs} }}}}"]
        assert "--weights=none" in a  # local platform override: nothing can be downloaded


def test_a_third_target_is_configuration_not_code(parsed):
    d = parsed["three_targets"]
    assert d["import_errors"] == {}
    assert d["groups"] == ["cloud", "mobile", "mobile_large"]
    assert _edges(d) == expected_edges({"cloud": "endpoint", "mobile": "mobile", "mobile_large": "mobile"})
    for step in STEPS["mobile"]:
        assert d["tasks"][f"mobile_large.{step}"]["operator"] == d["tasks"][f"mobile.{step}"]["operator"]
    assert d["params"]["targets"] == ["cloud", "mobile", "mobile_large"]
    assert "--architecture=mobilenet_v3_large" in d["train_args"]["mobile_large.train"]
    assert not _reachable(d, "mobile_large.train") & {t for t in d["tasks"] if t.startswith(("cloud.", "mobile."))}


def test_parsing_imports_no_ml_framework(parsed):
    # TensorFlow / LiteRT / firebase_admin.ml take 10-20 s to import: never at parse time.
    assert parsed["default"]["heavy_modules"] == []
    assert parsed["three_targets"]["heavy_modules"] == []


# ================================================================ trainer args


def test_trainer_args_template_the_epochs_param():
    cfg = load_config(DEFAULT_CONFIG, platform="local")
    cloud = cfg.target("cloud")
    args = target_group.trainer_args(cloud, "gs://b/run/split.json")
    assert "--architecture=densenet121" in args
    assert "--split-uri=gs://b/run/split.json" in args
    epochs = [a for a in args if a.startswith("--epochs")]
    assert len(epochs) == 1
    tmpl = jinja2.Template(epochs[0])
    assert tmpl.render(params={"epochs": None}) == f"--epochs={cloud.training.epochs}"
    assert tmpl.render(params={"epochs": 3}) == "--epochs=3"
    assert f"--image-size={cloud.training.image_size}" in args


# ================================================================ config validation


def _error(raw: dict, platform: str = "local") -> str:
    with pytest.raises(ConfigError) as e:
        build_config(raw, platform)
    return str(e.value)


def test_default_config_is_valid_for_both_platforms_shapes():
    local = load_config(DEFAULT_CONFIG, platform="local")
    assert [t.name for t in local.targets] == ["cloud", "mobile"]
    # One code path: the local platform uses the production operators' settings, pointed at local stand-ins.
    assert local.target("mobile").publish.backend == "firebase_storage"
    assert local.gcp.trainer_image and local.gcp.serving_image and local.gcp.project == "local-project"
    assert local.target("cloud").training.weights is None
    assert local.artifacts_uri.startswith("gs://")


def test_bad_platform_value(monkeypatch):
    monkeypatch.setenv("DUAL_DEPLOY_PLATFORM", "azure")
    with pytest.raises(ConfigError, match="DUAL_DEPLOY_PLATFORM") as e:
        resolve_platform()
    assert "'azure'" in str(e.value) and "local" in str(e.value) and "gcp" in str(e.value)
    msg = _error(_default_raw(), platform="azure")
    assert "platform" in msg and "'local'" in msg


def test_unknown_tflite_mode():
    raw = _default_raw()
    raw["targets"][1]["tflite"]["mode"] = "int4"
    msg = _error(raw)
    assert "tflite.mode" in msg and "int8" in msg


def test_mobile_target_without_tflite_section():
    raw = _default_raw()
    del raw["targets"][1]["tflite"]
    raw["platforms"]["local"]["targets"]["mobile"].pop("tflite", None)  # the local override sets thresholds
    msg = _error(raw)
    assert "'mobile'" in msg and "tflite" in msg


@pytest.mark.parametrize("with_override", [True, False])
def test_duplicate_target_names(with_override):
    raw = _default_raw()
    raw["targets"][1]["name"] = "cloud"
    raw["platforms"]["local"]["targets"].pop("mobile")
    if not with_override:
        raw["platforms"]["local"].pop("targets")
    msg = _error(raw)
    assert "target names must be unique" in msg and "'cloud'" in msg


def test_data_uri_must_be_gcs():
    raw = _default_raw()
    raw["platforms"]["local"]["data"]["uri"] = "/home/me/flowers"
    msg = _error(raw)
    assert "data.uri" in msg and "gs://" in msg


def test_override_for_an_unknown_target():
    raw = _default_raw()
    raw["platforms"]["local"]["targets"]["tablet"] = {"training": {"epochs": 1}}
    assert "tablet" in _error(raw)


def test_unknown_key_is_rejected():
    raw = _default_raw()
    raw["targets"][0]["training"]["epoch"] = 3
    assert "targets.0.training.epoch" in _error(raw)


def test_dual_deploy_config_points_at_another_file(tmp_path, monkeypatch):
    raw = _third_target_raw()
    path = tmp_path / "other.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("DUAL_DEPLOY_CONFIG", str(path))
    assert [t.name for t in load_config(platform="local").targets] == ["cloud", "mobile", "mobile_large"]
    monkeypatch.setenv("DUAL_DEPLOY_CONFIG", str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(platform="local")

"""``training.method: automl``: the config rules (Vertex AI's model types and budgets, checked at parse time
naming the key) and the DAG an AutoML config parses into (same TaskGroups, AutoML operators behind
``train``). Fast: no training; the DAG is parsed by DagBag in a subprocess as Airflow parses it."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dual_deploy.config import ConfigError, build_config, load_config
from dual_deploy.dag_helpers import cost_inputs

ROOT = Path(__file__).resolve().parents[1]
AUTOML_CONFIG = ROOT / "dags" / "config" / "dual_deploy_automl.yaml"
DEFAULT_CONFIG = ROOT / "dags" / "config" / "dual_deploy.yaml"
HEAVY_MODULES = ("tensorflow", "keras", "ai_edge_litert", "firebase_admin.ml")


def raw() -> dict:
    return yaml.safe_load(AUTOML_CONFIG.read_text())


def target(r: dict, name: str) -> dict:
    return next(t for t in r["targets"] if t["name"] == name)


def test_the_example_config_is_all_automl():
    cfg = load_config(AUTOML_CONFIG, "local")
    assert [(t.name, t.kind, t.automl.model_type, t.automl.budget_milli_node_hours) for t in cfg.targets] == [
        ("automl_cloud", "endpoint", "CLOUD", 8000), ("automl_mobile", "mobile", "MOBILE_TF_VERSATILE_1", 1000)]
    assert all(t.is_automl and t.architecture is None for t in cfg.targets)
    assert cfg.data.min_images_per_class >= 10
    # AutoML targets need no trainer or serving image.
    assert cfg.gcp.trainer_image == "" and cfg.gcp.serving_image == ""


@pytest.mark.parametrize(("name", "budget", "wanted"), [
    ("automl_mobile", 999, "targets.1.automl.budget_milli_node_hours: Value error, 999 milli node hours is outside "
                           "Vertex AI's range for model_type MOBILE_TF_VERSATILE_1: 1,000 to 100,000"),
    ("automl_mobile", 100_001, "1,000 to 100,000"),
    ("automl_cloud", 1000, "targets.0.automl.budget_milli_node_hours: Value error, 1,000 milli node hours is outside "
                           "Vertex AI's range for model_type CLOUD: 8,000 to 800,000"),
    ("automl_cloud", 800_001, "8,000 to 800,000"),
])
def test_a_budget_outside_vertex_range_fails_naming_the_key(name, budget, wanted):
    r = raw()
    target(r, name)["automl"]["budget_milli_node_hours"] = budget
    with pytest.raises(ConfigError, match="invalid dual-deploy config") as e:
        build_config(r, "local")
    assert wanted in str(e.value)


def test_model_types_must_fit_the_target_kind():
    r = raw()
    target(r, "automl_cloud")["automl"]["model_type"] = "MOBILE_TF_VERSATILE_1"
    target(r, "automl_cloud")["automl"]["budget_milli_node_hours"] = 8000
    with pytest.raises(ConfigError, match=r"target 'automl_cloud': automl.model_type MOBILE_TF_VERSATILE_1 does "
                                          r"not fit kind 'endpoint' .*use CLOUD"):
        build_config(r, "local")
    r = raw()
    target(r, "automl_mobile")["automl"].update(model_type="CLOUD", budget_milli_node_hours=8000)
    with pytest.raises(ConfigError, match="automl.model_type CLOUD does not fit kind 'mobile'.*MOBILE_TF_LOW_LATENCY_1"):
        build_config(r, "local")
    r = raw()
    target(r, "automl_mobile")["automl"]["model_type"] = "MOBILE_TF_TURBO_9"
    with pytest.raises(ConfigError, match="targets.1.automl.model_type"):
        build_config(r, "local")


def test_method_and_automl_section_go_together():
    r = raw()
    del target(r, "automl_cloud")["automl"]
    with pytest.raises(ConfigError, match="training.method 'automl' but no 'automl:' section"):
        build_config(r, "local")
    r = raw()
    target(r, "automl_cloud")["training"]["method"] = "custom"
    with pytest.raises(ConfigError, match="has an 'automl:' section but training.method is 'custom'"):
        build_config(r, "local")
    r = raw()
    target(r, "automl_cloud")["training"]["method"] = "sometimes"
    with pytest.raises(ConfigError, match="targets.0.training.method"):
        build_config(r, "local")
    default = yaml.safe_load(DEFAULT_CONFIG.read_text())
    del target(default, "cloud")["architecture"]
    with pytest.raises(ConfigError, match="architecture is required for training.method 'custom'"):
        build_config(default, "local")


def test_automl_needs_ten_images_per_label():
    r = raw()
    r["data"]["min_images_per_class"] = 5
    with pytest.raises(ConfigError, match=r"data.min_images_per_class is 5 but target\(s\) \['automl_cloud', "
                                          r"'automl_mobile'\] train with AutoML, which needs at least 10"):
        build_config(r, "local")


def test_a_config_mixing_methods_keeps_the_images_custom_targets_need():
    mixed = yaml.safe_load(DEFAULT_CONFIG.read_text())
    mixed["data"]["min_images_per_class"] = 10
    mixed["targets"].append(copy.deepcopy(target(raw(), "automl_mobile")))
    cfg = build_config(mixed, "local")
    assert [t.model_family for t in cfg.targets] == ["densenet121", "mobilenet_v3_small", "AutoML MOBILE_TF_VERSATILE_1"]
    mixed["platforms"]["local"]["gcp"]["trainer_image"] = ""
    with pytest.raises(ConfigError, match="needs gcp.trainer_image"):
        build_config(mixed, "local")


def test_cost_inputs_price_automl_by_model_type():
    inputs = cost_inputs(load_config(AUTOML_CONFIG, "local"))
    assert inputs["automl_cloud"] == {"training": {"automl": {"model_type": "CLOUD", "budget_milli_node_hours": 8000}},
                                      "endpoint": {"machine_type": "automl", "min_replica_count": 1}}
    assert inputs["automl_mobile"] == {"training": {"automl": {"model_type": "MOBILE_TF_VERSATILE_1",
                                                               "budget_milli_node_hours": 1000}}}


# ---------------------------------------------------------------- the DAG an AutoML config parses into

_DESCRIBE = r"""
import json, sys
from airflow.dag_processing.dagbag import DagBag

bag = DagBag(dag_folder=sys.argv[1])
dag = bag.dags.get("dual_deployment")
out = {"import_errors": {k: str(v) for k, v in bag.import_errors.items()}}
if dag is not None:
    out["tasks"] = {t.task_id: {"upstream": sorted(t.upstream_task_ids), "operator": type(t).__name__,
                                "retries": t.retries} for t in dag.tasks}
    train = dag.get_task("automl_mobile.train")
    out["train"] = {"model_type": train.model_type, "budget": train.budget_milli_node_hours,
                    "filters": [train.training_filter_split, train.validation_filter_split, train.test_filter_split],
                    "labels": train.labels, "is_default_version": train.is_default_version,
                    "model_display_name": train.model_display_name}
    out["export"] = dag.get_task("automl_mobile.export_model").destinations
    deploy = dag.get_task("automl_cloud.deploy")
    out["deploy"] = {"automatic_resources": deploy.automatic_resources, "instance_format": deploy.instance_format}
    out["convert"] = sorted(dag.get_task("automl_mobile.convert_tflite").template_fields)
out["heavy_modules"] = sorted(m for m in sys.argv[2:] if m in sys.modules)
print("DESCRIBE=" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def automl_dag(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("parse-automl")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "DUAL_DEPLOY"))}
    env.update(AIRFLOW_HOME=str(tmp / "airflow"), AIRFLOW__CORE__LOAD_EXAMPLES="False",
               AIRFLOW__CORE__DAGS_FOLDER=str(ROOT / "dags"), AIRFLOW__CORE__PLUGINS_FOLDER=str(ROOT / "plugins"),
               PYTHONPATH=os.pathsep.join([str(ROOT / "include"), str(ROOT / "plugins")]),
               AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT="300", DUAL_DEPLOY_PLATFORM="local",
               DUAL_DEPLOY_CONFIG=str(AUTOML_CONFIG))
    proc = subprocess.run([sys.executable, "-c", _DESCRIBE, str(ROOT / "dags"), *HEAVY_MODULES], env=env, cwd=tmp,
                          capture_output=True, text=True, timeout=300)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("DESCRIBE=")), None)
    assert proc.returncode == 0 and line, f"parsing failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(line[len("DESCRIBE="):])


def test_automl_dag_has_the_same_groups_with_automl_operators_behind_train(automl_dag):
    d = automl_dag
    assert d["import_errors"] == {} and d["heavy_modules"] == []
    chains = {
        "automl_cloud": ["selected", "import_file", "create_dataset", "import_data", "train", "champion_gate",
                         "register_model", "deploy"],
        "automl_mobile": ["selected", "import_file", "create_dataset", "import_data", "train", "export_model",
                          "champion_gate", "convert_tflite", "publish"],
    }
    tasks = d["tasks"]
    assert set(tasks) == {"validate_dataset", "stage_split", "run_summary"} | {
        f"{g}.{s}" for g, steps in chains.items() for s in steps}
    for group, steps in chains.items():
        assert tasks[f"{group}.selected"]["upstream"] == ["stage_split"]
        for up, down in zip(steps, steps[1:], strict=False):
            assert f"{group}.{up}" in tasks[f"{group}.{down}"]["upstream"], (up, down)
        assert f"{group}.{steps[-1]}" in tasks["run_summary"]["upstream"]
    ops = {tid: t["operator"] for tid, t in tasks.items()}
    assert ops["automl_cloud.train"] == ops["automl_mobile.train"] == "VertexAutoMLImageTrainingOperator"
    assert ops["automl_cloud.create_dataset"] == "VertexCreateDatasetOperator"
    assert ops["automl_cloud.import_data"] == "VertexImportDataOperator"
    assert ops["automl_mobile.export_model"] == "VertexExportModelOperator"
    assert ops["automl_cloud.register_model"] == "AutoMLModelVersionOperator"
    # The existing gate and delivery steps, unchanged.
    assert ops["automl_cloud.champion_gate"] == ops["automl_mobile.champion_gate"] == "ChampionGateOperator"
    assert ops["automl_cloud.deploy"] == "CanaryDeployModelOperator"
    assert ops["automl_mobile.convert_tflite"] == "ConvertToTFLiteOperator"
    assert ops["automl_mobile.publish"] == "PublishMobileModelOperator"


def test_automl_tasks_carry_the_configured_request(automl_dag):
    t = automl_dag["train"]
    assert (t["model_type"], t["budget"]) == ("MOBILE_TF_VERSATILE_1", 1000)
    assert t["filters"] == [f"labels.aiplatform.googleapis.com/ml_use={u}" for u in ("training", "validation", "test")]
    assert {"app", "run", "target"} <= set(t["labels"]) and t["labels"]["target"] == "automl_mobile"
    assert t["is_default_version"] is False and t["model_display_name"] == "flowers_automl_mobile"
    assert set(automl_dag["export"]) == {"tf-saved-model", "tflite"}
    assert automl_dag["export"]["tf-saved-model"].endswith("/automl_mobile/model")
    assert automl_dag["deploy"] == {"automatic_resources": True, "instance_format": "automl_image"}
    assert "exported_tflite_uri" in automl_dag["convert"]

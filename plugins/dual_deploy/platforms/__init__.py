"""Per-platform task builders and the shared TaskGroup shape they fill.

Every target gets one TaskGroup with the same shape on every platform; only the operators
behind ``train`` and the delivery steps differ:

- endpoint targets: ``selected >> train >> champion_gate >> register_model >> deploy``
- mobile targets:   ``selected >> train >> champion_gate >> convert_tflite >> publish``

``selected`` skips the group when a manual run's ``targets`` Param leaves it out;
``champion_gate`` skips delivery when the new model does not beat the serving one.
"""

from __future__ import annotations

from importlib import import_module

from airflow.providers.standard.operators.python import ShortCircuitOperator
from airflow.sdk import TaskGroup

from dual_deploy.config import Config, ConfigError, TargetConfig
from dual_deploy.operators.gate import ChampionGateOperator
from dual_deploy.operators.tflite import ConvertToTFLiteOperator


def trainer_args(target: TargetConfig, split_uri: str) -> list[str]:
    """The trainer container's args: identical on every platform.

    ``--epochs`` is templated so a manual run's ``epochs`` Param overrides the config.
    """
    t = target.training
    args = [f"--architecture={target.architecture}", f"--split-uri={split_uri}"]
    args += [a for a in t.trainer_args() if not a.startswith("--epochs=")]
    args.append(f"--epochs={{{{ params.epochs or {t.epochs} }}}}")
    return args


def convert_tflite_task(target: TargetConfig, run_uri: str, split_uri: str, model_dir, **kwargs):
    """The TFLite conversion + validation step: the same operator on every platform."""
    t = target.tflite
    return ConvertToTFLiteOperator(
        task_id="convert_tflite",
        model_dir=model_dir,
        split_uri=split_uri,
        output_dir=f"{run_uri}/{target.name}/tflite",
        mode=t.mode,
        min_agreement=t.min_agreement,
        max_accuracy_drop=t.max_accuracy_drop,
        max_size_mb=t.max_size_mb,
        num_calibration_images=t.num_calibration_images,
        **kwargs,
    )


def publish_metadata(target: TargetConfig, model_dir) -> dict:
    """Stored with the published mobile model: which run and which trained model it came from."""
    return {"run_id": "{{ run_id }}", "architecture": target.architecture, "model_dir": model_dir}


def champions_prefix(cfg: Config) -> str:
    """Folder of the champion records: beside the runs folder, shared by every run."""
    return f"{cfg.artifacts_uri.rstrip('/').rsplit('/', 1)[0]}/champions"


def champion_uri(cfg: Config, target: TargetConfig) -> str:
    """Where the run summary records the model a target currently delivers (its champion)."""
    return f"{champions_prefix(cfg)}/{target.name}.json"


def is_selected(target: str, params: dict | None = None, **_) -> bool:
    """ShortCircuit callable: run this target unless the ``targets`` Param leaves it out."""
    wanted = (params or {}).get("targets")
    return not wanted or target in wanted


def _platform(cfg: Config):
    if cfg.platform not in ("local", "gcp"):
        raise ConfigError(f"platform {cfg.platform!r} has no task builder; use DUAL_DEPLOY_PLATFORM=local or gcp")
    # Imported on demand: the gcp builder imports the Vertex AI operators (10-15 s).
    return import_module(f"dual_deploy.platforms.{cfg.platform}")


def build_target_group(target: TargetConfig, cfg: Config, run_uri: str, split_uri: str) -> TaskGroup:
    platform = _platform(cfg)
    with TaskGroup(group_id=target.name, tooltip=f"{target.architecture} -> {target.kind}") as group:
        selected = ShortCircuitOperator(
            task_id="selected",
            python_callable=is_selected,
            op_kwargs={"target": target.name},
            ignore_downstream_trigger_rules=False,
        )
        train = platform.train_task(target, cfg, run_uri, split_uri)
        champion_gate = ChampionGateOperator(
            task_id="champion_gate",
            model_dir=train.output["model_dir"],
            split_uri=split_uri,
            champion_uri=champion_uri(cfg, target),
            tolerance=target.gate.tolerance,
            min_accuracy=target.gate.min_accuracy,
            min_macro_f1=target.gate.min_macro_f1,
            allow_class_change=target.gate.allow_class_change,
            retries=0,
        )
        delivery = platform.delivery_tasks(target, cfg, run_uri, split_uri, train.output["model_dir"])
        selected >> train >> champion_gate >> delivery[0]
        for upstream, downstream in zip(delivery, delivery[1:], strict=False):
            upstream >> downstream
    return group

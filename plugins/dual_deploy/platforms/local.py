"""Local platform: GCS emulator, trainer and serving app as processes, registry in the bucket."""

from __future__ import annotations

from dual_deploy.config import Config, TargetConfig
from dual_deploy.operators.local_vertex import (
    LocalCustomTrainingJobOperator,
    LocalDeployModelOperator,
    LocalUploadModelOperator,
)
from dual_deploy.operators.publish import PublishMobileModelOperator
from dual_deploy.platforms import convert_tflite_task, publish_metadata, trainer_args


def train_task(target: TargetConfig, cfg: Config, run_uri: str, split_uri: str):
    return LocalCustomTrainingJobOperator(
        task_id="train",
        display_name=f"{target.name}-{{{{ run_id | slug }}}}",
        args=trainer_args(target, split_uri),
        base_output_dir=f"{run_uri}/{target.name}",
        environment={"STORAGE_EMULATOR_HOST": cfg.local.storage_emulator_host},
        python=cfg.local.python,
    )


def delivery_tasks(target: TargetConfig, cfg: Config, run_uri: str, split_uri: str, model_dir) -> list:
    loc = cfg.local
    common = {"local_bucket": loc.bucket, "state_dir": loc.state_dir, "host": loc.endpoint_host,
              "base_port": loc.endpoint_base_port, "python": loc.python, "bind_host": loc.bind_host}
    if target.kind == "endpoint":
        ep = target.endpoint
        register_model = LocalUploadModelOperator(
            task_id="register_model",
            display_name=ep.model_display_name,
            artifact_uri=model_dir,
            version_aliases=["run-{{ run_id | slug }}"],
            **common,
        )
        deploy = LocalDeployModelOperator(
            task_id="deploy",
            endpoint_display_name=ep.display_name,
            model_display_name=ep.model_display_name,
            model=register_model.output,
            split_uri=split_uri,
            smoke_instances=ep.smoke_instances,
            startup_timeout_s=loc.startup_timeout_s,
            **common,
        )
        return [register_model, deploy]
    convert_tflite = convert_tflite_task(target, run_uri, split_uri, model_dir)
    publish = PublishMobileModelOperator(
        task_id="publish",
        display_name=target.publish.display_name,
        tflite_uri=convert_tflite.output["tflite_uri"],
        tags=target.publish.tags,
        backend=target.publish.backend,
        local_bucket=loc.bucket,
        metadata=publish_metadata(target, model_dir),
    )
    return [convert_tflite, publish]

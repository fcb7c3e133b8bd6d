"""Local platform: GCS emulator, trainer and serving app as processes, registry in the bucket."""

from __future__ import annotations

from airflow.sdk import TaskGroup

from dual_deploy.config import Config, TargetConfig
from dual_deploy.operators.local_vertex import (
    LocalCustomTrainingJobOperator,
    LocalDeployModelOperator,
    LocalUploadModelOperator,
)
from dual_deploy.operators.publish import PublishMobileModelOperator
from dual_deploy.operators.tflite import ConvertToTFLiteOperator
from dual_deploy.platforms import trainer_args


def build_target_group(target: TargetConfig, cfg: Config, run_uri: str, split_uri: str) -> TaskGroup:
    loc = cfg.local
    common = {"local_bucket": loc.bucket, "state_dir": loc.state_dir, "host": loc.endpoint_host,
              "base_port": loc.endpoint_base_port, "python": loc.python, "bind_host": loc.bind_host}
    base_output_dir = f"{run_uri}/{target.name}"
    with TaskGroup(group_id=target.name, tooltip=f"{target.architecture} -> {target.kind}") as group:
        train = LocalCustomTrainingJobOperator(
            task_id="train",
            display_name=f"{target.name}-{{{{ run_id | slug }}}}",
            args=trainer_args(target, split_uri),
            base_output_dir=base_output_dir,
            environment={"STORAGE_EMULATOR_HOST": loc.storage_emulator_host},
            python=loc.python,
        )
        if target.kind == "endpoint":
            ep = target.endpoint
            register_model = LocalUploadModelOperator(
                task_id="register_model",
                display_name=ep.model_display_name,
                artifact_uri=train.output["model_dir"],
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
            train >> register_model >> deploy
        else:
            convert_tflite = ConvertToTFLiteOperator(
                task_id="convert_tflite",
                model_dir=train.output["model_dir"],
                split_uri=split_uri,
                output_dir=f"{base_output_dir}/tflite",
                mode=target.tflite.mode,
                min_agreement=target.tflite.min_agreement,
                max_accuracy_drop=target.tflite.max_accuracy_drop,
                max_size_mb=target.tflite.max_size_mb,
                num_calibration_images=target.tflite.num_calibration_images,
            )
            publish = PublishMobileModelOperator(
                task_id="publish",
                display_name=target.publish.display_name,
                tflite_uri=convert_tflite.output["tflite_uri"],
                tags=target.publish.tags,
                backend=target.publish.backend,
                local_bucket=loc.bucket,
                metadata={"run_id": "{{ run_id }}", "architecture": target.architecture},
            )
            train >> convert_tflite >> publish
    return group

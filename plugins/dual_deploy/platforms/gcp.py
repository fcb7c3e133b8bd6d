"""GCP platform: Vertex AI custom training, Model Registry and endpoints; Firebase for mobile.

Fills the shared TaskGroup shape (``platforms/__init__.py``) with the same task ids as the
local platform: ``train``, then ``register_model >> deploy`` or ``convert_tflite >> publish``.

Importing this module imports the Google provider's Vertex AI operators (and so
google.cloud.aiplatform, 10-15 s): ``platforms.build_target_group`` imports it only when
the platform is ``gcp``.
"""

from __future__ import annotations

from dual_deploy.config import Config, TargetConfig, TrainingConfig
from dual_deploy.operators.publish import PublishMobileModelOperator
from dual_deploy.operators.vertex import (
    CanaryDeployModelOperator,
    RegisterModelVersionOperator,
    VertexCustomJobOperator,
)
from dual_deploy.platforms import convert_tflite_task, publish_metadata, trainer_args

TRAINING_POLL_INTERVAL_S = 60


def machine_spec(training: TrainingConfig) -> dict:
    """Vertex AI MachineSpec; no accelerator fields when accelerator_type is unset or the count is 0."""
    spec: dict = {"machine_type": training.machine_type}
    if training.accelerator_type and training.accelerator_count:
        spec["accelerator_type"] = training.accelerator_type
        spec["accelerator_count"] = training.accelerator_count
    return spec


def worker_pool_specs(training: TrainingConfig, image_uri: str, args: list[str]) -> list[dict]:
    """One chief replica in pool 0; ``replica_count - 1`` more replicas (same machine) in pool 1.

    Vertex AI gives a multi-pool job TF_CONFIG / CLUSTER_SPEC (chief + workers)."""
    container = {"image_uri": image_uri, "args": list(args)}
    pools = [{"machine_spec": machine_spec(training), "replica_count": 1, "container_spec": container}]
    if training.replica_count > 1:
        pools.append({"machine_spec": machine_spec(training), "replica_count": training.replica_count - 1,
                      "container_spec": dict(container, args=list(args))})
    return pools


def custom_job(target: TargetConfig, cfg: Config, base_output_dir: str, split_uri: str) -> dict:
    """The CustomJob resource for a target's training (templated: display name, args, output dir)."""
    t = target.training
    job_spec: dict = {
        "worker_pool_specs": worker_pool_specs(t, cfg.gcp.trainer_image, trainer_args(target, split_uri)),
        # AIP_MODEL_DIR = <base_output_dir>/model/, AIP_CHECKPOINT_DIR, AIP_TENSORBOARD_LOG_DIR under it.
        "base_output_directory": {"output_uri_prefix": base_output_dir},
    }
    if cfg.gcp.service_account:
        job_spec["service_account"] = cfg.gcp.service_account
    if t.spot:
        job_spec["scheduling"] = {"strategy": "SPOT"}
    return {
        "display_name": f"dual-deploy-{target.name}-{{{{ run_id | slug }}}}",
        "labels": {"app": "dual-deploy", "target": target.name},
        "job_spec": job_spec,
    }


def _where(cfg: Config) -> dict:
    return {"project_id": cfg.gcp.project, "region": cfg.gcp.region, "gcp_conn_id": cfg.gcp.gcp_conn_id}


def train_task(target: TargetConfig, cfg: Config, run_uri: str, split_uri: str):
    base_output_dir = f"{run_uri}/{target.name}"
    return VertexCustomJobOperator(
        task_id="train",
        custom_job=custom_job(target, cfg, base_output_dir, split_uri),
        base_output_dir=base_output_dir,
        deferrable=True,
        poll_interval=TRAINING_POLL_INTERVAL_S,
        **_where(cfg),
    )


def delivery_tasks(target: TargetConfig, cfg: Config, run_uri: str, split_uri: str, model_dir) -> list:
    gcp = cfg.gcp
    if target.kind == "endpoint":
        ep = target.endpoint
        register_model = RegisterModelVersionOperator(
            task_id="register_model",
            display_name=ep.model_display_name,
            artifact_uri=model_dir,
            serving_image=gcp.serving_image,
            version_aliases=["run-{{ run_id | slug }}"],
            is_default_version=True,
            version_description="dual_deployment run {{ run_id }}",
            **_where(cfg),
        )
        deploy = CanaryDeployModelOperator(
            task_id="deploy",
            endpoint_display_name=ep.display_name,
            model_display_name=ep.model_display_name,
            model=register_model.output,
            split_uri=split_uri,
            machine_type=ep.machine_type,
            min_replica_count=ep.min_replica_count,
            max_replica_count=ep.max_replica_count,
            canary_traffic_percent=ep.canary_traffic_percent,
            smoke_instances=ep.smoke_instances,
            **_where(cfg),
        )
        return [register_model, deploy]
    convert_tflite = convert_tflite_task(target, run_uri, split_uri, model_dir, gcp_conn_id=gcp.gcp_conn_id)
    publish = PublishMobileModelOperator(
        task_id="publish",
        display_name=target.publish.display_name,
        tflite_uri=convert_tflite.output["tflite_uri"],
        tags=target.publish.tags,
        backend=target.publish.backend,
        metadata=publish_metadata(target, model_dir),
        gcp_conn_id=gcp.gcp_conn_id,
        firebase_conn_id=gcp.firebase_conn_id,
        firebase_project=gcp.firebase_project,
        firebase_storage_bucket=gcp.firebase_storage_bucket,
        unlock_timeout_s=target.publish.unlock_timeout_s,
        remote_config_parameter=target.publish.remote_config_parameter,
    )
    return [convert_tflite, publish]

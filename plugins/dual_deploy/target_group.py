"""One TaskGroup per target, the same on every platform (local and GCP differ only in configuration):

- endpoint targets: ``selected >> train >> champion_gate >> register_model >> deploy``
- mobile targets:   ``selected >> train >> champion_gate >> convert_tflite >> publish``

``selected`` skips the group when a manual run's ``targets`` Param leaves it out; ``train`` is a
Vertex AI custom job; ``champion_gate`` skips delivery when the new model does not beat the one
serving; ``register_model`` / ``deploy`` are the Model Registry and a canary endpoint deployment;
``convert_tflite`` / ``publish`` validate the .tflite and publish it through Firebase.

A target with ``training.method: automl`` trains with Vertex AI AutoML instead (``automl_training``):
``import_file >> create_dataset >> import_data >> train`` (plus ``export_model`` for mobile targets),
then the same gate and delivery; its model is already registered by the training pipeline, deploys
on automatic resources, and its exported .tflite is validated rather than converted.
"""

from __future__ import annotations

from airflow.providers.standard.operators.python import ShortCircuitOperator
from airflow.sdk import TaskGroup

from dual_deploy.config import Config, TargetConfig, TrainingConfig
from dual_deploy.operators.gate import ChampionGateOperator
from dual_deploy.operators.publish import PublishMobileModelOperator
from dual_deploy.operators.tflite import ConvertToTFLiteOperator
from dual_deploy.operators.vertex import (
    CanaryDeployModelOperator,
    RegisterModelVersionOperator,
    VertexCustomJobOperator,
)

TRAINING_POLL_INTERVAL_S = 60


# ---------------------------------------------------------------------------- training job


def trainer_args(target: TargetConfig, split_uri: str) -> list[str]:
    """The trainer container's args. ``--epochs`` is templated so a manual run's ``epochs`` Param
    overrides the config."""
    t = target.training
    args = [f"--architecture={target.architecture}", f"--split-uri={split_uri}"]
    args += [a for a in t.trainer_args() if not a.startswith("--epochs=")]
    args.append(f"--epochs={{{{ params.epochs or {t.epochs} }}}}")
    return args


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
    """The CustomJob resource for a target's training (templated: display name, labels, args).

    The labels identify the run and target: a retry of ``train`` finds the job by them and
    re-attaches to it instead of starting a second one."""
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
        "display_name": f"{{{{ run_id | display_name('dual-deploy-{target.name}-') }}}}",
        "labels": {"app": "dual-deploy", "dag": "{{ dag.dag_id | run_label }}", "run": "{{ run_id | run_label }}",
                   "target": target.name},
        "job_spec": job_spec,
    }


def _where(cfg: Config) -> dict:
    return {"project_id": cfg.gcp.project, "region": cfg.gcp.region, "gcp_conn_id": cfg.gcp.gcp_conn_id}


def train_task(target: TargetConfig, cfg: Config, run_uri: str, split_uri: str) -> VertexCustomJobOperator:
    base_output_dir = f"{run_uri}/{target.name}"
    return VertexCustomJobOperator(
        task_id="train",
        custom_job=custom_job(target, cfg, base_output_dir, split_uri),
        base_output_dir=base_output_dir,
        deferrable=True,
        poll_interval=cfg.gcp.poll_interval_s,
        **_where(cfg),
    )


# ---------------------------------------------------------------------------- AutoML training


def automl_training(target: TargetConfig, cfg: Config, run_uri: str, split_uri: str) -> tuple:
    """``import_file >> create_dataset >> import_data >> train [>> export_model]``: (first, train, last).

    The dataset is built from the run's split (``ml_use`` per image), so AutoML trains, validates and
    is evaluated on the custom models' images. Imported here, not at module level: only a config with
    AutoML targets pays for the provider's AutoML modules at parse time."""
    from dual_deploy.operators.automl import (
        IMAGE_DATASET_SCHEMA,
        SINGLE_LABEL_IMPORT_SCHEMA,
        AutoMLImportFileOperator,
        VertexAutoMLImageTrainingOperator,
        VertexCreateDatasetOperator,
        VertexExportModelOperator,
        VertexImportDataOperator,
    )

    base = f"{run_uri}/{target.name}"
    labels = {"app": "dual-deploy", "dag": "{{ dag.dag_id | run_label }}", "run": "{{ run_id | run_label }}",
              "target": target.name}
    display_name = f"{{{{ run_id | display_name('dual-deploy-{target.name}-') }}}}"
    import_file = AutoMLImportFileOperator(task_id="import_file", split_uri=split_uri,
                                           import_file_uri=f"{base}/automl/import.csv", gcp_conn_id=cfg.gcp.gcp_conn_id)
    create_dataset = VertexCreateDatasetOperator(
        task_id="create_dataset", **_where(cfg),
        dataset={"display_name": display_name, "metadata_schema_uri": IMAGE_DATASET_SCHEMA, "labels": labels})
    import_data = VertexImportDataOperator(
        task_id="import_data", dataset_id=create_dataset.output["dataset_id"], **_where(cfg),
        import_configs=[{"gcs_source": {"uris": [f"{base}/automl/import.csv"]},
                         "import_schema_uri": SINGLE_LABEL_IMPORT_SCHEMA}])
    a = target.automl
    train = VertexAutoMLImageTrainingOperator(
        task_id="train", display_name=display_name, dataset_id=create_dataset.output["dataset_id"],
        model_type=a.model_type, budget_milli_node_hours=a.budget_milli_node_hours,
        disable_early_stopping=a.disable_early_stopping, labels=labels,
        model_display_name=target.endpoint.model_display_name if target.endpoint else target.publish.display_name,
        model_version_aliases=["{{ run_id | run_alias }}"], model_version_description="dual_deployment run {{ run_id }}",
        model_dir=f"{base}/model", split_uri=split_uri, base_output_dir=base, poll_interval_s=cfg.gcp.poll_interval_s,
        **_where(cfg))
    import_file >> create_dataset >> import_data >> train
    if target.kind != "mobile":
        return import_file, train, train
    # The SavedModel lands under model_dir: the reference of the TFLite gate and of later champion gates.
    export = VertexExportModelOperator(task_id="export_model", model_id=train.output["model_version"], **_where(cfg),
                                       destinations={"tf-saved-model": f"{base}/model", "tflite": f"{base}/export"})
    train >> export
    return import_file, train, export


# ---------------------------------------------------------------------------- delivery


def endpoint_delivery(target: TargetConfig, cfg: Config, split_uri: str, model_dir, train=None) -> list:
    ep = target.endpoint
    if target.is_automl:  # the training pipeline registered the version: report it, deploy on automatic resources
        from dual_deploy.operators.automl import AutoMLModelVersionOperator

        register_model = AutoMLModelVersionOperator(task_id="register_model", model=train.output["model"],
                                                    **_where(cfg))
    else:
        register_model = _register_custom(target, cfg, model_dir)
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
        image_size=None if target.is_automl else target.training.image_size,
        automatic_resources=target.is_automl,
        instance_format="automl_image" if target.is_automl else "b64",
        operation_poll_max_s=cfg.gcp.poll_interval_s,
        **_where(cfg),
    )
    return [register_model, deploy]


def _register_custom(target: TargetConfig, cfg: Config, model_dir) -> RegisterModelVersionOperator:
    ep = target.endpoint
    return RegisterModelVersionOperator(
        task_id="register_model",
        display_name=ep.model_display_name,
        artifact_uri=model_dir,
        serving_image=cfg.gcp.serving_image,
        version_aliases=["{{ run_id | run_alias }}"],
        version_description="dual_deployment run {{ run_id }}",
        **_where(cfg),
    )


def publish_metadata(target: TargetConfig, model_dir) -> dict:
    """Stored with the published mobile model: which run and which trained model it came from."""
    return {"run_id": "{{ run_id }}", "architecture": target.model_family, "model_dir": model_dir}


def mobile_delivery(target: TargetConfig, cfg: Config, run_uri: str, split_uri: str, model_dir, export=None) -> list:
    t, gcp = target.tflite, cfg.gcp
    # AutoML: the exported .tflite is validated against the exported SavedModel, not converted.
    exported = {"exported_tflite_uri": export.output["tflite_uri"], "exported_labels_uri": export.output["labels_uri"]
                } if target.is_automl else {}
    convert_tflite = ConvertToTFLiteOperator(
        task_id="convert_tflite",
        model_dir=model_dir,
        split_uri=split_uri,
        output_dir=f"{run_uri}/{target.name}/tflite",
        mode=t.mode,
        min_agreement=t.min_agreement,
        max_accuracy_drop=t.max_accuracy_drop,
        max_size_mb=t.max_size_mb,
        num_calibration_images=t.num_calibration_images,
        gcp_conn_id=gcp.gcp_conn_id,
        **exported,
    )
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


# ---------------------------------------------------------------------------- the group


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


def build_target_group(target: TargetConfig, cfg: Config, run_uri: str, split_uri: str) -> TaskGroup:
    with TaskGroup(group_id=target.name, tooltip=f"{target.model_family} -> {target.kind}") as group:
        selected = ShortCircuitOperator(
            task_id="selected",
            python_callable=is_selected,
            op_kwargs={"target": target.name},
            ignore_downstream_trigger_rules=False,
        )
        if target.is_automl:
            first, train, last = automl_training(target, cfg, run_uri, split_uri)
        else:
            first = last = train = train_task(target, cfg, run_uri, split_uri)
        model_dir = train.output["model_dir"]
        champion_gate = ChampionGateOperator(
            task_id="champion_gate",
            model_dir=model_dir,
            split_uri=split_uri,
            champion_uri=champion_uri(cfg, target),
            tolerance=target.gate.tolerance,
            min_accuracy=target.gate.min_accuracy,
            min_macro_f1=target.gate.min_macro_f1,
            allow_class_change=target.gate.allow_class_change,
            retries=0,
        )
        delivery = (endpoint_delivery(target, cfg, split_uri, model_dir, train) if target.kind == "endpoint"
                    else mobile_delivery(target, cfg, run_uri, split_uri, model_dir, last))
        selected >> first
        last >> champion_gate >> delivery[0]
        for upstream, downstream in zip(delivery, delivery[1:], strict=False):
            upstream >> downstream
    return group

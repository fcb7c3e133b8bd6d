"""Typed contracts between the steps: what each task pushes to XCom, what the run summary,
the champion records and the training ledger hold.

Documentation that type checkers read: nothing here is enforced at runtime, and this module
imports nothing but ``typing`` (DAG files import it indirectly; parse time matters).
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired, TypedDict

# ------------------------------------------------------------------ step XComs (return_value)


class Metrics(TypedDict, total=False):
    """``<model_dir>/metrics.json`` written by the trainer (test split)."""

    accuracy: float
    macro_f1: float
    num_examples: int
    per_class: dict[str, dict[str, float]]
    confusion_matrix: list[list[int]]
    labels: list[str]


class TrainResult(TypedDict):
    """``<target>.train`` (VertexCustomJobOperator)."""

    model_dir: str
    base_output_dir: str
    metrics: Metrics
    custom_job_name: NotRequired[str | None]
    duration_s: float | None


class AutoMLTrainResult(TrainResult):
    """``<target>.train`` of a ``training.method: automl`` target (VertexAutoMLImageTrainingOperator):
    the custom-training keys (``model_dir`` holds metrics.json and labels.txt) plus AutoML's."""

    method: Literal["automl"]
    model_type: str
    budget_milli_node_hours: int
    cost_milli_node_hours: int | None  # what the training pipeline reports (at most the budget)
    stop_reason: str | None  # BUDGET_REACHED | MODEL_CONVERGED
    training_pipeline_name: str
    training_pipeline_id: str
    model: str  # projects/.../models/<id>@<version>
    model_version: str  # <id>@<version>
    model_id: str
    model_version_id: str
    dataset_id: str
    reattached: bool


class ExportResult(TypedDict, total=False):
    """``<target>.export_model`` (VertexExportModelOperator), AutoML mobile targets."""

    exports: dict[str, str]  # export format -> the folder Vertex wrote it to
    tflite_uri: str
    labels_uri: str  # dict.txt beside the .tflite
    saved_model_uri: str
    duration_s: float


class GateResult(TypedDict):
    """``<target>.champion_gate`` (ChampionGateOperator); pushed before a skip too."""

    promote: bool
    reason: str
    challenger: dict[str, Any]
    champion: dict[str, Any] | None
    champion_uri: str
    # {added, removed, champion_labels, labels} when the class set changed since the champion
    class_change: NotRequired[dict[str, list[str]] | None]
    allow_class_change: NotRequired[bool]
    duration_s: float


class RegisterResult(TypedDict, total=False):
    """``<target>.register_model`` (RegisterModelVersionOperator)."""

    model_id: str
    model_version_id: str
    model_resource_name: str
    version_aliases: list[str]
    artifact_uri: str
    serving_container_image_uri: str
    parent_model: str | None
    duration_s: float


class DeployResult(TypedDict, total=False):
    """``<target>.deploy`` (CanaryDeployModelOperator)."""

    endpoint_id: str
    endpoint_display_name: str
    endpoint_created: bool
    prediction_url: str
    deployed_model_id: str
    model_version_id: str
    smoke_test: dict[str, Any]
    traffic_split: dict[str, int]
    canary_traffic_percent: int
    previous_deployed_model_ids: list[str]
    undeployed: list[str]
    undeploy_errors: dict[str, str]
    duration_s: float


class TFLiteResult(TypedDict, total=False):
    """``<target>.convert_tflite`` (ConvertToTFLiteOperator)."""

    tflite_uri: str
    report_uri: str
    mode: str
    sha256: str
    size_bytes: int
    top1_agreement: float
    keras_accuracy: float
    tflite_accuracy: float
    accuracy_delta: float
    latency_ms_mean: float
    latency_ms_p95: float
    passed: bool
    num_examples: int
    duration_s: float


class PublishResult(TypedDict, total=False):
    """``<target>.publish`` (PublishMobileModelOperator)."""

    backend: str
    model_id: str
    display_name: str
    version: int | str
    tags: list[str]
    published: bool
    model_hash: str
    tflite_uri: str
    created: bool
    duration_s: float


class NewDatasetResult(TypedDict):
    """``find_new_dataset`` (FindNewDatasetOperator): the batch to train and the run to start."""

    data_uri: str
    fingerprint: str
    batch: str
    run_id: str
    attempt: int
    max_attempts: int


class FailureRecord(TypedDict):
    """XCom ``dual_deploy_failure`` pushed by the failure callback of a task that failed for good
    (``dag_helpers.DEFAULT_ARGS``; retries that are still to come push nothing)."""

    task_id: str
    message: str
    exception: str
    try_number: int | None
    failed_at: str


# ------------------------------------------------------------------ the run summary


class StepFailure(TypedDict):
    task_id: str
    message: str


class TargetSummary(TypedDict, total=False):
    kind: str
    # success | failed | not_promoted (the gate kept the champion) | not_selected (targets Param)
    status: Literal["success", "failed", "not_promoted", "not_selected"]
    failed_steps: list[StepFailure]  # this target's steps that failed, with their messages
    not_run: list[str]  # steps that never ran because something upstream failed
    cause: StepFailure | None  # why the target failed: its first failed step, or the run's first failure
    training: dict[str, Any]
    metrics: Metrics
    decision: dict[str, Any]
    model: RegisterResult
    endpoint: DeployResult
    tflite: TFLiteResult
    published: PublishResult
    export: ExportResult
    model_family: str  # "densenet121 64px" or "AutoML CLOUD"


class ComparisonRow(TypedDict, total=False):
    """One model in the AutoML / custom comparison (same split fingerprint)."""

    target: str
    run_id: str
    this_run: bool
    kind: str
    status: str
    method: Literal["automl", "custom"]
    model: str | None
    accuracy: float | None
    macro_f1: float | None
    tflite_size_bytes: int | None
    tflite_latency_ms_p95: float | None
    tflite_agreement: float | None
    training_s: float | None
    training_usd: float | None
    cost_estimate_only: bool | None


class ServingRecord(TypedDict):
    run_id: str | None
    model_dir: str | None
    labels: list[str] | None


class ChannelsReport(TypedDict):
    """What each target's channel serves now (its champion record) and whether they agree."""

    consistent: bool
    warnings: list[str]
    serving: dict[str, ServingRecord | None]


class LedgerNote(TypedDict):
    fingerprint: str
    status: str
    attempt: int
    max_attempts: int
    note: str


class RunSummary(TypedDict, total=False):
    dag_id: str
    run_id: str
    platform: str
    written_at: str
    status: Literal["success", "failed"]
    first_failure: StepFailure | None  # the first task that failed, and its error message
    artifacts_uri: str
    summary_uri: str
    data: dict[str, Any] | None
    split: dict[str, Any] | None
    targets: dict[str, TargetSummary]
    steps: dict[str, dict[str, Any]]
    champions: dict[str, str]  # target -> what was recorded as its champion in this run
    ledger: LedgerNote | None
    channels: ChannelsReport
    cost: dict[str, Any]
    comparison: dict[str, Any]  # {"split_fingerprint", "rows": [ComparisonRow]} when AutoML and custom share a split
    report_uri: str | None
    local_report_path: str
    # Optional parts (cost, report, channel check, ...) that could not be produced, and why.
    warnings: list[str]
    # State that could not be recorded (champions, ledger): the summary task fails and retries.
    recording_errors: list[str]


# ------------------------------------------------------------------ records shared between runs


class ChampionRecord(TypedDict, total=False):
    """``<artifacts root>/champions/<target>.json``: the model a target's channel serves now."""

    model_dir: str
    run_id: str
    summary_uri: str  # the delivering run's run_summary.json
    method: str  # custom | automl
    accuracy: float | None
    macro_f1: float | None
    labels: list[str] | None
    delivery: dict[str, Any]  # endpoint/version or published model/version
    written_at: str
    previous: list[dict[str, Any]]  # earlier champions, newest first (bounded)


class LedgerAttempt(TypedDict, total=False):
    run_id: str
    # triggered (by the new-data DAG) | success | failed | not_started (the trigger never created it)
    status: str
    at: str
    failure: StepFailure | None
    permanent: bool  # the data itself was rejected: retrying the same bytes cannot help
    summary_uri: str


class LedgerEntry(TypedDict, total=False):
    """One fingerprint in the training ledger (``triggers.ledger_uri``)."""

    data_uri: str
    run_id: str  # latest attempt's run
    status: str  # latest attempt's status
    max_attempts: int
    attempts: list[LedgerAttempt]
    summary_uri: str
    updated_at: str

"""The one validated place for configuration.

``dags/config/dual_deploy.yaml`` holds the defaults for every platform plus per-platform
overrides; ``DUAL_DEPLOY_PLATFORM`` (or the Airflow Variable ``dual_deploy_platform``, set
as ``AIRFLOW_VAR_DUAL_DEPLOY_PLATFORM``) picks the platform; ``DUAL_DEPLOY_CONFIG`` points at
another file. Errors name the key and the allowed values.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dual_deploy import names

PLATFORMS = ("local", "gcp")
# Vertex AI AutoML image classification (AutoMlImageClassificationInputs): the model types an endpoint
# (CLOUD: served by Vertex, not exportable) and a mobile target (exportable edge models) can use, each
# type's budget range in milli node hours (inclusive), and Vertex's minimum of images per label.
AUTOML_CLOUD_TYPES = ("CLOUD",)
AUTOML_MOBILE_TYPES = ("MOBILE_TF_LOW_LATENCY_1", "MOBILE_TF_VERSATILE_1", "MOBILE_TF_HIGH_ACCURACY_1")
AUTOML_BUDGETS = {"CLOUD": (8_000, 800_000), **{t: (1_000, 100_000) for t in AUTOML_MOBILE_TYPES}}
AUTOML_MIN_IMAGES_PER_LABEL = 10
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "dags" / "config" / "dual_deploy.yaml"


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key and how to fix it."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Strict):
    uri: str = Field(description="image folder root: gs://bucket/prefix (tf_flowers layout)")
    val_fraction: float = Field(0.15, gt=0, lt=1)
    test_fraction: float = Field(0.15, gt=0, lt=1)
    seed: int = 42
    min_classes: int = Field(2, ge=2)
    min_images_per_class: int = Field(5, ge=3)
    max_bad_fraction: float = Field(0.02, ge=0, lt=1)

    @field_validator("uri")
    @classmethod
    def _gcs(cls, v: str) -> str:
        if not v.startswith("gs://"):
            raise ValueError(f"must be a gs:// URI (the local platform runs a GCS emulator), got {v!r}")
        return v.rstrip("/")


class TrainingConfig(_Strict):
    image_size: int = Field(224, ge=32, le=1024)
    batch_size: int = Field(32, ge=1)
    epochs: int = Field(10, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    weights: str | None = "imagenet"
    fine_tune_epochs: int = Field(0, ge=0)
    fine_tune_at: int = Field(0, ge=0)
    early_stopping_patience: int = Field(3, ge=1)
    augment: bool = True
    deterministic: bool = False  # reproducible training; the local platform turns it on
    # Vertex AI machine for this target's training job (ignored by the local platform).
    machine_type: str = "n1-standard-4"
    accelerator_type: str | None = "NVIDIA_TESLA_T4"
    accelerator_count: int = Field(1, ge=0)
    replica_count: int = Field(1, ge=1)
    spot: bool = False
    # custom: the trainer container as a Vertex AI custom job; automl: Vertex AI AutoML (the target's automl:)
    method: Literal["custom", "automl"] = "custom"

    def trainer_args(self) -> list[str]:
        """CLI flags for ``python -m dualml.trainer``: the same list locally and on Vertex."""
        args = [
            f"--image-size={self.image_size}",
            f"--batch-size={self.batch_size}",
            f"--epochs={self.epochs}",
            f"--learning-rate={self.learning_rate}",
            f"--weights={self.weights or 'none'}",
            f"--fine-tune-epochs={self.fine_tune_epochs}",
            f"--fine-tune-at={self.fine_tune_at}",
            f"--early-stopping-patience={self.early_stopping_patience}",
            f"--augment={str(self.augment).lower()}",
            f"--deterministic={str(self.deterministic).lower()}",
        ]
        return args


class AutoMLConfig(_Strict):
    """A target trained by Vertex AI AutoML image classification instead of the trainer container."""

    model_type: Literal["CLOUD", "MOBILE_TF_LOW_LATENCY_1", "MOBILE_TF_VERSATILE_1", "MOBILE_TF_HIGH_ACCURACY_1"]
    budget_milli_node_hours: int
    disable_early_stopping: bool = False  # true: always spend the whole budget

    @field_validator("budget_milli_node_hours")
    @classmethod
    def _budget(cls, v: int, info) -> int:
        model_type = info.data.get("model_type")
        if model_type in AUTOML_BUDGETS:
            low, high = AUTOML_BUDGETS[model_type]
            if not low <= v <= high:
                raise ValueError(f"{v:,} milli node hours is outside Vertex AI's range for model_type {model_type}: "
                                 f"{low:,} to {high:,} (1,000 = one node hour)")
        return v


class EndpointConfig(_Strict):
    display_name: str
    model_display_name: str
    machine_type: str = "n1-standard-4"
    min_replica_count: int = Field(1, ge=1)
    max_replica_count: int = Field(1, ge=1)
    canary_traffic_percent: int = Field(10, ge=1, le=100)
    smoke_instances: int = Field(2, ge=1, le=16)

    @field_validator("display_name")
    @classmethod
    def _endpoint_name(cls, v: str) -> str:
        return names.check_vertex_display_name(v)

    @field_validator("model_display_name")
    @classmethod
    def _model_name(cls, v: str) -> str:
        # Deployed models are named "<model_display_name>-v<version>".
        return names.check_vertex_display_name(v, reserve=10)


class TFLiteConfig(_Strict):
    mode: Literal["float32", "dynamic", "float16", "int8"] = "dynamic"
    min_agreement: float = Field(0.99, ge=0, le=1)
    max_accuracy_drop: float = Field(0.01, ge=0, le=1)
    max_size_mb: float | None = Field(20.0, gt=0)
    num_calibration_images: int = Field(100, ge=1)


class PublishConfig(_Strict):
    display_name: str
    tags: list[str] = []
    # firebase_storage: Cloud Storage for Firebase + manifest (+ Remote Config); firebase_ml: Firebase ML
    # custom models, which shut down on 2027-06-15 (selectable until then).
    backend: Literal["firebase_ml", "firebase_storage"] = "firebase_storage"
    unlock_timeout_s: int = Field(600, ge=1)  # Firebase ML: wait for the model to unlock after an upload
    remote_config_parameter: str | None = None  # firebase_storage: also point this Remote Config parameter at it

    @field_validator("display_name")
    @classmethod
    def _firebase_name(cls, v: str) -> str:
        # Firebase ML's rule for every backend, so a target can switch backends without renaming its model.
        return names.check_firebase_ml_display_name(v)

    @field_validator("tags")
    @classmethod
    def _firebase_tags(cls, v: list[str]) -> list[str]:
        return names.check_firebase_tags(v)


class GateConfig(_Strict):
    """Champion/challenger gate: a new model is delivered only if it meets the minimums and beats
    (or ties within ``tolerance``) the serving model on the same test split."""

    min_accuracy: float = Field(0.5, ge=0, le=1)
    min_macro_f1: float = Field(0.0, ge=0, le=1)
    tolerance: float = Field(0.01, ge=0, le=1)
    # A model whose class set differs from the champion's (classes added/removed) is delivered only
    # with this opt-in (or the run Param allow_class_change): never silently.
    allow_class_change: bool = False


class TargetConfig(_Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,30}$")
    kind: Literal["endpoint", "mobile"]
    architecture: Literal["densenet121", "mobilenet_v3_small", "mobilenet_v3_large"] | None = None  # custom only
    training: TrainingConfig = TrainingConfig()
    automl: AutoMLConfig | None = None  # with training.method: automl
    gate: GateConfig = GateConfig()
    endpoint: EndpointConfig | None = None
    tflite: TFLiteConfig | None = None
    publish: PublishConfig | None = None

    @model_validator(mode="after")
    def _kind_sections(self):
        if self.kind == "endpoint" and self.endpoint is None:
            raise ValueError(f"target {self.name!r} has kind 'endpoint' but no 'endpoint:' section")
        if self.kind == "mobile" and (self.tflite is None or self.publish is None):
            raise ValueError(f"target {self.name!r} has kind 'mobile' but lacks a 'tflite:' or 'publish:' section")
        self._check_method()
        return self

    def _check_method(self) -> None:
        if self.training.method == "custom":
            if self.automl is not None:
                raise ValueError(f"target {self.name!r} has an 'automl:' section but training.method is 'custom': set "
                                 "training.method: automl, or remove the automl: section")
            if self.architecture is None:
                raise ValueError(f"target {self.name!r}: architecture is required for training.method 'custom' "
                                 "(densenet121, mobilenet_v3_small or mobilenet_v3_large)")
            return
        if self.automl is None:
            raise ValueError(f"target {self.name!r} has training.method 'automl' but no 'automl:' section "
                             "(model_type, budget_milli_node_hours)")
        allowed = AUTOML_CLOUD_TYPES if self.kind == "endpoint" else AUTOML_MOBILE_TYPES
        if self.automl.model_type not in allowed:
            why = ("an endpoint serves a CLOUD model" if self.kind == "endpoint"
                   else "a mobile target needs a model Vertex AI can export to .tflite")
            raise ValueError(f"target {self.name!r}: automl.model_type {self.automl.model_type} does not fit kind "
                             f"{self.kind!r} ({why}): use {' or '.join(allowed)}")

    @property
    def is_automl(self) -> bool:
        return self.training.method == "automl"

    @property
    def model_family(self) -> str:
        """What is trained, for labels and tooltips: the architecture, or the AutoML model type."""
        return f"AutoML {self.automl.model_type}" if self.is_automl else str(self.architecture)


class LocalConfig(_Strict):
    """The local platform's own settings. Everything cloud-facing is configured under ``gcp:`` as on
    Google Cloud; locally those calls reach the GCS emulator and the local Vertex AI server through
    ``STORAGE_EMULATOR_HOST`` / ``VERTEX_AI_EMULATOR_HOST`` (set by ``make run``)."""

    bucket: str = "dual-deploy-local"  # created in the GCS emulator by make run
    state_dir: str = ".state"  # where make run keeps the run summary copy and the report


class GcpConfig(_Strict):
    project: str = ""
    region: str = "us-central1"
    trainer_image: str = ""
    serving_image: str = ""
    service_account: str | None = None
    firebase_project: str | None = None
    firebase_storage_bucket: str | None = None
    gcp_conn_id: str = "google_cloud_default"
    firebase_conn_id: str = "firebase_default"
    # How often the triggerer polls a training job's state; also the longest gap between two polls of an
    # endpoint operation (deploy, traffic, undeploy), which back off from 1 s up to it.
    poll_interval_s: int = Field(60, ge=1)


class TriggersConfig(_Strict):
    """Data-triggered retraining (dags/dual_deployment_new_data.py).

    Uploaders put a complete dataset under ``<incoming_uri>/<batch>/<class>/*.jpg`` and write the
    marker ``<incoming_uri>/<batch>/<marker_name>`` LAST; a batch without its marker is an upload in
    progress and is never trained.
    """

    incoming_uri: str = "gs://your-bucket/incoming"
    marker_name: str = "_COMPLETE"
    watch_schedule: str | None = "*/15 * * * *"
    sensor_poke_interval_s: int = Field(60, ge=1)
    sensor_timeout_s: int = Field(14 * 60, ge=10)
    ledger_uri: str = "gs://your-bucket/dual-deploy/ledger.json"
    # A batch whose run failed is retried by the new-data DAG until this many runs failed on it
    # (data rejected by validation is never retried); a success is never trained again.
    max_attempts_per_batch: int = Field(3, ge=1, le=20)

    @field_validator("incoming_uri", "ledger_uri")
    @classmethod
    def _gcs(cls, v: str) -> str:
        if not v.startswith("gs://"):
            raise ValueError(f"must be a gs:// URI, got {v!r}")
        return v.rstrip("/")


class Config(_Strict):
    platform: Literal["local", "gcp"] = "local"
    artifacts_uri: str
    data: DataConfig
    schedule: str | None = "0 3 * * 1"
    targets: list[TargetConfig]
    triggers: TriggersConfig = TriggersConfig()
    local: LocalConfig = LocalConfig()
    gcp: GcpConfig = GcpConfig()

    @model_validator(mode="after")
    def _checks(self):
        names = [t.name for t in self.targets]
        if not names:
            raise ValueError("no targets: add at least one entry under 'targets:'")
        if len(set(names)) != len(names):
            raise ValueError(f"target names must be unique, got {names}")
        if not self.artifacts_uri.startswith("gs://"):
            raise ValueError(f"artifacts_uri must be a gs:// URI, got {self.artifacts_uri!r}")
        custom = [t for t in self.targets if not t.is_automl]
        needed = ["project"] + (["trainer_image"] if custom else []) + (
            ["serving_image"] if any(t.kind == "endpoint" for t in custom) else [])
        missing = [k for k in needed if not getattr(self.gcp, k)]
        if missing:
            raise ValueError(f"platform {self.platform!r} needs gcp.{', gcp.'.join(missing)} set in the config file")
        automl = [t.name for t in self.targets if t.is_automl]
        if automl and self.data.min_images_per_class < AUTOML_MIN_IMAGES_PER_LABEL:
            raise ValueError(f"data.min_images_per_class is {self.data.min_images_per_class} but target(s) {automl} "
                             f"train with AutoML, which needs at least {AUTOML_MIN_IMAGES_PER_LABEL} images per label: "
                             f"set data.min_images_per_class to {AUTOML_MIN_IMAGES_PER_LABEL} or more (a dataset "
                             "with fewer is then rejected before anything is trained)")
        self._check_firebase_bucket()
        return self

    def _check_firebase_bucket(self) -> None:
        # Both Firebase backends upload through the Cloud Storage for Firebase bucket: fail at parse
        # time, not at `publish` after the GPU training.
        firebase = [t for t in self.targets if t.publish and t.publish.backend in ("firebase_ml", "firebase_storage")]
        bucket = self.gcp.firebase_storage_bucket
        if firebase and not bucket:
            uses = ", ".join(f"targets[{t.name}].publish.backend={t.publish.backend}" for t in firebase)
            raise ValueError(f"gcp.firebase_storage_bucket is not set but {uses} uploads through it: set it to the "
                             "project's Cloud Storage for Firebase bucket (e.g. my-project.firebasestorage.app)")
        if firebase and bucket.startswith("gs://"):
            raise ValueError(f"gcp.firebase_storage_bucket must be a bucket name, not a URI: "
                             f"{bucket.removeprefix('gs://').rstrip('/')!r} instead of {bucket!r}")

    def target(self, name: str) -> TargetConfig:
        for t in self.targets:
            if t.name == name:
                return t
        raise ConfigError(f"no target named {name!r}; configured: {[t.name for t in self.targets]}")


def _deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _merge_targets(targets: list[dict], overrides: dict) -> list[dict]:
    """Per-platform target overrides are keyed by target name."""
    names = [t.get("name") for t in targets]
    duplicated = sorted({n for n in names if names.count(n) > 1}, key=str)
    if duplicated:
        # Checked before merging: an override keyed by a duplicated name would land on every copy
        # and surface as some unrelated missing-field error instead.
        raise ConfigError(f"target names must be unique (targets[].name), duplicated: {duplicated}")
    unknown = set(overrides) - {t.get("name") for t in targets}
    if unknown:
        raise ConfigError(f"platform override for unknown target(s) {sorted(unknown)}")
    return [_deep_merge(t, overrides.get(t.get("name"), {})) for t in targets]


def resolve_platform(raw_default: str | None = None) -> str:
    value = (
        os.environ.get("DUAL_DEPLOY_PLATFORM")
        or os.environ.get("AIRFLOW_VAR_DUAL_DEPLOY_PLATFORM")
        or raw_default
        or "local"
    ).strip().lower()
    if value not in PLATFORMS:
        raise ConfigError(f"platform {value!r} is not one of {', '.join(PLATFORMS)} (DUAL_DEPLOY_PLATFORM)")
    return value


def build_config(raw: dict, platform: str | None = None) -> Config:
    """Merge ``platforms.<platform>`` over the base and validate."""
    raw = dict(raw or {})
    platforms = raw.pop("platforms", {}) or {}
    platform = platform or resolve_platform(raw.get("platform"))
    override = dict(platforms.get(platform, {}) or {})
    target_overrides = override.pop("targets", {}) or {}
    merged = _deep_merge(raw, override)
    merged["targets"] = _merge_targets(merged.get("targets", []), target_overrides)
    merged["platform"] = platform
    try:
        return Config.model_validate(merged)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"invalid dual-deploy config ({platform}): {problems}") from None


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(text: str) -> str:
    """``${VAR}`` / ``${VAR:-default}`` in the config file come from the environment (docker-compose
    and Composer set per-deployment values such as the emulator host without editing the file)."""

    def sub(m: re.Match) -> str:
        value = os.environ.get(m.group(1))
        if value is None and m.group(2) is None:
            raise ConfigError(f"config references ${{{m.group(1)}}} but it is not set (or give a default: ${{VAR:-x}})")
        return value if value is not None else m.group(2)

    return _ENV_REF.sub(sub, text)


def _load_file(path: str) -> dict:
    try:
        with open(path) as f:
            return yaml.safe_load(expand_env(f.read())) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found (set DUAL_DEPLOY_CONFIG)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None


def load_config(path: str | os.PathLike | None = None, platform: str | None = None) -> Config:
    path = str(path or os.environ.get("DUAL_DEPLOY_CONFIG") or DEFAULT_CONFIG)
    return build_config(_load_file(path), platform)


def load_dag_config(dag_file: str | os.PathLike) -> Config:
    """The config a DAG file uses: ``DUAL_DEPLOY_CONFIG`` if set, else ``config/dual_deploy.yaml``
    beside the DAG file (so it travels with dags/ to Composer)."""
    return load_config(os.environ.get("DUAL_DEPLOY_CONFIG") or Path(dag_file).parent / "config" / "dual_deploy.yaml")

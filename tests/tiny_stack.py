"""A `make up` stack (plugins/dual_deploy/local_stack.py) for tests: throw-away state, free ports, tiny runs.

Used by tests/test_triggers_e2e.py and tests/test_ui_browser.py, so both bring Airflow up exactly as
`make up` does. What differs from `make up` is only the input:

- Airflow runs a snapshot of dags/, plugins/ and include/ taken when the test starts: the
  dag-processor re-parses files that change, so an edit to the working tree during the (minutes
  long) run must not swap the DAG under a running dag run;
- the config is ``dags/config/dual_deploy.yaml`` with the local platform shrunk to a tiny, fast run
  in a fresh bucket, both schedules off (only the test's runs happen), and the watcher's sensor
  poking every few seconds.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import typing
import uuid
from pathlib import Path

import yaml

from dual_deploy.local_stack import LocalStack, Ports, free_port

ROOT = Path(__file__).resolve().parents[1]
MARKER = "_COMPLETE"
CLASSES = ("daisy", "roses", "tulips")
TINY_TRAINING = {"image_size": 32, "batch_size": 8, "epochs": 1, "weights": None, "fine_tune_epochs": 0,
                 "augment": False, "deterministic": True}
# One epoch from scratch scores about chance: the champion gate's absolute minimum would (rightly)
# stop delivery, and these tests are about Airflow running the DAG, not model quality.
TINY_GATE = {"min_accuracy": 0.0, "min_macro_f1": 0.0}
# As in tests/test_dag_run_local.py: DenseNet121's graph costs minutes on 2 cores and the tasks are
# the same for every architecture; DUAL_DEPLOY_E2E_CLOUD_ARCH=densenet121 runs the configured one.
CLOUD_ARCH = os.environ.get("DUAL_DEPLOY_E2E_CLOUD_ARCH", "mobilenet_v3_small")
ANON_CONN = json.dumps(
    {"conn_type": "google_cloud_platform", "extra": {"is_anonymous": True, "project": "local-project"}}
)


def snapshot(dest: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for folder in ("dags", "plugins", "include", "emulators"):
        shutil.copytree(ROOT / folder, dest / folder, ignore=ignore)
    return dest


def write_config(src: Path, path: Path, bucket: str, gcs_url: str, state_dir: Path, endpoint_port: int) -> Path:
    """The shipped config with the local platform shrunk to a tiny run in ``bucket``."""
    raw = yaml.safe_load((src / "dags" / "config" / "dual_deploy.yaml").read_text())
    local = raw.setdefault("platforms", {}).setdefault("local", {}) or {}
    raw["platforms"]["local"] = local
    local["schedule"] = None  # no scheduled dual_deployment runs: only the tests' own
    local["artifacts_uri"] = f"gs://{bucket}/runs"
    local["data"] = {"uri": f"gs://{bucket}/datasets/tiny", "min_images_per_class": 5}
    local["triggers"] = {
        "incoming_uri": f"gs://{bucket}/incoming",
        "ledger_uri": f"gs://{bucket}/dual-deploy/ledger.json",
        "marker_name": MARKER,
        "watch_schedule": None,  # tests trigger the watcher themselves
        "sensor_poke_interval_s": 3,
        "sensor_timeout_s": 180,
    }
    # Only the settings the config schema has: the local platform is moving to the GCP operators against
    # local stand-ins (issue 10), which drops the emulator host / endpoint port settings.
    from dual_deploy.config import LocalConfig, PublishConfig

    wanted = {"bucket": bucket, "state_dir": str(state_dir), "storage_emulator_host": gcs_url,
              "endpoint_base_port": endpoint_port, "startup_timeout_s": 180}
    local["local"] = {k: v for k, v in wanted.items() if k in LocalConfig.model_fields}
    if isinstance(local.get("gcp"), dict):  # the local platform's stand-in GCP settings (local Vertex AI server)
        local["gcp"]["firebase_storage_bucket"] = bucket
        local["gcp"]["poll_interval_s"] = 2
    targets = local.setdefault("targets", {}) or {}
    local["targets"] = targets
    cloud = targets.setdefault("cloud", {})
    cloud["training"] = dict(TINY_TRAINING)
    cloud["architecture"] = CLOUD_ARCH
    cloud["gate"] = dict(TINY_GATE)
    cloud["endpoint"] = {"min_replica_count": 1, "max_replica_count": 1}
    mobile = targets.setdefault("mobile", {})
    mobile["training"] = dict(TINY_TRAINING)
    mobile["gate"] = dict(TINY_GATE)
    # A real gate on a tiny test split (~3 images: one flip is 33 points): float16 keeps the
    # TFLite model's top-1 equal to Keras', which is what the agreement gate checks.
    mobile["tflite"] = {"mode": "float16", "min_agreement": 0.9, "max_accuracy_drop": 0.34,
                        "max_size_mb": 20, "num_calibration_images": 8}
    if "local" in typing.get_args(PublishConfig.model_fields["backend"].annotation):
        mobile.setdefault("publish", {})["backend"] = "local"
    elif "remote_config_parameter" in PublishConfig.model_fields:
        mobile.setdefault("publish", {})["remote_config_parameter"] = f"m_{bucket.replace('-', '_')}"
    path.write_text(yaml.safe_dump(copy.deepcopy(raw), sort_keys=False))
    return path


class TinyStack(LocalStack):
    bucket_name: str  # the test's own bucket (a fresh one per stack)
    config_path: Path
    endpoint_port: int  # the first port the local platform's endpoints are served on (old config schema)


def make_stack(tmp: Path, *, all_admins: bool, extra_env: dict[str, str] | None = None) -> TinyStack:
    """A `make up` stack on free ports under ``tmp`` running the tiny config."""
    state_dir = tmp / "state"
    src = snapshot(tmp / "src")
    ports = Ports.free()
    bucket = f"dd-test-{uuid.uuid4().hex[:10]}"
    gcs_url = f"http://127.0.0.1:{ports.gcs}"
    endpoint_port = free_port()
    config = write_config(src, tmp / "dual_deploy.yaml", bucket, gcs_url, state_dir, endpoint_port)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AIRFLOW", "DUAL_DEPLOY", "AIP_", "STORAGE_EMULATOR", "PYTEST"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        GOOGLE_CLOUD_PROJECT="local-project",
        DUAL_DEPLOY_PLATFORM="local",
        DUAL_DEPLOY_CONFIG=str(config),
        AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT=ANON_CONN,
        AIRFLOW_CONN_FIREBASE_DEFAULT=ANON_CONN,
        AIRFLOW__CORE__DAGS_FOLDER=str(src / "dags"),
        AIRFLOW__CORE__PLUGINS_FOLDER=str(src / "plugins"),
        AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT="300",  # Google/Vertex imports are slow on 2 busy cores
        AIRFLOW__DAG_PROCESSOR__DAG_FILE_PROCESSOR_TIMEOUT="360",
        AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL="900",  # parse once: re-parsing costs CPU
        PYTHONPATH=os.pathsep.join([str(src / "include"), str(src / "plugins"), str(src / "emulators")]),
        TF_CPP_MIN_LOG_LEVEL="2",
        **(extra_env or {}),
    )
    stack = TinyStack(state_dir, root=src, ports=ports, base_env=env, all_admins=all_admins)
    stack.bucket_name = bucket
    stack.config_path = config
    stack.endpoint_port = endpoint_port
    return stack


class Bucket:
    """The GCS side as an uploader sees it: the google-cloud-storage client against the emulator."""

    def __init__(self, endpoint: str, name: str):
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        self.name = name
        self.client = storage.Client(project="local-project", credentials=AnonymousCredentials(),
                                     client_options={"api_endpoint": endpoint})
        self.bucket = self.client.bucket(name)

    def create(self) -> None:
        """Create the bucket unless `up` already did (ensure-buckets creates the config's buckets)."""
        if not self.bucket.exists():
            self.client.create_bucket(self.name)

    def upload_file(self, name: str, path: Path) -> None:
        self.bucket.blob(name).upload_from_filename(str(path))

    def upload_bytes(self, name: str, data: bytes) -> None:
        self.bucket.blob(name).upload_from_string(data)

    def upload_tree(self, prefix: str, folder: Path) -> int:
        paths = sorted(p for p in folder.rglob("*") if p.is_file())
        for path in paths:
            self.upload_file(f"{prefix}/{path.relative_to(folder).as_posix()}", path)
        return len(paths)

    def names(self, prefix: str = "") -> list[str]:
        return sorted(b.name for b in self.client.list_blobs(self.name, prefix=prefix))

    def read_json(self, name: str) -> dict:
        return json.loads(self.bucket.blob(name).download_as_bytes())


def sample_batch(dest: Path, per_class: int = 8) -> Path:
    from dualml import sample_data

    sample_data.generate(dest, per_class=per_class, size=48, seed=11, classes=CLASSES)
    return dest

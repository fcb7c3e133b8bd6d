"""
### dual_deployment

Trains two image classifiers from the same data and ships each where it is used:

| target | model | goes to |
|---|---|---|
| `cloud` | DenseNet121 | a Vertex AI prediction endpoint (canary, smoke test, promote or roll back) |
| `mobile` | MobileNetV3 | a validated `.tflite`, published for apps (Cloud Storage for Firebase / Firebase ML) |

`validate_dataset` → `stage_split` (one split for every target) → one TaskGroup per target
from `dags/config/dual_deploy.yaml` (in parallel) → `run_summary` (`run_summary.json` with
the run's artifacts). The platform (`DUAL_DEPLOY_PLATFORM`: `local` default, or `gcp`) picks
configuration only: the same operators run, locally against the GCS emulator and the local
Vertex AI server (`STORAGE_EMULATOR_HOST`, `VERTEX_AI_EMULATOR_HOST`).

Params: `data_uri` (dataset root), `epochs` (override for every target), `targets` (which to run).
Each target's `champion_gate` delivers only a model at least as good as the one serving.
"""


# The Google provider modules the task builders use, named here so that Airflow's dag-processor
# pre-imports them once in its long-lived parent process ([dag_processor] parsing_pre_import_modules
# only scans this file for airflow.* imports): later parses then skip google.cloud.aiplatform's
# 10-15 s import instead of paying it every 30 s.
import airflow.providers.google.cloud.hooks.gcs  # noqa: F401
import airflow.providers.google.cloud.hooks.vertex_ai.endpoint_service  # noqa: F401
import airflow.providers.google.cloud.hooks.vertex_ai.prediction_service  # noqa: F401
import airflow.providers.google.cloud.operators.vertex_ai.custom_job  # noqa: F401
import airflow.providers.google.cloud.operators.vertex_ai.model_service  # noqa: F401
import airflow.providers.google.cloud.triggers.vertex_ai  # noqa: F401
import airflow.providers.standard.operators.python  # noqa: F401
from airflow.sdk import DAG

from dual_deploy.config import load_dag_config
from dual_deploy.dag_helpers import DEFAULT_ARGS, TEMPLATE_FILTERS, cost_inputs, run_params, run_uri
from dual_deploy.operators.dataset import StageSplitOperator, ValidateDatasetOperator
from dual_deploy.operators.summary import RunSummaryOperator
from dual_deploy.target_group import build_target_group, champions_prefix

CONFIG = load_dag_config(__file__)
RUN_URI = run_uri(CONFIG)
SPLIT_URI = f"{RUN_URI}/split.json"
CHAMPIONS_URI = champions_prefix(CONFIG)

with DAG(
    dag_id="dual_deployment",
    schedule=CONFIG.schedule,
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    params=run_params(CONFIG),
    user_defined_filters=TEMPLATE_FILTERS,
    tags=["ml", "vertex-ai", "tflite", CONFIG.platform],
    doc_md=__doc__,
):
    validate_dataset = ValidateDatasetOperator(
        task_id="validate_dataset",
        data_uri="{{ params.data_uri }}",
        min_classes=CONFIG.data.min_classes,
        min_images_per_class=CONFIG.data.min_images_per_class,
        max_bad_fraction=CONFIG.data.max_bad_fraction,
    )
    stage_split = StageSplitOperator(
        task_id="stage_split",
        data_uri="{{ params.data_uri }}",
        split_uri=SPLIT_URI,
        val_fraction=CONFIG.data.val_fraction,
        test_fraction=CONFIG.data.test_fraction,
        seed=CONFIG.data.seed,
        exclude=validate_dataset.output["bad_files"],
    )
    targets = [build_target_group(t, CONFIG, RUN_URI, SPLIT_URI) for t in CONFIG.targets]
    run_summary = RunSummaryOperator(
        task_id="run_summary",
        targets={t.name: t.kind for t in CONFIG.targets},
        summary_uri=f"{RUN_URI}/run_summary.json",
        artifacts_uri=RUN_URI,
        platform=CONFIG.platform,
        data_uri="{{ params.data_uri }}",
        ledger_uri=CONFIG.triggers.ledger_uri,
        cost_inputs=cost_inputs(CONFIG),
        region=CONFIG.gcp.region,
        champions_uri=CHAMPIONS_URI,
        max_attempts_per_batch=CONFIG.triggers.max_attempts_per_batch,
        local_copy_path=f"{CONFIG.local.state_dir}/run_summary.json" if CONFIG.platform == "local" else None,
    )
    validate_dataset >> stage_split >> targets >> run_summary

"""
### dual_deployment_new_data

Starts `dual_deployment` when a new dataset lands in the bucket.

Convention: upload a complete dataset to `<incoming_uri>/<batch>/<class>/*.jpg`, then write
`<incoming_uri>/<batch>/_COMPLETE` **last**. A batch without its marker is an upload in progress
and is ignored; a batch whose content (file names + MD5s) is already in the training ledger is
skipped with a log line, so the same data is never trained twice.

`wait_for_data` is a deferrable GCS sensor (it waits in the triggerer, not in a worker slot);
`find_new_dataset` picks the oldest new complete batch; `trigger_training` starts
`dual_deployment` with `data_uri` = that batch and the run id `newdata__<fingerprint>`.
"""

from datetime import timedelta

from airflow.providers.google.cloud.sensors.gcs import GCSObjectsWithPrefixExistenceSensor
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import DAG

from dual_deploy.config import load_dag_config
from dual_deploy.dag_helpers import DEFAULT_ARGS
from dual_deploy.hooks.gcs_io import GcsIO
from dual_deploy.operators.new_data import FindNewDatasetOperator

CONFIG = load_dag_config(__file__)
TRIGGERS = CONFIG.triggers
BUCKET, PREFIX = GcsIO.parse(TRIGGERS.incoming_uri)

with DAG(
    dag_id="dual_deployment_new_data",
    schedule=TRIGGERS.watch_schedule,
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["ml", "trigger", CONFIG.platform],
    doc_md=__doc__,
):
    wait_for_data = GCSObjectsWithPrefixExistenceSensor(
        task_id="wait_for_data",
        bucket=BUCKET,
        prefix=PREFIX + "/",
        deferrable=True,
        poke_interval=TRIGGERS.sensor_poke_interval_s,
        timeout=TRIGGERS.sensor_timeout_s,
        soft_fail=True,  # nothing arrived this window: skipped, not failed
        # Airflow 3.3 can mark a task whose trigger fires right after it deferred as killed
        # (apache/airflow#67287): retry quickly rather than after the DAG's minutes-long backoff.
        retries=3,
        retry_delay=timedelta(seconds=15),
        retry_exponential_backoff=False,
    )
    find_new_dataset = FindNewDatasetOperator(
        task_id="find_new_dataset",
        incoming_uri=TRIGGERS.incoming_uri,
        ledger_uri=TRIGGERS.ledger_uri,
        marker_name=TRIGGERS.marker_name,
        max_attempts=TRIGGERS.max_attempts_per_batch,
    )
    trigger_training = TriggerDagRunOperator(
        task_id="trigger_training",
        trigger_dag_id="dual_deployment",
        trigger_run_id="{{ ti.xcom_pull(task_ids='find_new_dataset', key='run_id') }}",
        conf={
            "data_uri": "{{ ti.xcom_pull(task_ids='find_new_dataset', key='data_uri') }}",
        },
        skip_when_already_exists=True,
    )
    wait_for_data >> find_new_dataset >> trigger_training

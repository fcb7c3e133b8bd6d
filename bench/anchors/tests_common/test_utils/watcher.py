"""``watcher()``: the task the system tests append downstream of every task (trigger rule one_failed)."""

from __future__ import annotations

from airflow.sdk import task
from airflow.sdk.exceptions import AirflowException
from airflow.task.trigger_rule import TriggerRule


@task(trigger_rule=TriggerRule.ONE_FAILED, retries=0)
def watcher():
    """Fails the run when any upstream task failed (teardown tasks would otherwise hide it)."""
    raise AirflowException("Failing task because one or more upstream tasks failed.")

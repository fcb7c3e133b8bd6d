"""Common base of dual-deploy's operators."""

from __future__ import annotations

from airflow.sdk import BaseOperator


class DictOutputOperator(BaseOperator):
    """An operator whose execute() returns a dict, pushed whole (``return_value``) and per key,
    so downstream tasks can take one field: ``train.output["model_dir"]``."""

    def __init__(self, **kwargs):
        kwargs.setdefault("multiple_outputs", True)
        super().__init__(**kwargs)

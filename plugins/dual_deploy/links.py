"""Operator extra links of dual-deploy's own steps (the Vertex AI steps use the provider's link classes).

Airflow 3 computes an operator's links when the task finishes, on the worker, and keeps them as XComs
the UI shows; so a link may read what the task pushed, even when the task then failed.
"""

from __future__ import annotations

import os
from urllib.parse import quote

from airflow.sdk import BaseOperatorLink
from airflow.sdk.execution_time.xcom import XCom

REPORT_URI_KEY = "report_uri"


def browser_url(gcs_uri: str) -> str:
    """A URL a signed-in browser opens ``gs://bucket/object`` at, rendering HTML with its relative images:
    storage.cloud.google.com on Google Cloud, the GCS emulator's object URL locally."""
    bucket, _, name = gcs_uri.removeprefix("gs://").partition("/")
    base = (os.environ.get("STORAGE_EMULATOR_HOST") or "https://storage.cloud.google.com").rstrip("/")
    return f"{base}/{bucket}/{quote(name)}"


class RunReportLink(BaseOperatorLink):
    """The run's HTML report (``<run>/report/index.html``), written by ``run_summary``."""

    name = "Run report"

    def get_link(self, operator, *, ti_key) -> str:
        uri = XCom.get_value(ti_key=ti_key, key=REPORT_URI_KEY)
        return browser_url(uri) if uri else ""

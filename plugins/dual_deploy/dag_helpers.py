"""Small pieces the DAG files share: Params, default args, template filters, run URIs."""

from __future__ import annotations

import re
from datetime import timedelta

from airflow.sdk import Param

from dual_deploy.config import Config


def slug(value: str) -> str:
    """Airflow run ids (``manual__2026-01-01T00:00:00+00:00``) -> ``manual-2026-01-01t00-00-00-00-00``:
    safe in object names, Vertex display names and version aliases (lowercase, digits, hyphens)."""
    return re.sub(r"[^a-z0-9]+", "-", str(value).lower()).strip("-")[:100]


TEMPLATE_FILTERS = {"slug": slug}

DEFAULT_ARGS = {
    "owner": "ml-platform",
    "retries": 2,
    "retry_delay": timedelta(minutes=2),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=20),
}


def run_uri(cfg: Config) -> str:
    """Template of this run's artifact folder."""
    return f"{cfg.artifacts_uri}/{{{{ run_id | slug }}}}"


def run_params(cfg: Config) -> dict[str, Param]:
    return {
        "data_uri": Param(cfg.data.uri, type="string", pattern=r"^gs://[a-z0-9][-_.a-z0-9]*[a-z0-9](/.*)?$",
                          description="Dataset root in the tf_flowers layout: gs://bucket/prefix/<class>/*.jpg"),
        "epochs": Param(None, type=["null", "integer"], minimum=1, maximum=500,
                        description="Override the configured epochs for every target (empty: config)"),
        "targets": Param([t.name for t in cfg.targets], type="array",
                         items={"type": "string", "enum": [t.name for t in cfg.targets]},
                         description="Which targets to train and deliver in this run"),
    }


def cost_inputs(cfg: Config) -> dict:
    """Each target's machines, for the cost-per-run estimate in the run summary."""
    out = {}
    for t in cfg.targets:
        tr = t.training
        out[t.name] = {"training": {"machine_type": tr.machine_type, "accelerator_type": tr.accelerator_type,
                                    "accelerator_count": tr.accelerator_count, "replica_count": tr.replica_count,
                                    "spot": tr.spot}}
        if t.endpoint:
            out[t.name]["endpoint"] = {"machine_type": t.endpoint.machine_type,
                                       "min_replica_count": t.endpoint.min_replica_count}
    return out

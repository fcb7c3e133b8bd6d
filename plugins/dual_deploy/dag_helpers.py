"""Small pieces the DAG files share: Params, default args, template filters, run URIs."""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import Param

from dual_deploy.config import Config
from dual_deploy.failures import record_failure
from dual_deploy.names import display_name, run_alias, run_label, slug


# Names derived from the run id, valid for Vertex AI by construction (dual_deploy.names), e.g.
#   "{{ run_id | slug }}"                                 run folder (<= 100 characters)
#   "{{ run_id | run_alias }}"                            Model Registry version alias run-<slug> (<= 128)
#   "{{ run_id | run_label }}"                            label value (<= 63, [a-z0-9_-])
#   "{{ run_id | display_name('dual-deploy-cloud-') }}"   display name (<= 128; optional max_len argument)
def _display_name_filter(run_id: str, prefix: str, max_len: int = 128) -> str:
    return display_name(prefix, run_id, max_len)


TEMPLATE_FILTERS = {"slug": slug, "run_alias": run_alias, "run_label": run_label,
                    "display_name": _display_name_filter}

DEFAULT_ARGS = {
    "owner": "ml-platform",
    "retries": 2,
    "retry_delay": timedelta(minutes=2),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=20),
    # A task that fails for good leaves its error message for the run summary (failures.py).
    "on_failure_callback": record_failure,
}


def run_uri(cfg: Config) -> str:
    """Template of this run's artifact folder."""
    return f"{cfg.artifacts_uri}/{{{{ run_id | slug }}}}"


# Airflow validates every Param's schema against the schema's metaschema (twice per task while the DAG is
# serialized, i.e. on every parse); without "$schema" that is the newest draft, whose metaschema is the
# slowest to check. These schemas use nothing newer than draft 7 (bench/parse_time.py measures the parse).
_DRAFT7 = {"$schema": "http://json-schema.org/draft-07/schema#"}


def run_params(cfg: Config) -> dict[str, Param]:
    return {
        "data_uri": Param(cfg.data.uri, type="string", pattern=r"^gs://[a-z0-9][-_.a-z0-9]*[a-z0-9](/.*)?$",
                          description="Dataset root in the tf_flowers layout: gs://bucket/prefix/<class>/*.jpg",
                          **_DRAFT7),
        "epochs": Param(None, type=["null", "integer"], minimum=1, maximum=500,
                        description="Override the configured epochs for every target (empty: config)", **_DRAFT7),
        "targets": Param([t.name for t in cfg.targets], type="array",
                         items={"type": "string", "enum": [t.name for t in cfg.targets]},
                         description="Which targets to train and deliver in this run", **_DRAFT7),
        "allow_class_change": Param(False, type="boolean",
                                    description="Deliver even if the class set differs from the model serving now "
                                                "(added/removed classes); without it such a model is not promoted",
                                    **_DRAFT7),
    }


def cost_inputs(cfg: Config) -> dict:
    """Each target's machines, for the cost-per-run estimate in the run summary."""
    out = {}
    for t in cfg.targets:
        tr = t.training
        if t.is_automl:  # priced per node hour of its model type (cost.automl_training_cost)
            out[t.name] = {"training": {"automl": {"model_type": t.automl.model_type,
                                                   "budget_milli_node_hours": t.automl.budget_milli_node_hours}}}
        else:
            out[t.name] = {"training": {"machine_type": tr.machine_type, "accelerator_type": tr.accelerator_type,
                                        "accelerator_count": tr.accelerator_count, "replica_count": tr.replica_count,
                                        "spot": tr.spot}}
        if t.endpoint:
            out[t.name]["endpoint"] = {"machine_type": "automl" if t.is_automl else t.endpoint.machine_type,
                                       "min_replica_count": t.endpoint.min_replica_count}
    return out

"""Champion/challenger gate: deliver a new model only if it is at least as good as the one serving."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence

from airflow.sdk.exceptions import AirflowSkipException

from dual_deploy.hooks.gcs_io import GcsIO
from dual_deploy.operators.base import DictOutputOperator
from dual_deploy.operators.tflite import localize_manifest
from dualml.dataset import SplitManifest, parse_labels

OPT_IN_HINT = ("to deliver it, trigger the run with the Param allow_class_change=true, or set "
               "gate.allow_class_change: true for this target in dags/config/dual_deploy.yaml")


def class_change(champion_labels: list[str], labels: list[str]) -> dict | None:
    """``{"added", "removed", "champion_labels", "labels"}`` when the class lists differ, else None."""
    if list(champion_labels) == list(labels):
        return None
    return {"added": sorted(set(labels) - set(champion_labels)), "removed": sorted(set(champion_labels) - set(labels)),
            "champion_labels": list(champion_labels), "labels": list(labels)}


def describe_class_change(change: dict) -> str:
    parts = [f"{what} {', '.join(change[what])}" for what in ("added", "removed") if change.get(what)]
    return "; ".join(parts) or f"class order {change['champion_labels']} -> {change['labels']}"


def decide(challenger: dict, champion: dict | None, *, tolerance: float, min_accuracy: float,
           min_macro_f1: float, allow_class_change: bool = False) -> tuple[bool, str]:
    """(promote, reason). Pure, so the rule is unit-tested on its own.

    Absolute minimums first. A champion with another class set (``champion["class_change"]``)
    cannot be compared: the challenger is delivered only with ``allow_class_change`` (a changed
    class set is never delivered silently). Otherwise the challenger must beat the champion or
    tie within ``tolerance`` (accuracy, as a fraction) on the same test split. No champion: promote.
    """
    acc, f1 = challenger["accuracy"], challenger["macro_f1"]
    if acc < min_accuracy:
        return False, f"accuracy {acc:.3f} below the minimum {min_accuracy:.3f}"
    if f1 < min_macro_f1:
        return False, f"macro F1 {f1:.3f} below the minimum {min_macro_f1:.3f}"
    if champion is None:
        return True, f"first model for this target (accuracy {acc:.3f}): no champion to beat"
    if champion.get("class_change"):
        change = describe_class_change(champion["class_change"])
        run = f" (run {champion['run_id']})" if champion.get("run_id") else ""
        if allow_class_change:
            return True, (f"class set changed since the champion{run}: {change}; delivering accuracy {acc:.3f} "
                          "because allow_class_change is set")
        return False, (f"class set changed since the champion{run}: {change}. Not delivered without an explicit "
                       f"opt-in: {OPT_IN_HINT}")
    best = champion["accuracy"]
    if acc + 1e-9 >= best - tolerance:
        verb = "beats" if acc > best else "ties with"
        return True, f"challenger accuracy {acc:.3f} {verb} champion {best:.3f} (tolerance {tolerance:.3f})"
    return False, f"challenger accuracy {acc:.3f} < champion {best:.3f} - tolerance {tolerance:.3f}: keeping the champion"


class ChampionGateOperator(DictOutputOperator):
    """Compare this run's model (challenger) with the target's champion on this run's test split.

    The champion record (``champion_uri``, written by the run summary when a model was delivered)
    points at the serving model's artifacts; its ``model.keras`` (an AutoML mobile champion: its
    exported SavedModel) is re-evaluated on the challenger's held-out test split so both are scored
    on the same images. An AutoML CLOUD champion has no artifacts (Vertex AI cannot export it): its
    recorded accuracy, measured on its own run's test split, stands in, and the reason says so. If the challenger
    is not promoted the task is skipped: nothing downstream (register/deploy, convert/publish)
    runs, serving is unchanged, and the summary reports "not promoted" with the reason.

    A change of the class set (added/removed classes) is shown and blocks delivery unless the
    run opts in: the ``allow_class_change`` argument (config ``gate.allow_class_change``) or the
    run Param ``allow_class_change``.

    XCom: ``{"promote", "reason", "challenger": {accuracy, macro_f1}, "champion": {...} | None,
    "champion_uri", "class_change": {added, removed, champion_labels, labels} | None,
    "allow_class_change", "duration_s"}`` (pushed before a skip too).
    """

    template_fields: Sequence[str] = ("model_dir", "split_uri", "champion_uri")
    ui_color = "#f3e5f5"

    def __init__(self, *, model_dir: str, split_uri: str, champion_uri: str, tolerance: float = 0.01,
                 min_accuracy: float = 0.0, min_macro_f1: float = 0.0, allow_class_change: bool = False,
                 gcp_conn_id: str = "google_cloud_default", **kwargs):
        super().__init__(**kwargs)
        self.model_dir = model_dir
        self.split_uri = split_uri
        self.champion_uri = champion_uri
        self.tolerance = tolerance
        self.min_accuracy = min_accuracy
        self.min_macro_f1 = min_macro_f1
        self.allow_class_change = allow_class_change
        self.gcp_conn_id = gcp_conn_id

    def execute(self, context) -> dict:
        t0 = time.monotonic()
        io = GcsIO(self.gcp_conn_id)
        metrics = io.read_json(f"{self.model_dir.rstrip('/')}/metrics.json")
        challenger = {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "model_dir": self.model_dir}
        record = io.read_json(self.champion_uri) if io.exists(self.champion_uri) else None
        champion = self._evaluate_champion(io, record, metrics["labels"]) if record else None
        allow = bool(self.allow_class_change) or (context.get("params") or {}).get("allow_class_change") is True
        promote, reason = decide(challenger, champion, tolerance=self.tolerance, min_accuracy=self.min_accuracy,
                                 min_macro_f1=self.min_macro_f1, allow_class_change=allow)
        if champion and champion.get("re_evaluated") is False:
            reason += f" ({champion['note']})"
        result = {"promote": promote, "reason": reason, "challenger": challenger, "champion": champion,
                  "champion_uri": self.champion_uri, "class_change": (champion or {}).get("class_change"),
                  "allow_class_change": allow, "duration_s": round(time.monotonic() - t0, 2)}
        self.log.info("%s: %s", "PROMOTE" if promote else "NOT PROMOTED", reason)
        if not promote:
            for key, value in result.items():
                context["ti"].xcom_push(key=key, value=value)
            context["ti"].xcom_push(key="return_value", value=result)
            raise AirflowSkipException(f"not promoted: {reason}")
        return result

    def _evaluate_champion(self, io: GcsIO, record: dict, labels: list[str]) -> dict:
        from dualml.trainer.evaluate import evaluate_keras_model

        champion_dir = record["model_dir"].rstrip("/")
        champion_labels = parse_labels(io.read_bytes(f"{champion_dir}/labels.txt").decode())
        base = {"model_dir": champion_dir, "run_id": record.get("run_id")}
        change = class_change(champion_labels, labels)
        if change:
            self.log.warning("class set changed since the champion %s: %s", champion_dir, describe_class_change(change))
            return {**base, "class_change": change}
        files = io.list_files(champion_dir)
        saved_models = sorted({f.rpartition("/")[0] for f in files if f.endswith("/saved_model.pb")})
        if f"{champion_dir}/model.keras" not in files and len(saved_models) != 1:
            note = ("champion not re-evaluated: it has no exportable model (an AutoML CLOUD model); its accuracy "
                    "was measured on its own run's test split")
            if record.get("accuracy") is None:
                note += " and was not recorded: compared as 0"
            self.log.warning("%s: %s", champion_dir, note)
            return {**base, "accuracy": record.get("accuracy") or 0.0, "macro_f1": record.get("macro_f1") or 0.0,
                    "re_evaluated": False, "note": note}
        manifest = SplitManifest.from_json(io.read_bytes(self.split_uri).decode())
        with tempfile.TemporaryDirectory() as tmp:
            local = localize_manifest(io, manifest, os.path.join(tmp, "data"), {"test": None})
            if f"{champion_dir}/model.keras" in files:
                model_path = io.download(f"{champion_dir}/model.keras", os.path.join(tmp, "model.keras"))
                m = evaluate_keras_model(model_path, local.files["test"], labels)
            else:  # an AutoML edge model: the SavedModel Vertex AI exported
                from dualml.automl.edge_model import evaluate as evaluate_saved_model

                io.download_dir(saved_models[0], os.path.join(tmp, "saved_model"))
                m = evaluate_saved_model(os.path.join(tmp, "saved_model"), local.files["test"], labels)
        self.log.info("champion %s scores accuracy %.4f on this run's test split", champion_dir, m["accuracy"])
        return {**base, "accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}

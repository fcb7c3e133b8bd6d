"""PipelineService: AutoML image classification training pipelines, trained by a real local search.

CreateTrainingPipeline accepts the AutoML image classification task definition
(``automl_image_classification_1.0.0.yaml``) with Vertex's rules for its inputs: ``modelType``
(CLOUD, MOBILE_TF_LOW_LATENCY_1, MOBILE_TF_VERSATILE_1, MOBILE_TF_HIGH_ACCURACY_1),
``budgetMilliNodeHours`` (CLOUD 8,000-800,000, edge types 1,000-100,000), ``disableEarlyStopping``;
an image dataset's items split by ``filter_split`` (e.g. on ``aiplatform.googleapis.com/ml_use``),
``fraction_split`` or Vertex's default 80/10/10. The pipeline then runs like Vertex's:
QUEUED -> PENDING (data checks: at least 10 images per label, every split non-empty) -> RUNNING
-> SUCCEEDED | FAILED | CANCELLING -> CANCELLED.

Training is the configured search image's command (``automl.search_image`` in the server config,
``python -m dualml.automl`` for this project) run as a child process with a wall-clock limit. The
budget maps to it as on Vertex, where node hours are wall hours times nodes (8 nodes for CLOUD, 1
for edge types): ``limit = budget / 1000 / nodes`` hours of Vertex wall time, each lasting
``automl.seconds_per_hour`` seconds here. On success the best model is registered in the Model
Registry from ``model_to_upload`` (a new model, or a version of ``parent_model``, with its aliases),
with the search's evaluation on the test items as its ModelEvaluation, and the pipeline's
``training_task_metadata`` reports ``costMilliNodeHours`` (the process's time in node hours, at
most the budget) and ``successfulStopReason``. A search that trains nothing within the limit fails
the pipeline with RESOURCE_EXHAUSTED ("budget exhausted"); any other failure with the process's
exit status and the end of its log. Vertex bills no failed training; a cancelled one is billed.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import threading
import time
from pathlib import Path

import grpc
from google.cloud.aiplatform_v1 import types
from google.longrunning import operations_pb2
from google.protobuf import empty_pb2, json_format, struct_pb2
from google.rpc import status_pb2

from localcloud import filters, rules, runtime
from localcloud.config import ServerConfig
from localcloud.datasets import ML_USE_LABEL, DatasetService, item_uri, items_matching
from localcloud.errors import RpcError, failed_precondition, not_found
from localcloud.lro import Operations, now
from localcloud.models import ModelService, _order
from localcloud.rpc import paginate, service_handler
from localcloud.store import Store

log = logging.getLogger("localcloud.pipelines")
KIND = "training_pipeline"
EVALUATION = "model_evaluation"
AUTOML_MODEL = "automl-model:"  # kv: "<model>@<version>" -> where its artifacts are (this server's storage)
SERVICE = "google.cloud.aiplatform.v1.PipelineService"
S = types.PipelineState
TERMINAL = {S.PIPELINE_STATE_SUCCEEDED, S.PIPELINE_STATE_FAILED, S.PIPELINE_STATE_CANCELLED}
LIVE = {S.PIPELINE_STATE_QUEUED, S.PIPELINE_STATE_PENDING, S.PIPELINE_STATE_RUNNING}

AUTOML_IMAGE_CLASSIFICATION = "gs://google-cloud-aiplatform/schema/trainingjob/definition/automl_image_classification_1.0.0.yaml"
CLASSIFICATION_METRICS_SCHEMA = "gs://google-cloud-aiplatform/schema/modelevaluation/classification_metrics_1.0.0.yaml"
PREDICT_SCHEMATA = types.PredictSchemata(
    instance_schema_uri="https://storage.googleapis.com/google-cloud-aiplatform/schema/predict/instance/image_classification_1.0.0.yaml",
    parameters_schema_uri="https://storage.googleapis.com/google-cloud-aiplatform/schema/predict/params/image_classification_1.0.0.yaml",
    prediction_schema_uri="https://storage.googleapis.com/google-cloud-aiplatform/schema/predict/prediction/classification_1.0.0.yaml",
)
# Vertex AI's rules (AutoMlImageClassificationInputs): nodes a model type trains on, its budget range
# and default (one day of wall time) in milli node hours.
NODES = {"CLOUD": 8, "MOBILE_TF_LOW_LATENCY_1": 1, "MOBILE_TF_VERSATILE_1": 1, "MOBILE_TF_HIGH_ACCURACY_1": 1}
BUDGET = {t: ((8_000, 800_000, 192_000) if t == "CLOUD" else (1_000, 100_000, 24_000)) for t in NODES}
# What an edge model exports to (Vertex AI); the local server produces the first two.
EDGE_EXPORT_FORMATS = ("tflite", "tf-saved-model", "edgetpu-tflite", "core-ml", "tf-js")
LOCAL_EXPORT_FORMATS = {"tflite": "tflite", "tf-saved-model": "saved_model"}
INPUT_FIELDS = {"modelType": "model_type", "budgetMilliNodeHours": "budget_milli_node_hours",
                "disableEarlyStopping": "disable_early_stopping", "multiLabel": "multi_label",
                "baseModelId": "base_model_id"}
MIN_ITEMS_PER_LABEL = 10  # Vertex AI: "The minimum per label is 10."
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)
EXIT_BAD_INPUT, EXIT_BUDGET_EXHAUSTED = 2, 4


class AutoMLSettings:
    """``automl:`` in the server config: which images search and serve, and how fast time runs."""

    def __init__(self, raw: dict | None):
        raw = dict(raw or {})
        self.search_image = raw.pop("search_image", "")
        self.serving_image = raw.pop("serving_image", "")
        # Local seconds per hour of Vertex wall time (3600: as long as on Vertex).
        self.seconds_per_hour = float(raw.pop("seconds_per_hour", 3600))
        self.min_items_per_label = int(raw.pop("min_items_per_label", MIN_ITEMS_PER_LABEL))
        if raw:
            raise ValueError(f"unknown automl settings {sorted(raw)} (search_image, serving_image, seconds_per_hour, "
                             "min_items_per_label)")

    def time_limit_s(self, model_type: str, budget: int) -> float:
        return budget / 1000.0 / NODES[model_type] * self.seconds_per_hour

    def cost(self, model_type: str, seconds: float, budget: int) -> int:
        """Milli node hours ``seconds`` of local training stand for (at most ``budget``)."""
        return int(min(budget, max(1, round(seconds / self.seconds_per_hour * NODES[model_type] * 1000))))


def parse_inputs(value: struct_pb2.Value) -> dict:
    """AutoMlImageClassificationInputs from the pipeline's ``training_task_inputs``, checked as Vertex does."""
    raw = json_format.MessageToDict(value) if value.WhichOneof("kind") else {}
    if not isinstance(raw, dict):
        raise rules.invalid("training_task_inputs must be an AutoMlImageClassificationInputs object")
    snake = {v: v for v in INPUT_FIELDS.values()}
    unknown = sorted(k for k in raw if k not in INPUT_FIELDS and k not in snake)
    if unknown:
        raise rules.invalid(f"training_task_inputs has unknown fields {unknown} (AutoMlImageClassificationInputs: "
                            f"{', '.join(INPUT_FIELDS)})")
    inputs = {INPUT_FIELDS.get(k, k): v for k, v in raw.items()}
    model_type = inputs.get("model_type") or "CLOUD"
    if isinstance(model_type, int | float):
        model_type = ([None, *NODES][int(model_type)] if 0 < int(model_type) <= len(NODES) else str(model_type))
    if model_type not in NODES:
        raise rules.invalid(f"training_task_inputs.modelType '{model_type}' is not an image classification model "
                            f"type: {', '.join(NODES)}")
    low, high, default = BUDGET[model_type]
    try:
        budget = int(inputs.get("budget_milli_node_hours") or default)
    except (TypeError, ValueError):
        raise rules.invalid("training_task_inputs.budgetMilliNodeHours must be an integer") from None
    if not low <= budget <= high:
        raise rules.invalid(f"training_task_inputs.budgetMilliNodeHours {budget} is out of range for modelType "
                            f"{model_type}: it must be between {low:,} and {high:,} milli node hours, inclusive")
    if inputs.get("multi_label"):
        raise RpcError(grpc.StatusCode.UNIMPLEMENTED, "multi-label image classification is not emulated by the "
                                                            "local Vertex AI server (multiLabel must be false)")
    if inputs.get("base_model_id"):
        raise RpcError(grpc.StatusCode.UNIMPLEMENTED, "baseModelId (training from a base model) is not "
                                                            "emulated by the local Vertex AI server")
    return {"model_type": model_type, "budget": budget, "disable_early_stopping": bool(inputs.get("disable_early_stopping"))}


def _metadata(cost: int, stop_reason: str | None = None) -> struct_pb2.Value:
    """AutoMlImageClassificationMetadata in its JSON form (int64 as a string, as proto JSON writes it)."""
    meta = {"costMilliNodeHours": str(cost)}
    if stop_reason:
        meta["successfulStopReason"] = stop_reason
    return json_format.ParseDict(meta, struct_pb2.Value())


class _Run:
    def __init__(self):
        self.proc = None
        self.cancel = threading.Event()
        self.fail_message: str | None = None


class PipelineService:
    def __init__(self, cfg: ServerConfig, store: Store, operations: Operations, faults, datasets: DatasetService,
                 models: ModelService):
        self.cfg = cfg
        self.automl = AutoMLSettings(getattr(cfg, "automl", None))
        self.store = store
        self.operations = operations
        self.faults = faults
        self.datasets = datasets
        self.models = models
        self._runs: dict[str, _Run] = {}
        self._lock = threading.Lock()

    # ---- state helpers
    def pipeline(self, name: str) -> types.TrainingPipeline:
        rules.parse_name(name, "trainingPipelines")
        found = self.store.get(KIND, name, types.TrainingPipeline)
        if found is None:
            raise not_found("TrainingPipeline", name)
        return found

    def _update(self, name: str, state=None, error: tuple[int, str] | None = None, **fields) -> types.TrainingPipeline:
        with self.store.tx():
            p = self.pipeline(name)
            if p.state in TERMINAL:
                return p
            if p.state == S.PIPELINE_STATE_CANCELLING and state is not None and state not in TERMINAL:
                return p  # a cancel wins over the supervisor's PENDING/RUNNING
            ts = now()
            if state is not None:
                p.state = state
                if state == S.PIPELINE_STATE_RUNNING and not p.start_time:
                    p.start_time = ts
                if state in TERMINAL:
                    p.end_time = ts
            if error:
                p.error = status_pb2.Status(code=error[0], message=error[1])
            for k, v in fields.items():
                setattr(p, k, v)
            p.update_time = ts
            self.store.put(KIND, name, p, parent=name.rsplit("/trainingPipelines/", 1)[0])
        if state is not None:
            log.info("training pipeline %s: %s%s", name.rsplit("/", 1)[-1], state.name, f" ({error[1][:200]})" if error else "")
        return p

    def work_dir(self, name: str) -> Path:
        return self.cfg.state_dir / "automl" / name.rsplit("/", 1)[-1]

    def log_path(self, name: str) -> Path:
        return self.cfg.state_dir / "logs" / "trainingPipelines" / name.rsplit("/", 1)[-1] / "training.log"

    # ---- RPCs
    def create_training_pipeline(self, request: types.CreateTrainingPipelineRequest) -> types.TrainingPipeline:
        rules.parse_parent(request.parent)
        p = types.TrainingPipeline(request.training_pipeline)
        rules.display_name(p.display_name, "training_pipeline")
        rules.labels(dict(p.labels), "training_pipeline")
        if p.training_task_definition != AUTOML_IMAGE_CLASSIFICATION:
            raise rules.invalid(f"training_task_definition '{p.training_task_definition}' is not emulated: the local "
                                f"Vertex AI server trains {AUTOML_IMAGE_CLASSIFICATION} (use CustomJob for custom "
                                "training)")
        inputs = parse_inputs(types.TrainingPipeline.pb(p).training_task_inputs)
        if not self.automl.search_image:
            raise failed_precondition("the local Vertex AI server has no automl.search_image in its config: it cannot "
                                      "train AutoML models")
        cfg = p.input_data_config
        if not cfg.dataset_id:
            raise rules.invalid("input_data_config.dataset_id is required: AutoML image training needs a dataset")
        dataset = self.datasets.dataset(f"{request.parent}/datasets/{cfg.dataset_id}")
        for other in ("predefined_split", "timestamp_split", "stratified_split"):
            if getattr(cfg, other) and types.InputDataConfig.pb(cfg).HasField(other):
                raise rules.invalid(f"input_data_config.{other} is not supported for image datasets (use "
                                    "filter_split or fraction_split)")
        if types.InputDataConfig.pb(cfg).HasField("fraction_split"):
            f = cfg.fraction_split
            if min(f.training_fraction, f.validation_fraction, f.test_fraction) < 0 or \
                    f.training_fraction + f.validation_fraction + f.test_fraction > 1.0 + 1e-9:
                raise rules.invalid("input_data_config.fraction_split fractions must be non-negative and sum to at most 1")
        if types.InputDataConfig.pb(cfg).HasField("filter_split"):
            for which in ("training_filter", "validation_filter", "test_filter"):
                items_matching([], getattr(cfg.filter_split, which))  # syntax check
        model = p.model_to_upload
        for alias in model.version_aliases:
            if alias != "default":
                rules.version_alias(alias)
        if model.display_name:
            rules.display_name(model.display_name, "model_to_upload")
        if p.parent_model:
            self.models.resolve(p.parent_model.split("@")[0])
        name = f"{request.parent}/trainingPipelines/{self.store.next_id('training_pipeline') + 6_000_000_000_000_000}"
        ts = now()
        p.name = name
        p.state = S.PIPELINE_STATE_QUEUED
        p.create_time = ts
        p.update_time = ts
        self.store.put(KIND, name, p, parent=request.parent)
        log.info("training pipeline %s: %s, budget %d (dataset %s)", name.rsplit("/", 1)[-1], inputs["model_type"],
                 inputs["budget"], dataset.display_name)
        self._launch(name)
        return p

    def get_training_pipeline(self, request: types.GetTrainingPipelineRequest) -> types.TrainingPipeline:
        return self.pipeline(request.name)

    def list_training_pipelines(self, request: types.ListTrainingPipelinesRequest) -> types.ListTrainingPipelinesResponse:
        rules.parse_parent(request.parent)
        terms = filters.parse(request.filter)
        found = [p for p in self.store.list(KIND, types.TrainingPipeline, parent=request.parent)
                 if filters.matches(terms, {"display_name": p.display_name, "state": p.state.name,
                                            "training_task_definition": p.training_task_definition}, dict(p.labels))]
        page, token = paginate(_order(found, ""), request.page_size, request.page_token)
        return types.ListTrainingPipelinesResponse(training_pipelines=page, next_page_token=token)

    def cancel_training_pipeline(self, request: types.CancelTrainingPipelineRequest) -> empty_pb2.Empty:
        p = self.pipeline(request.name)
        if p.state in TERMINAL:
            raise failed_precondition(f"TrainingPipeline {request.name} is already {p.state.name}; only a pipeline "
                                      "that has not finished can be cancelled")
        self._update(request.name, S.PIPELINE_STATE_CANCELLING)
        run = self._runs.get(request.name)
        if run:
            run.cancel.set()
        else:
            self._update(request.name, S.PIPELINE_STATE_CANCELLED, (grpc.StatusCode.CANCELLED.value[0], "CANCELED"))
        return empty_pb2.Empty()

    def delete_training_pipeline(self, request: types.DeleteTrainingPipelineRequest) -> operations_pb2.Operation:
        p = self.pipeline(request.name)
        if p.state not in TERMINAL:
            raise failed_precondition(f"TrainingPipeline {request.name} is {p.state.name}; cancel it before deleting")
        self.store.delete(KIND, request.name)
        return self.operations.start(request.name, "DeleteTrainingPipeline", types.DeleteOperationMetadata(
            generic_metadata=types.GenericOperationMetadata(create_time=now(), update_time=now())), lambda: None)

    # ---- admin / lifecycle
    def fail(self, name: str, message: str) -> None:
        """Fault injection: the training fails (as a failing Vertex training does) with ``message``."""
        run = self._runs.get(name)
        if run is None or self.pipeline(name).state in TERMINAL:
            raise failed_precondition(f"TrainingPipeline {name} is not running")
        run.fail_message = message
        run.cancel.set()

    def recover(self) -> int:
        """After a (re)start: stop what a crashed server left running, then train unfinished pipelines again."""
        for key, info in self.store.values_with_prefix("pipeline-process:").items():
            if runtime.alive(info["pid"]):
                runtime.stop_group(info["pid"], grace_s=5)
            self.store.delete_value(key)
        n = 0
        for p in self.store.list(KIND, types.TrainingPipeline):
            if p.state == S.PIPELINE_STATE_CANCELLING:
                self._update(p.name, S.PIPELINE_STATE_CANCELLED, (grpc.StatusCode.CANCELLED.value[0], "CANCELED"))
            elif p.state in LIVE:
                self._launch(p.name)
                n += 1
        return n

    def shutdown(self) -> None:
        for name, run in list(self._runs.items()):
            self._update(name, S.PIPELINE_STATE_CANCELLING)
            run.cancel.set()
        deadline = time.monotonic() + 20
        while self._runs and time.monotonic() < deadline:
            time.sleep(0.1)

    # ---- running
    def _launch(self, name: str) -> None:
        run = _Run()
        with self._lock:
            self._runs[name] = run
        threading.Thread(target=self._supervise, args=(name, run), name=f"pipeline-{name.rsplit('/', 1)[-1]}",
                         daemon=True).start()

    def _supervise(self, name: str, run: _Run) -> None:
        try:
            self._supervise_inner(name, run)
        except Exception as e:
            log.exception("training pipeline %s: supervisor failed", name)
            if run.proc is not None and run.proc.poll() is None:
                runtime.stop_group(run.proc.pid, grace_s=2)
            self._update(name, S.PIPELINE_STATE_FAILED, (grpc.StatusCode.INTERNAL.value[0],
                                                         f"local Vertex AI server error: {e}"))
        finally:
            with self._lock:
                self._runs.pop(name, None)

    def _data(self, p: types.TrainingPipeline) -> tuple[list[dict], list[dict]]:
        """(annotation specs, items with their ML use) of the pipeline's dataset and split. Raises RpcError
        (INVALID_ARGUMENT) when the data cannot train a model."""
        parent = p.name.split("/trainingPipelines/")[0]
        dataset_name = f"{parent}/datasets/{p.input_data_config.dataset_id}"
        specs = self.datasets.annotation_specs(dataset_name)
        spec_of = self.datasets.item_labels(dataset_name)
        labelled = [i for i in self.datasets.items(dataset_name) if i.name in spec_of]
        cfg = types.InputDataConfig.pb(p.input_data_config)
        use: dict[str, str] = {}
        if cfg.HasField("filter_split"):
            f = p.input_data_config.filter_split
            for ml_use, text in (("training", f.training_filter), ("validation", f.validation_filter),
                                 ("test", f.test_filter)):
                for item in items_matching(labelled, text):
                    use.setdefault(item.name, ml_use)  # the first filter that matches wins
        else:
            fr = p.input_data_config.fraction_split if cfg.HasField("fraction_split") else None
            fractions = (fr.training_fraction, fr.validation_fraction, fr.test_fraction) if fr else DEFAULT_FRACTIONS
            if not any(fractions):
                fractions = DEFAULT_FRACTIONS
            order = sorted(labelled, key=lambda i: i.name)
            random.Random(p.name).shuffle(order)
            cut1 = round(len(order) * fractions[0])
            cut2 = cut1 + round(len(order) * fractions[1])
            cut3 = cut2 + round(len(order) * fractions[2])
            for k, item in enumerate(order[:cut3]):
                use[item.name] = "training" if k < cut1 else "validation" if k < cut2 else "test"
        items = [{"uri": item_uri(i), "annotationSpecId": spec_of[i.name], "mlUse": use[i.name],
                  "dataItem": i.name} for i in labelled if i.name in use]
        names = {s.name.rsplit("/", 1)[-1]: s.display_name for s in specs}
        counts = {names[k]: sum(1 for it in items if it["annotationSpecId"] == k) for k in names}
        too_few = {k: v for k, v in counts.items() if v < self.automl.min_items_per_label}
        splits = {u: sum(1 for it in items if it["mlUse"] == u) for u in ("training", "validation", "test")}
        if len(counts) < 2 or too_few or not all(splits.values()):
            problems = []
            if len(counts) < 2:
                problems.append(f"{len(counts)} label(s) with images; a classifier needs at least 2")
            if too_few:
                problems.append(f"labels with fewer than {self.automl.min_items_per_label} images: {too_few}")
            if not all(splits.values()):
                problems.append(f"images per split {splits}: every split needs images (check the split filters, e.g. "
                                f"labels.{ML_USE_LABEL}=training, and the ML_USE column of the import file)")
            raise rules.invalid(f"The dataset cannot train a model: {'; '.join(problems)}")
        return [{"id": k, "displayName": v} for k, v in names.items()], items

    def _supervise_inner(self, name: str, run: _Run) -> None:
        p = self._update(name, S.PIPELINE_STATE_PENDING)
        if p.state in TERMINAL or run.cancel.is_set():
            self._finish_cancelled(name, run, 0.0)
            return
        inputs = parse_inputs(types.TrainingPipeline.pb(p).training_task_inputs)
        try:
            specs, items = self._data(p)
        except RpcError as e:
            self._update(name, S.PIPELINE_STATE_FAILED, (e.status_code_number(), e.message))
            return
        work = self.work_dir(name)
        shutil.rmtree(work, ignore_errors=True)  # a restarted pipeline trains again from the start
        (work / "output").mkdir(parents=True)
        (work / "data.json").write_text(json.dumps({"annotationSpecs": specs, "items": items}))
        limit = self.automl.time_limit_s(inputs["model_type"], inputs["budget"])
        args = ["--data", str(work / "data.json"), "--model-type", inputs["model_type"], "--time-limit-s",
                f"{limit:.1f}", "--output-dir", str(work / "output")]
        if inputs["disable_early_stopping"]:
            args.append("--disable-early-stopping")
        try:
            argv, image_env = runtime.container_argv(self.cfg, self.automl.search_image, [], args)
        except runtime.ImageNotMapped as e:
            self._update(name, S.PIPELINE_STATE_FAILED, (grpc.StatusCode.FAILED_PRECONDITION.value[0], str(e)))
            return
        project, location = name.split("/")[1], name.split("/")[3]
        env = runtime.container_env(self.cfg, image_env, {}, {"CLOUD_ML_PROJECT_ID": project, "CLOUD_ML_REGION": location,
                                                             "GOOGLE_CLOUD_PROJECT": project})
        started = time.monotonic()
        run.proc = runtime.spawn(argv, env, self.log_path(name), cwd=self.cfg.root)
        self.store.set_value(f"pipeline-process:{name}", {"pid": run.proc.pid})
        self._update(name, S.PIPELINE_STATE_RUNNING)
        # The search stops itself at the limit; the export after it takes a little longer. A process far past
        # its limit is stuck: it is stopped and the pipeline fails.
        hard_stop = started + limit + max(300.0, limit)
        while run.proc.poll() is None:
            if run.cancel.wait(0.5):
                runtime.stop_group(run.proc.pid, grace_s=10)
                run.proc.wait()
                break
            if time.monotonic() > hard_stop:
                runtime.stop_group(run.proc.pid, grace_s=10)
                run.proc.wait()
                run.fail_message = (f"training exceeded its budget's time limit ({limit:.0f} s) by more than "
                                    f"{max(300.0, limit):.0f} s and was stopped")
                break
        self.store.delete_value(f"pipeline-process:{name}")
        seconds = time.monotonic() - started
        if run.fail_message:
            self._update(name, S.PIPELINE_STATE_FAILED, (grpc.StatusCode.INTERNAL.value[0], run.fail_message),
                         training_task_metadata=_metadata(0))
            return
        if run.cancel.is_set():
            self._finish_cancelled(name, run, seconds, inputs)
            return
        self._finish(name, run.proc.returncode, work / "output", inputs, seconds)

    def _finish_cancelled(self, name: str, run: _Run, seconds: float, inputs: dict | None = None) -> None:
        cost = self.automl.cost(inputs["model_type"], seconds, inputs["budget"]) if inputs and seconds else 0
        self._update(name, S.PIPELINE_STATE_CANCELLED, (grpc.StatusCode.CANCELLED.value[0], "CANCELED"),
                     training_task_metadata=_metadata(cost))

    def _finish(self, name: str, code: int, out: Path, inputs: dict, seconds: float) -> None:
        result = {}
        try:
            result = json.loads((out / "result.json").read_text())
        except (OSError, ValueError):
            pass
        tail = runtime.tail(self.log_path(name), 8)
        if code == EXIT_BUDGET_EXHAUSTED:
            self._update(name, S.PIPELINE_STATE_FAILED, (grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], (
                f"Training budget exhausted: {inputs['budget']} milli node hours of {inputs['model_type']} "
                f"({self.automl.time_limit_s(inputs['model_type'], inputs['budget']):.0f} s on this server) did not "
                f"train a model: {result.get('message', '')}")), training_task_metadata=_metadata(0))
            return
        if code != 0 or result.get("state") != "SUCCEEDED":
            status = grpc.StatusCode.INVALID_ARGUMENT if code == EXIT_BAD_INPUT else grpc.StatusCode.INTERNAL
            self._update(name, S.PIPELINE_STATE_FAILED, (status.value[0], (
                f"Training failed: the training process exited with status {code}"
                f"{': ' + result['message'] if result.get('message') else ''}. Log: {self.log_path(name)}\n"
                f"Last lines:\n{tail}")), training_task_metadata=_metadata(0))
            return
        try:
            model_name, version_id = self._register(name, out, inputs)
        except RpcError as e:
            self._update(name, S.PIPELINE_STATE_FAILED, (e.status_code_number(), f"Uploading the trained model "
                                                                                   f"failed: {e.message}"))
            return
        p = self.pipeline(name)
        uploaded = types.Model(p.model_to_upload)
        uploaded.name, uploaded.version_id = model_name, version_id
        self._update(name, S.PIPELINE_STATE_SUCCEEDED, model_to_upload=uploaded, training_task_metadata=_metadata(
            self.automl.cost(inputs["model_type"], seconds, inputs["budget"]), result.get("stopReason")))

    def _register(self, name: str, out: Path, inputs: dict) -> tuple[str, str]:
        """model_to_upload -> a model version (with its evaluation), as the pipeline's upload step does."""
        p = self.pipeline(name)
        parent = name.split("/trainingPipelines/")[0]
        mtu = p.model_to_upload
        mobile = inputs["model_type"] != "CLOUD"
        model = types.Model(
            display_name=mtu.display_name or p.display_name, description=mtu.description, labels=dict(mtu.labels),
            version_description=mtu.version_description, training_pipeline=name, predict_schemata=PREDICT_SCHEMATA,
            supported_export_formats=[types.Model.ExportFormat(id=f, exportable_contents=["ARTIFACT"])
                                      for f in (EDGE_EXPORT_FORMATS if mobile else ())],
            supported_deployment_resources_types=[types.Model.DeploymentResourcesType.AUTOMATIC_RESOURCES],
            model_source_info=types.ModelSourceInfo(source_type=types.ModelSourceInfo.ModelSourceType.AUTOML),
        )
        parent_model = p.parent_model.split("@")[0]
        if parent_model:
            model_name = parent_model
        else:
            model_name = f"{parent}/models/{p.model_id or self.store.next_id('model') + 1_000_000_000_000_000}"
        request = types.UploadModelRequest(parent=parent, parent_model=parent_model)
        version_id = self.models._add_version(request, model_name, model, list(mtu.version_aliases))
        version = f"{model_name}@{version_id}"
        self.store.set_value(f"{AUTOML_MODEL}{version}", {"dir": str(out), "model_type": inputs["model_type"],
                                                          "pipeline": name})
        evaluation = json.loads((out / "evaluation.json").read_text())
        ev_name = f"{model_name}/evaluations/{self.store.next_id('model_evaluation') + 7_000_000}"
        self.store.put(EVALUATION, ev_name, types.ModelEvaluation(
            name=ev_name, display_name=f"evaluation of {model.display_name} version {version_id}",
            metrics_schema_uri=CLASSIFICATION_METRICS_SCHEMA,
            metrics=json_format.ParseDict(evaluation["metrics"], struct_pb2.Value()), create_time=now(),
            data_item_schema_uri="gs://google-cloud-aiplatform/schema/dataset/dataitem/image_1.0.0.yaml",
            annotation_schema_uri="gs://google-cloud-aiplatform/schema/dataset/annotation/image_classification_1.0.0.yaml",
        ), parent=version)
        log.info("training pipeline %s: registered %s", name.rsplit("/", 1)[-1], version)
        return model_name, version_id

    def handler(self) -> grpc.GenericRpcHandler:
        return service_handler(SERVICE, {
            "CreateTrainingPipeline": (types.CreateTrainingPipelineRequest, types.TrainingPipeline,
                                       self.create_training_pipeline),
            "GetTrainingPipeline": (types.GetTrainingPipelineRequest, types.TrainingPipeline, self.get_training_pipeline),
            "ListTrainingPipelines": (types.ListTrainingPipelinesRequest, types.ListTrainingPipelinesResponse,
                                      self.list_training_pipelines),
            "CancelTrainingPipeline": (types.CancelTrainingPipelineRequest, empty_pb2.Empty,
                                       self.cancel_training_pipeline),
            "DeleteTrainingPipeline": (types.DeleteTrainingPipelineRequest, operations_pb2.Operation,
                                       self.delete_training_pipeline),
        }, self.faults)

"""DatasetService for image classification datasets: CreateDataset, GetDataset, ListDatasets,
DeleteDataset, ImportData, ListDataItems.

ImportData reads Vertex's single-label image classification import files from Cloud Storage, one
``[ML_USE,]GCS_FILE_PATH[,LABEL]`` row per image (ML_USE: ``training`` | ``validation`` | ``test``):
each image becomes a data item (one per file: importing it again updates it, as Vertex keeps one
item per image) whose ``aiplatform.googleapis.com/ml_use`` label records its split, with a
classification annotation naming its annotation spec (one per label). Rows that cannot be used (a
missing or unsupported file, an unknown ML_USE) are the operation's ``partial_failures``; an import
in which no row is usable fails. Training pipelines select items with filter splits on these labels
(``labels.aiplatform.googleapis.com/ml_use=training``), see ``items_matching``.
"""

from __future__ import annotations

import csv
import io
import logging
import re
import threading

import grpc
from google.cloud.aiplatform_v1 import types
from google.longrunning import operations_pb2
from google.protobuf import json_format, struct_pb2
from google.rpc import status_pb2

from localcloud import filters, rules
from localcloud.errors import RpcError, not_found
from localcloud.gcs import Gcs
from localcloud.lro import Operations, now
from localcloud.models import _order
from localcloud.rpc import paginate, service_handler
from localcloud.store import Store

log = logging.getLogger("localcloud.datasets")
SERVICE = "google.cloud.aiplatform.v1.DatasetService"
DATASET, ITEM, ANNOTATION, SPEC = "dataset", "data_item", "annotation", "annotation_spec"

IMAGE_METADATA_SCHEMA = "gs://google-cloud-aiplatform/schema/dataset/metadata/image_1.0.0.yaml"
IMAGE_DATA_ITEM_SCHEMA = "gs://google-cloud-aiplatform/schema/dataset/dataitem/image_1.0.0.yaml"
SINGLE_LABEL_IMPORT_SCHEMA = ("gs://google-cloud-aiplatform/schema/dataset/ioformat/"
                              "image_classification_single_label_io_format_1.0.0.yaml")
CLASSIFICATION_ANNOTATION_SCHEMA = "gs://google-cloud-aiplatform/schema/dataset/annotation/image_classification_1.0.0.yaml"
ML_USE_LABEL = "aiplatform.googleapis.com/ml_use"
ML_USES = ("training", "validation", "test")
# Vertex AI's training image formats, and its per-image size limit (30 MB).
IMAGE_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".gif": "image/gif",
               ".bmp": "image/bmp", ".ico": "image/x-icon"}
MAX_IMAGE_BYTES = 30 * 1024 * 1024
MAX_PARTIAL_FAILURES = 50

# Data item filters (ListDataItems, a training pipeline's FilterSplit): AND of labels.<key>=<value>,
# labels.<key>!=<value> and labels.<key>:* terms; "-" matches nothing.
_ITEM_TERM = re.compile(r'^\s*labels\.(?P<key>[A-Za-z0-9_.\-/]+)\s*(?P<op>!=|=|:)\s*(?P<value>"[^"]*"|[^\s"]+)\s*$')


def items_matching(items: list[types.DataItem], text: str) -> list[types.DataItem]:
    text = (text or "").strip()
    if text == "-":
        return []
    if not text:
        return list(items)
    terms = []
    for part in re.split(r"\s+AND\s+", text):
        m = _ITEM_TERM.match(part)
        if not m:
            raise rules.invalid(f"Unsupported data item filter '{text}': the local Vertex AI server accepts "
                                "labels.<key>=<value>, labels.<key>!=<value> and labels.<key>:* joined by AND, or '-'")
        value = m["value"][1:-1] if m["value"].startswith('"') else m["value"]
        terms.append((m["key"], m["op"], value))

    def ok(item: types.DataItem) -> bool:
        labels = dict(item.labels)
        for key, op, value in terms:
            actual = labels.get(key)
            if op == ":" and not (actual is not None and (value == "*" or value in actual)):
                return False
            if (op == "=" and actual != value) or (op == "!=" and actual == value):
                return False
        return True

    return [i for i in items if ok(i)]


def _value(obj) -> struct_pb2.Value:
    return json_format.ParseDict(obj, struct_pb2.Value())


def item_uri(item: types.DataItem) -> str:
    return json_format.MessageToDict(types.DataItem.pb(item).payload).get("imageGcsUri", "")


class DatasetService:
    def __init__(self, store: Store, operations: Operations, faults, gcs: Gcs):
        self.store = store
        self.operations = operations
        self.faults = faults
        self.gcs = gcs

    # ---- reads
    def dataset(self, name: str) -> types.Dataset:
        rules.parse_name(name, "datasets")
        found = self.store.get(DATASET, name, types.Dataset)
        if found is None:
            raise not_found("Dataset", name)
        return found

    def items(self, dataset_name: str) -> list[types.DataItem]:
        return self.store.list(ITEM, types.DataItem, parent=dataset_name)

    def annotation_specs(self, dataset_name: str) -> list[types.AnnotationSpec]:
        return self.store.list(SPEC, types.AnnotationSpec, parent=dataset_name)

    def item_labels(self, dataset_name: str) -> dict[str, str]:
        """data item name -> annotation spec id of its classification annotation."""
        out = {}
        for a in self.store.list(ANNOTATION, types.Annotation, prefix=dataset_name + "/dataItems/"):
            spec = json_format.MessageToDict(types.Annotation.pb(a).payload).get("annotationSpecId")
            out[a.name.split("/annotations/")[0]] = str(spec)
        return out

    def get_dataset(self, request: types.GetDatasetRequest) -> types.Dataset:
        return self.dataset(request.name)

    def list_datasets(self, request: types.ListDatasetsRequest) -> types.ListDatasetsResponse:
        rules.parse_parent(request.parent)
        terms = filters.parse(request.filter)
        found = [d for d in self.store.list(DATASET, types.Dataset, parent=request.parent)
                 if filters.matches(terms, {"display_name": d.display_name,
                                            "metadata_schema_uri": d.metadata_schema_uri}, dict(d.labels))]
        page, token = paginate(_order(found, request.order_by), request.page_size, request.page_token)
        return types.ListDatasetsResponse(datasets=page, next_page_token=token)

    def list_data_items(self, request: types.ListDataItemsRequest) -> types.ListDataItemsResponse:
        self.dataset(request.parent)
        found = items_matching(self.items(request.parent), request.filter)
        page, token = paginate(found, request.page_size, request.page_token)
        return types.ListDataItemsResponse(data_items=page, next_page_token=token)

    # ---- writes
    def create_dataset(self, request: types.CreateDatasetRequest) -> operations_pb2.Operation:
        rules.parse_parent(request.parent)
        dataset = types.Dataset(request.dataset)
        rules.display_name(dataset.display_name, "dataset")
        rules.labels(dict(dataset.labels), "dataset")
        if dataset.metadata_schema_uri != IMAGE_METADATA_SCHEMA:
            raise rules.invalid(f"dataset.metadata_schema_uri '{dataset.metadata_schema_uri}' is not supported by "
                                f"the local Vertex AI server: it holds image datasets ({IMAGE_METADATA_SCHEMA})")
        name = f"{request.parent}/datasets/{self.store.next_id('dataset') + 4_000_000_000_000_000}"

        def work():  # the dataset exists once the operation is done
            ts = now()
            dataset.name = name
            dataset.create_time = ts
            dataset.update_time = ts
            dataset.metadata = _value({"dataItemSchemaUri": IMAGE_DATA_ITEM_SCHEMA})
            dataset.etag = str(self.store.next_id("etag"))
            self.store.put(DATASET, name, dataset, parent=request.parent)
            return dataset

        return self.operations.start(name, "CreateDataset", types.CreateDatasetOperationMetadata(
            generic_metadata=types.GenericOperationMetadata(create_time=now(), update_time=now())), work)

    def delete_dataset(self, request: types.DeleteDatasetRequest) -> operations_pb2.Operation:
        self.dataset(request.name)

        def work():
            with self.store.tx():
                for a in self.store.list(ANNOTATION, types.Annotation, prefix=request.name + "/"):
                    self.store.delete(ANNOTATION, a.name)
                for kind, cls in ((ITEM, types.DataItem), (SPEC, types.AnnotationSpec)):
                    for r in self.store.list(kind, cls, parent=request.name):
                        self.store.delete(kind, r.name)
                self.store.delete(DATASET, request.name)

        return self.operations.start(request.name, "DeleteDataset", types.DeleteOperationMetadata(
            generic_metadata=types.GenericOperationMetadata(create_time=now(), update_time=now())), work)

    def import_data(self, request: types.ImportDataRequest) -> operations_pb2.Operation:
        self.dataset(request.name)
        configs = list(request.import_configs)
        if not configs:
            raise rules.invalid("import_configs must not be empty")
        for i, c in enumerate(configs):
            if c.import_schema_uri != SINGLE_LABEL_IMPORT_SCHEMA:
                raise rules.invalid(f"import_configs[{i}].import_schema_uri '{c.import_schema_uri}' is not supported "
                                    f"by the local Vertex AI server (it imports {SINGLE_LABEL_IMPORT_SCHEMA})")
            if not c.gcs_source.uris:
                raise rules.invalid(f"import_configs[{i}].gcs_source.uris must name at least one import file")
            for uri in c.gcs_source.uris:
                rules.gcs_uri(uri, f"import_configs[{i}].gcs_source.uris")
        metadata = types.ImportDataOperationMetadata(
            generic_metadata=types.GenericOperationMetadata(create_time=now(), update_time=now()))
        started, name = threading.Event(), {}

        def work():  # needs the operation's name (for its partial failures): known once start() returns
            started.wait(30)
            return self._import(request, name["op"])

        op = self.operations.start(request.name, "ImportData", metadata, work)
        name["op"] = op.name
        started.set()
        return op

    # ---- import
    def _rows(self, config: types.ImportDataConfig, failures: list[str]) -> list[tuple[str, str, str | None]]:
        """(ml_use or "", image URI, label) rows of the config's import files."""
        rows = []
        for uri in config.gcs_source.uris:
            try:
                text = self.gcs.read_text(uri)
            except Exception as e:  # noqa: BLE001 - reported as the operation's error below
                raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"cannot read import file {uri}: {e}") from None
            for n, row in enumerate(csv.reader(io.StringIO(text)), start=1):
                cells = [c.strip() for c in row]
                if not any(cells):
                    continue
                ml_use = ""
                if cells[0].lower() in ML_USES or (cells[0] and not cells[0].startswith("gs://")):
                    ml_use, cells = cells[0].lower(), cells[1:]
                if ml_use and ml_use not in ML_USES:
                    failures.append(f"{uri} line {n}: ML_USE '{row[0]}' is not one of {', '.join(ML_USES)}")
                    continue
                if not cells or not cells[0].startswith("gs://") or len(cells) > 2:
                    failures.append(f"{uri} line {n}: expected [ML_USE,]GCS_FILE_PATH[,LABEL], got {','.join(row)!r}")
                    continue
                rows.append((ml_use, cells[0], cells[1] if len(cells) > 1 and cells[1] else None))
        return rows

    def _import(self, request: types.ImportDataRequest, op_name: str) -> types.ImportDataResponse:
        failures: list[str] = []
        rows = []
        for config in request.import_configs:
            rows += [(r, config) for r in self._rows(config, failures)]
        sizes = self.gcs.sizes(sorted({uri for (_, uri, _), _ in rows}))
        usable = []
        for (ml_use, uri, label), config in rows:
            ext = "." + uri.rsplit(".", 1)[-1].lower() if "." in uri.rsplit("/", 1)[-1] else ""
            if uri not in sizes:
                failures.append(f"{uri}: file not found")
            elif ext not in IMAGE_TYPES:
                failures.append(f"{uri}: not a supported image type ({', '.join(sorted(IMAGE_TYPES))})")
            elif sizes[uri] > MAX_IMAGE_BYTES:
                failures.append(f"{uri}: {sizes[uri]} bytes, more than the {MAX_IMAGE_BYTES} byte limit")
            else:
                usable.append((ml_use, uri, label, IMAGE_TYPES[ext], config))
        if not usable:
            shown = "; ".join(failures[:5]) or "the import files have no rows"
            raise rules.invalid(f"ImportData imported nothing into {request.name}: {shown}")
        with self.store.tx():
            dataset = self.dataset(request.name)
            specs = {s.display_name: s for s in self.annotation_specs(request.name)}
            by_uri = {item_uri(i): i for i in self.items(request.name)}
            ts = now()
            for ml_use, uri, label, mime, config in usable:
                if label and label not in specs:
                    spec_name = f"{request.name}/annotationSpecs/{self.store.next_id('annotation_spec') + 5_000_000}"
                    specs[label] = types.AnnotationSpec(name=spec_name, display_name=label, create_time=ts,
                                                        update_time=ts)
                    self.store.put(SPEC, spec_name, specs[label], parent=request.name)
                item = by_uri.get(uri)
                if item is None:
                    item = types.DataItem(name=f"{request.name}/dataItems/{self.store.next_id('data_item')}",
                                          create_time=ts)
                    by_uri[uri] = item
                labels = {**dict(item.labels), **dict(config.data_item_labels)}
                if ml_use:
                    labels[ML_USE_LABEL] = ml_use
                item.labels = labels
                item.payload = _value({"imageGcsUri": uri, "mimeType": mime})
                item.update_time = ts
                self.store.put(ITEM, item.name, item, parent=request.name)
                if label:
                    annotation = types.Annotation(
                        name=f"{item.name}/annotations/1", payload_schema_uri=CLASSIFICATION_ANNOTATION_SCHEMA,
                        payload=_value({"annotationSpecId": specs[label].name.rsplit("/", 1)[-1],
                                        "displayName": label}),
                        labels=dict(config.annotation_labels), create_time=ts, update_time=ts)
                    self.store.put(ANNOTATION, annotation.name, annotation, parent=item.name)
            dataset.data_item_count = len(by_uri)
            dataset.update_time = ts
            dataset.etag = str(self.store.next_id("etag"))
            self.store.put(DATASET, dataset.name, dataset, parent=request.name.split("/datasets/")[0])
            if failures:
                self._record_partial_failures(op_name, failures)
        log.info("ImportData %s: %d rows imported, %d not", request.name, len(usable), len(failures))
        return types.ImportDataResponse()

    def _record_partial_failures(self, op_name: str, failures: list[str]) -> None:
        """ImportDataOperationMetadata.generic_metadata.partial_failures, as Vertex reports unusable rows."""
        from localcloud.lro import KIND, pack

        op = self.store.get(KIND, op_name, operations_pb2.Operation)
        shown = failures[:MAX_PARTIAL_FAILURES]
        if len(failures) > len(shown):
            shown.append(f"... and {len(failures) - len(shown)} more")
        meta = types.ImportDataOperationMetadata(generic_metadata=types.GenericOperationMetadata(
            create_time=now(), update_time=now(),
            partial_failures=[status_pb2.Status(code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message=m)
                              for m in shown]))
        op.metadata.CopyFrom(pack(meta))
        self.store.put(KIND, op_name, op)

    def handler(self) -> grpc.GenericRpcHandler:
        return service_handler(SERVICE, {
            "CreateDataset": (types.CreateDatasetRequest, operations_pb2.Operation, self.create_dataset),
            "GetDataset": (types.GetDatasetRequest, types.Dataset, self.get_dataset),
            "ListDatasets": (types.ListDatasetsRequest, types.ListDatasetsResponse, self.list_datasets),
            "DeleteDataset": (types.DeleteDatasetRequest, operations_pb2.Operation, self.delete_dataset),
            "ImportData": (types.ImportDataRequest, operations_pb2.Operation, self.import_data),
            "ListDataItems": (types.ListDataItemsRequest, types.ListDataItemsResponse, self.list_data_items),
        }, self.faults)

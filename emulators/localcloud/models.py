"""ModelService: the Model Registry.

A model has numbered versions; each version is stored as its own ``Model`` message (same ``name``,
its own ``version_id``). Aliases are unique within a model; the first version gets ``default``
and exactly one version always carries it; it moves only when a caller asks (an upload with
``default`` in ``version_aliases``, or MergeVersionAliases). ``GetModel`` resolves ``@<version>``
and ``@<alias>``; ``ListModels`` lists each model by its default version.
"""

from __future__ import annotations

import grpc
from google.cloud.aiplatform_v1 import types
from google.longrunning import operations_pb2

from localcloud import filters, rules
from localcloud.errors import RpcError, failed_precondition, not_found
from localcloud.lro import Operations, now
from localcloud.rpc import paginate, service_handler
from localcloud.store import Store

KIND = "model_version"
SERVICE = "google.cloud.aiplatform.v1.ModelService"


def _generic(**kw):
    return types.GenericOperationMetadata(create_time=now(), update_time=now(), **kw)


class ModelService:
    def __init__(self, store: Store, operations: Operations, faults, deployed_refs=None):
        self.store = store
        self.operations = operations
        self.faults = faults
        # model version name ("<model>@<version>") -> [DeployedModelRef]; set by the endpoint service.
        self.deployed_refs = deployed_refs or (lambda name: [])

    # ---- reads
    def versions(self, model_name: str) -> list[types.Model]:
        return self.store.list(KIND, types.Model, parent=model_name)

    def _with_refs(self, version: types.Model) -> types.Model:
        refs = self.deployed_refs(f"{version.name}@{version.version_id}")
        if refs:
            version.deployed_models = refs
        return version

    def resolve(self, name: str) -> types.Model:
        """``models/<id>``, ``models/<id>@<version id>`` or ``models/<id>@<alias>`` -> that version."""
        project, location, model_id, at = rules.parse_name(name, "models")
        model_name = f"projects/{project}/locations/{location}/models/{model_id}"
        versions = self.versions(model_name)
        if not versions:
            raise not_found("Model", model_name)
        wanted = at or "default"
        for v in versions:
            if v.version_id == wanted or wanted in v.version_aliases:
                return self._with_refs(v)
        raise not_found("Model", name)

    def get_model(self, request: types.GetModelRequest) -> types.Model:
        return self.resolve(request.name)

    def list_models(self, request: types.ListModelsRequest) -> types.ListModelsResponse:
        rules.parse_parent(request.parent)
        terms = filters.parse(request.filter)
        defaults = [v for v in self.store.list(KIND, types.Model, prefix=request.parent + "/models/")
                    if "default" in v.version_aliases]
        found = [v for v in defaults if filters.matches(terms, {"display_name": v.display_name}, dict(v.labels))]
        found = _order(found, request.order_by)
        page, token = paginate(found, request.page_size, request.page_token)
        return types.ListModelsResponse(models=[self._with_refs(v) for v in page], next_page_token=token)

    def list_model_versions(self, request: types.ListModelVersionsRequest) -> types.ListModelVersionsResponse:
        project, location, model_id, _ = rules.parse_name(request.name, "models")
        model_name = f"projects/{project}/locations/{location}/models/{model_id}"
        versions = self.versions(model_name)
        if not versions:
            raise not_found("Model", model_name)
        terms = filters.parse(request.filter)
        found = [v for v in versions if filters.matches(terms, {"display_name": v.display_name}, dict(v.labels))]
        found = _order(found, request.order_by)
        page, token = paginate(found, request.page_size, request.page_token)
        return types.ListModelVersionsResponse(models=[self._with_refs(v) for v in page], next_page_token=token)

    # ---- writes
    def upload_model(self, request: types.UploadModelRequest) -> operations_pb2.Operation:
        project, location = rules.parse_parent(request.parent)
        model = types.Model(request.model)
        rules.display_name(model.display_name, "model")
        rules.labels(dict(model.labels), "model")
        if not model.container_spec.image_uri:
            raise rules.invalid("model.container_spec.image_uri is required for a custom-trained model")
        if model.artifact_uri:
            rules.gcs_uri(model.artifact_uri, "model.artifact_uri")
        aliases = list(model.version_aliases)
        for alias in aliases:
            rules.version_alias(alias)
        if len(set(aliases)) != len(aliases):
            raise rules.invalid(f"model.version_aliases has duplicates: {aliases}")

        if request.parent_model:
            p_project, p_location, model_id, at = rules.parse_name(request.parent_model, "models")
            if at or (p_project, p_location) != (project, location):
                raise rules.invalid(f"parent_model '{request.parent_model}' must be a model of {request.parent}")
        else:
            model_id = request.model_id or str(self.store.next_id("model") + 1_000_000_000_000_000)
        model_name = f"{request.parent}/models/{model_id}"
        self._add_version(request, model_name, model, aliases, check_only=True)  # errors answer the call

        def work():  # the version exists once the operation is done (a failed one leaves none)
            version_id = self._add_version(request, model_name, model, aliases)
            return types.UploadModelResponse(model=model_name, model_version_id=version_id)

        return self.operations.start(model_name, "UploadModel",
                                     types.UploadModelOperationMetadata(generic_metadata=_generic()), work)

    def _add_version(self, request, model_name: str, model: types.Model, aliases: list[str],
                     check_only: bool = False) -> str:
        aliases = list(aliases)
        with self.store.tx():
            existing = self.versions(model_name)
            if request.parent_model and not existing:
                raise not_found("Model", model_name)
            if not request.parent_model and existing:
                raise RpcError(grpc.StatusCode.ALREADY_EXISTS, f"Model {model_name} already exists")
            for v in existing:
                taken = sorted(set(aliases) & set(v.version_aliases) - {"default"})
                if taken:
                    raise rules.invalid(f"Version alias(es) {taken} already used by version {v.version_id} of "
                                        f"model {model_name}; aliases are unique within a model "
                                        "(MergeVersionAliases moves one)")
            version_id = str(max((int(v.version_id) for v in existing), default=0) + 1)
            if check_only:
                return version_id
            if not existing and "default" not in aliases:
                aliases.append("default")  # the first version is the default one
            if "default" in aliases:
                for v in existing:
                    if "default" in v.version_aliases:
                        v.version_aliases = [a for a in v.version_aliases if a != "default"]
                        v.version_update_time = now()
                        self.store.put(KIND, f"{model_name}@{v.version_id}", v, parent=model_name)
            ts = now()
            model.name = model_name
            model.version_id = version_id
            model.version_aliases = aliases
            model.version_create_time = ts
            model.version_update_time = ts
            model.create_time = existing[0].create_time if existing else ts
            model.update_time = ts
            self.store.put(KIND, f"{model_name}@{version_id}", model, parent=model_name)
        return version_id

    def merge_version_aliases(self, request: types.MergeVersionAliasesRequest) -> types.Model:
        _, _, _, at = rules.parse_name(request.name, "models")
        if not at:
            raise rules.invalid(f"name '{request.name}' must name a version: models/<id>@<version id or alias>")
        adds = [a for a in request.version_aliases if not a.startswith("-")]
        removes = [a[1:] for a in request.version_aliases if a.startswith("-")]
        for alias in adds + removes:
            rules.version_alias(alias)
        if "default" in removes:
            raise rules.invalid("The default alias cannot be removed; move it by adding 'default' to another version")
        if set(adds) & set(removes):
            raise rules.invalid(f"version_aliases both adds and removes {sorted(set(adds) & set(removes))}")
        with self.store.tx():
            target = self.resolve(request.name)
            model_name = target.name
            for v in self.versions(model_name):
                if v.version_id == target.version_id:
                    continue
                moved = [a for a in v.version_aliases if a in adds]
                if moved:
                    v.version_aliases = [a for a in v.version_aliases if a not in adds]
                    v.version_update_time = now()
                    self.store.put(KIND, f"{model_name}@{v.version_id}", v, parent=model_name)
            aliases = [a for a in target.version_aliases if a not in removes]
            aliases += [a for a in adds if a not in aliases]
            target.version_aliases = aliases
            target.version_update_time = now()
            target.deployed_models = []
            self.store.put(KIND, f"{model_name}@{target.version_id}", target, parent=model_name)
        return self._with_refs(target)

    def delete_model_version(self, request: types.DeleteModelVersionRequest) -> operations_pb2.Operation:
        def check() -> types.Model:
            version = self.resolve(request.name)
            if "default" in version.version_aliases:
                raise failed_precondition(f"Version {version.version_id} of {version.name} is the default version; "
                                          "move the default alias before deleting it")
            if version.deployed_models:
                raise failed_precondition(f"Version {version.version_id} of {version.name} is deployed to "
                                          f"{[r.endpoint for r in version.deployed_models]}; undeploy it first")
            return version

        version = check()

        def work():  # deleted when the operation is done
            with self.store.tx():
                self.store.delete(KIND, f"{version.name}@{check().version_id}")

        return self.operations.start(version.name, "DeleteModelVersion",
                                     types.DeleteOperationMetadata(generic_metadata=_generic()), work)

    def delete_model(self, request: types.DeleteModelRequest) -> operations_pb2.Operation:
        project, location, model_id, at = rules.parse_name(request.name, "models")
        if at:
            raise rules.invalid("DeleteModel takes a model name without @version (use DeleteModelVersion)")
        def check() -> list[types.Model]:
            versions = self.versions(request.name)
            if not versions:
                raise not_found("Model", request.name)
            deployed = [v.version_id for v in versions if self._with_refs(v).deployed_models]
            if deployed:
                raise failed_precondition(f"Model {request.name} has deployed versions {deployed}; undeploy them first")
            return versions

        check()

        def work():  # deleted when the operation is done
            with self.store.tx():
                for v in check():
                    self.store.delete(KIND, f"{request.name}@{v.version_id}")

        return self.operations.start(request.name, "DeleteModel",
                                     types.DeleteOperationMetadata(generic_metadata=_generic()), work)

    def handler(self) -> grpc.GenericRpcHandler:
        return service_handler(SERVICE, {
            "UploadModel": (types.UploadModelRequest, operations_pb2.Operation, self.upload_model),
            "GetModel": (types.GetModelRequest, types.Model, self.get_model),
            "ListModels": (types.ListModelsRequest, types.ListModelsResponse, self.list_models),
            "ListModelVersions": (types.ListModelVersionsRequest, types.ListModelVersionsResponse,
                                  self.list_model_versions),
            "MergeVersionAliases": (types.MergeVersionAliasesRequest, types.Model, self.merge_version_aliases),
            "DeleteModelVersion": (types.DeleteModelVersionRequest, operations_pb2.Operation,
                                   self.delete_model_version),
            "DeleteModel": (types.DeleteModelRequest, operations_pb2.Operation, self.delete_model),
        }, self.faults)


def _order(items: list, order_by: str) -> list:
    """``create_time`` / ``create_time desc`` / ``display_name`` / ``update_time`` (as the List RPCs)."""
    if not order_by:
        return items
    field, _, direction = order_by.strip().partition(" ")
    if field not in ("create_time", "update_time", "display_name"):
        raise rules.invalid(f"Unsupported order_by '{order_by}' (create_time, update_time, display_name)")
    key = (lambda m: m.display_name) if field == "display_name" else (lambda m: getattr(m, field).timestamp())
    return sorted(items, key=key, reverse=direction.strip().lower() == "desc")


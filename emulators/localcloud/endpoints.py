"""EndpointService: endpoints, DeployModel / UndeployModel / MutateDeployedModel, traffic splits.

Rules applied as Vertex AI applies them: a traffic split names only deployed models on the endpoint
(``"0"`` for the one being deployed) and sums to 100; a DeployModel or UndeployModel with an empty
split leaves the split unchanged (so undeploying a model that still has traffic fails, unless it is
the last one); one mutating operation at a time per endpoint; at most
``max_deployed_models_per_endpoint`` deployed models. A DeployModel operation completes only once
every replica is healthy; a failed one leaves nothing deployed.
"""

from __future__ import annotations

import logging

import grpc
from google.cloud.aiplatform_v1 import types
from google.longrunning import operations_pb2

from localcloud import filters, rules
from localcloud.config import ServerConfig
from localcloud.errors import RpcError, failed_precondition, not_found
from localcloud.lro import Operations, now
from localcloud.models import ModelService, _generic, _order
from localcloud.rpc import paginate, service_handler
from localcloud.runtime import ImageNotMapped
from localcloud.serving import ServingRuntime
from localcloud.store import Store

log = logging.getLogger("localcloud.endpoints")
KIND = "endpoint"
SERVICE = "google.cloud.aiplatform.v1.EndpointService"


class EndpointService:
    def __init__(self, cfg: ServerConfig, store: Store, operations: Operations, faults, models: ModelService,
                 serving: ServingRuntime):
        self.cfg = cfg
        self.store = store
        self.operations = operations
        self.faults = faults
        self.models = models
        self.serving = serving
        self._busy: set[str] = set()
        models.deployed_refs = self.deployed_refs

    # ---- helpers
    def endpoint(self, name: str) -> types.Endpoint:
        rules.parse_name(name, "endpoints")
        found = self.store.get(KIND, name, types.Endpoint)
        if found is None:
            raise not_found("Endpoint", name)
        return found

    def _save(self, endpoint: types.Endpoint) -> None:
        endpoint.update_time = now()
        endpoint.etag = str(self.store.next_id("etag"))
        self.store.put(KIND, endpoint.name, endpoint, parent=endpoint.name.rsplit("/endpoints/", 1)[0])

    def deployed_refs(self, version_name: str) -> list[types.DeployedModelRef]:
        refs = []
        for ep in self.store.list(KIND, types.Endpoint):
            for dm in ep.deployed_models:
                if f"{dm.model}@{dm.model_version_id}" == version_name:
                    refs.append(types.DeployedModelRef(endpoint=ep.name, deployed_model_id=dm.id))
        return refs

    def _claim(self, name: str) -> None:
        with self.store.tx():
            if name in self._busy:
                raise failed_precondition(f"Endpoint {name} has an operation in progress (deploy, undeploy or "
                                          "mutate); retry when it is done")
            self._busy.add(name)

    def _release(self, name: str) -> None:
        self._busy.discard(name)

    def restore(self) -> int:
        """After a (re)start: serve every deployed model again and restore the routing table."""
        n = 0
        for ep in self.store.list(KIND, types.Endpoint):
            for dm in ep.deployed_models:
                try:
                    version = self.models.resolve(f"{dm.model}@{dm.model_version_id}")
                    self.serving.start(ep.name, dm, version, wait=False)
                    n += 1
                except Exception:
                    log.exception("could not restart deployed model %s of %s", dm.id, ep.name)
            self.serving.set_split(ep.name, dict(ep.traffic_split))
        return n

    # ---- endpoints
    def create_endpoint(self, request: types.CreateEndpointRequest) -> operations_pb2.Operation:
        rules.parse_parent(request.parent)
        endpoint = types.Endpoint(request.endpoint)
        rules.display_name(endpoint.display_name, "endpoint")
        rules.labels(dict(endpoint.labels), "endpoint")
        if endpoint.deployed_models or endpoint.traffic_split:
            raise rules.invalid("A new endpoint cannot have deployed_models or traffic_split; use DeployModel")
        endpoint_id = request.endpoint_id or str(self.store.next_id("endpoint") + 2_000_000_000_000_000)
        name = f"{request.parent}/endpoints/{endpoint_id}"

        def exists_check():
            if self.store.get(KIND, name, types.Endpoint) is not None:
                raise RpcError(grpc.StatusCode.ALREADY_EXISTS, f"Endpoint {name} already exists")

        exists_check()

        def work():  # the endpoint exists once the operation is done (a failed one leaves none)
            with self.store.tx():
                exists_check()
                endpoint.name = name
                endpoint.create_time = now()
                self._save(endpoint)
            return self.endpoint(name)

        return self.operations.start(name, "CreateEndpoint",
                                     types.CreateEndpointOperationMetadata(generic_metadata=_generic()), work)

    def get_endpoint(self, request: types.GetEndpointRequest) -> types.Endpoint:
        return self.endpoint(request.name)

    def list_endpoints(self, request: types.ListEndpointsRequest) -> types.ListEndpointsResponse:
        rules.parse_parent(request.parent)
        terms = filters.parse(request.filter)
        found = [e for e in self.store.list(KIND, types.Endpoint, parent=request.parent)
                 if filters.matches(terms, {"display_name": e.display_name}, dict(e.labels))]
        page, token = paginate(_order(found, request.order_by), request.page_size, request.page_token)
        return types.ListEndpointsResponse(endpoints=page, next_page_token=token)

    def update_endpoint(self, request: types.UpdateEndpointRequest) -> types.Endpoint:
        paths = list(request.update_mask.paths)
        allowed = {"display_name", "description", "labels", "traffic_split"}
        if not paths:
            raise rules.invalid("update_mask is required")
        unsupported = sorted(set(paths) - allowed)
        if unsupported:
            raise rules.invalid(f"update_mask paths {unsupported} cannot be updated (updatable: {sorted(allowed)})")
        with self.store.tx():
            current = self.endpoint(request.endpoint.name)
            if "display_name" in paths:
                current.display_name = rules.display_name(request.endpoint.display_name, "endpoint")
            if "description" in paths:
                current.description = request.endpoint.description
            if "labels" in paths:
                rules.labels(dict(request.endpoint.labels), "endpoint")
                current.labels = dict(request.endpoint.labels)
            if "traffic_split" in paths:
                # Sums to 100, or is empty: "if the Endpoint is to not accept any traffic at a moment".
                ids = {dm.id for dm in current.deployed_models}
                current.traffic_split = rules.traffic_split(dict(request.endpoint.traffic_split), ids)
            self._save(current)
            self.serving.set_split(current.name, dict(current.traffic_split))
        return current

    def delete_endpoint(self, request: types.DeleteEndpointRequest) -> operations_pb2.Operation:
        def check():
            current = self.endpoint(request.name)
            if current.deployed_models:
                raise failed_precondition(f"Endpoint {request.name} has deployed models "
                                          f"{[dm.id for dm in current.deployed_models]}; undeploy them first")

        check()

        def work():
            with self.store.tx():
                check()
                self.store.delete(KIND, request.name)
                self.serving.set_split(request.name, {})

        return self.operations.start(request.name, "DeleteEndpoint",
                                     types.DeleteOperationMetadata(generic_metadata=_generic()), work)

    # ---- deployments
    def deploy_model(self, request: types.DeployModelRequest) -> operations_pb2.Operation:
        dm = types.DeployedModel(request.deployed_model)
        endpoint = self.endpoint(request.endpoint)
        if not dm.model:
            raise rules.invalid("deployed_model.model is required")
        version = self.models.resolve(dm.model)
        res = dm.dedicated_resources
        kinds = set(version.supported_deployment_resources_types)  # recorded for AutoML models
        if kinds and res.machine_spec.machine_type and types.Model.DeploymentResourcesType.DEDICATED_RESOURCES not in kinds:
            raise rules.invalid(f"Model {version.name}@{version.version_id} does not support dedicated_resources (it "
                                f"supports {sorted(k.name for k in kinds)}); deploy it with automatic_resources")
        if not res.machine_spec.machine_type and not dm.automatic_resources.min_replica_count:
            raise rules.invalid("deployed_model.dedicated_resources.machine_spec.machine_type is required for a "
                                "custom-trained model")
        if res.machine_spec.machine_type:
            if res.min_replica_count < 1:
                raise rules.invalid("dedicated_resources.min_replica_count must be at least 1")
            if res.max_replica_count and res.max_replica_count < res.min_replica_count:
                raise rules.invalid("dedicated_resources.max_replica_count must be >= min_replica_count")
        if dm.id and not rules.DEPLOYED_MODEL_ID.match(dm.id):
            raise rules.invalid(f"deployed_model.id '{dm.id}' is invalid: 1-10 digits")
        if dm.display_name:
            rules.display_name(dm.display_name, "deployed_model")
        if len(endpoint.deployed_models) >= self.cfg.max_deployed_models_per_endpoint:
            raise RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"Endpoint {endpoint.name} already has {len(endpoint.deployed_models)} deployed models "
                           f"(limit {self.cfg.max_deployed_models_per_endpoint}); undeploy one first")
        existing_ids = {d.id for d in endpoint.deployed_models}
        split = dict(request.traffic_split)
        if split:
            split = rules.traffic_split(split, existing_ids | {"0"})
        self._claim(endpoint.name)
        dm.id = dm.id or str(self.store.next_id("deployed_model") + 1_000_000_000)[-10:]
        if dm.id in existing_ids:
            self._release(endpoint.name)
            raise RpcError(grpc.StatusCode.ALREADY_EXISTS, f"DeployedModel {dm.id} already exists on {endpoint.name}")
        dm.model = version.name
        dm.model_version_id = version.version_id
        dm.display_name = dm.display_name or version.display_name

        def work():
            try:
                try:
                    self.serving.start(endpoint.name, dm, version, wait=True)
                except ImageNotMapped as e:
                    raise failed_precondition(str(e)) from None
                with self.store.tx():
                    current = self.endpoint(endpoint.name)
                    dm.create_time = now()
                    current.deployed_models.append(dm)
                    if split:
                        current.traffic_split = {(dm.id if k == "0" else k): v for k, v in split.items()}
                    self._save(current)
                    self.serving.set_split(current.name, dict(current.traffic_split))
                return types.DeployModelResponse(deployed_model=dm)
            finally:
                self._release(endpoint.name)

        def undo(_error):  # also when an injected fault fails the operation before work() runs
            try:
                self.serving.stop(endpoint.name, dm.id, drain=False)
            finally:
                self._release(endpoint.name)

        return self.operations.start(endpoint.name, "DeployModel",
                                     types.DeployModelOperationMetadata(generic_metadata=_generic()), work, undo)

    def undeploy_model(self, request: types.UndeployModelRequest) -> operations_pb2.Operation:
        endpoint = self.endpoint(request.endpoint)
        ids = {d.id for d in endpoint.deployed_models}
        if request.deployed_model_id not in ids:
            raise not_found("DeployedModel", f"{request.endpoint}/deployedModels/{request.deployed_model_id}")
        remaining = ids - {request.deployed_model_id}
        if request.traffic_split:
            split = rules.traffic_split(dict(request.traffic_split), remaining)
        elif not remaining:
            split = {}
        else:
            split = dict(endpoint.traffic_split)
            if split.get(request.deployed_model_id, 0) > 0:
                raise failed_precondition(
                    f"DeployedModel {request.deployed_model_id} still has {split[request.deployed_model_id]} % of "
                    f"endpoint {endpoint.name}'s traffic; give traffic_split for the remaining models "
                    f"{sorted(remaining)} (or update the endpoint's traffic split first)")
            split.pop(request.deployed_model_id, None)
        if remaining and split and sum(split.values()) != 100:  # empty: the endpoint takes no traffic
            raise rules.invalid(f"The traffic split after undeploying must sum to 100, got {split}")
        self._claim(endpoint.name)

        def work():
            try:
                # Out of routing first, then drain and stop: no request is sent to a stopping model.
                self.serving.set_split(endpoint.name, split)
                self.serving.stop(endpoint.name, request.deployed_model_id, drain=True)
                with self.store.tx():
                    current = self.endpoint(endpoint.name)
                    current.deployed_models = [d for d in current.deployed_models if d.id != request.deployed_model_id]
                    current.traffic_split = split
                    self._save(current)
                return types.UndeployModelResponse()
            finally:
                self._release(endpoint.name)

        return self.operations.start(endpoint.name, "UndeployModel",
                                     types.UndeployModelOperationMetadata(generic_metadata=_generic()), work,
                                     lambda _error: self._release(endpoint.name))

    def mutate_deployed_model(self, request: types.MutateDeployedModelRequest) -> operations_pb2.Operation:
        paths = set(request.update_mask.paths)
        allowed = {"dedicated_resources.min_replica_count", "dedicated_resources.max_replica_count",
                   "display_name", "disable_container_logging"}
        if not paths or paths - allowed:
            raise rules.invalid(f"update_mask must name only {sorted(allowed)}, got {sorted(paths)}")
        endpoint = self.endpoint(request.endpoint)
        target = next((d for d in endpoint.deployed_models if d.id == request.deployed_model.id), None)
        if target is None:
            raise not_found("DeployedModel", f"{request.endpoint}/deployedModels/{request.deployed_model.id}")
        new = request.deployed_model
        if "display_name" in paths:
            rules.display_name(new.display_name, "deployed_model")
        min_path, max_path = "dedicated_resources.min_replica_count", "dedicated_resources.max_replica_count"
        res = target.dedicated_resources
        min_count = new.dedicated_resources.min_replica_count if min_path in paths else res.min_replica_count
        max_count = new.dedicated_resources.max_replica_count if max_path in paths else res.max_replica_count
        if min_path in paths and min_count < 1:
            raise rules.invalid("dedicated_resources.min_replica_count must be at least 1")
        if max_count and max_count < min_count:
            raise rules.invalid(f"dedicated_resources.max_replica_count ({max_count}) must be >= "
                                f"min_replica_count ({min_count})")
        self._claim(endpoint.name)

        def work():
            try:
                if min_path in paths:  # first the processes (all healthy, or none added), then the record
                    self.serving.resize(endpoint.name, target.id, min_count)
                with self.store.tx():
                    current = self.endpoint(endpoint.name)
                    dm = next(d for d in current.deployed_models if d.id == target.id)
                    if "display_name" in paths:
                        dm.display_name = new.display_name
                    if min_path in paths:
                        dm.dedicated_resources.min_replica_count = min_count
                    if max_path in paths:
                        dm.dedicated_resources.max_replica_count = max_count
                    if "disable_container_logging" in paths:
                        dm.disable_container_logging = new.disable_container_logging
                    self._save(current)
                return types.MutateDeployedModelResponse(deployed_model=dm)
            finally:
                self._release(endpoint.name)

        return self.operations.start(endpoint.name, "MutateDeployedModel",
                                     types.MutateDeployedModelOperationMetadata(generic_metadata=_generic()), work,
                                     lambda _error: self._release(endpoint.name))

    def handler(self) -> grpc.GenericRpcHandler:
        return service_handler(SERVICE, {
            "CreateEndpoint": (types.CreateEndpointRequest, operations_pb2.Operation, self.create_endpoint),
            "GetEndpoint": (types.GetEndpointRequest, types.Endpoint, self.get_endpoint),
            "ListEndpoints": (types.ListEndpointsRequest, types.ListEndpointsResponse, self.list_endpoints),
            "UpdateEndpoint": (types.UpdateEndpointRequest, types.Endpoint, self.update_endpoint),
            "DeleteEndpoint": (types.DeleteEndpointRequest, operations_pb2.Operation, self.delete_endpoint),
            "DeployModel": (types.DeployModelRequest, operations_pb2.Operation, self.deploy_model),
            "UndeployModel": (types.UndeployModelRequest, operations_pb2.Operation, self.undeploy_model),
            "MutateDeployedModel": (types.MutateDeployedModelRequest, operations_pb2.Operation,
                                    self.mutate_deployed_model),
        }, self.faults)

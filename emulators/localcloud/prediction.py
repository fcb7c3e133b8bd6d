"""PredictionService: Predict / RawPredict, routed by the endpoint's traffic split.

The request's instances go to one deployed model's container as ``{"instances": [...],
"parameters": ...}`` (Vertex's custom-container contract); its ``predictions`` come back with
``deployed_model_id``, ``model``, ``model_version_id`` and ``model_display_name``, which is how a
caller tells which deployed model answered (the canary smoke test relies on it). Requests over
1.5 MB are refused, as online prediction refuses them. The same core serves the REST form
``POST /v1/<endpoint>:predict`` (http_api.py).
"""

from __future__ import annotations

import json

import grpc
from google.api import httpbody_pb2
from google.cloud.aiplatform_v1 import types
from google.protobuf import json_format

from localcloud import rules
from localcloud.endpoints import EndpointService
from localcloud.errors import RpcError
from localcloud.rpc import service_handler
from localcloud.serving import ServingRuntime

SERVICE = "google.cloud.aiplatform.v1.PredictionService"
PredictResponsePb = types.PredictResponse.pb()

_HTTP_TO_GRPC = {
    400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND, 409: grpc.StatusCode.ABORTED,
    413: grpc.StatusCode.INVALID_ARGUMENT, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED, 501: grpc.StatusCode.UNIMPLEMENTED, 503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def grpc_code(http_status: int) -> grpc.StatusCode:
    return _HTTP_TO_GRPC.get(http_status, grpc.StatusCode.INTERNAL if http_status >= 500
                             else grpc.StatusCode.FAILED_PRECONDITION)


def too_large(size: int) -> RpcError:
    return rules.invalid(f"Request payload size exceeds the limit: {rules.MAX_PREDICT_REQUEST_BYTES} bytes "
                         f"(got {size} bytes); send fewer or smaller instances")


class PredictionService:
    def __init__(self, endpoints: EndpointService, serving: ServingRuntime, faults):
        self.endpoints = endpoints
        self.serving = serving
        self.faults = faults

    def call(self, endpoint_name: str, body: bytes, content_type: str = "application/json"):
        """Route one request; (Deployment, HTTP status, response body, content type)."""
        self.endpoints.endpoint(endpoint_name)
        if len(body) > rules.MAX_PREDICT_REQUEST_BYTES:
            raise too_large(len(body))
        d, replica = self.serving.route(endpoint_name)
        rule = self.faults.predict_error(d.id)
        if rule is not None:
            d.release(replica)
            return d, rule.http_status, json.dumps({"error": rule.message}).encode(), "application/json"
        status, data, ctype = self.serving.forward(d, replica, body, content_type)
        return d, status, data, ctype

    def predict_dict(self, endpoint_name: str, instances: list, parameters=None, size: int | None = None) -> dict:
        """Predict with JSON values; the REST response body (camelCase keys, as Vertex's REST API)."""
        payload = {"instances": instances}
        if parameters is not None:
            payload["parameters"] = parameters
        body = json.dumps(payload).encode()
        if size is not None and size > rules.MAX_PREDICT_REQUEST_BYTES:
            raise too_large(size)
        d, status, data, _ = self.call(endpoint_name, body)
        text = data.decode(errors="replace")
        if status != 200:
            raise RpcError(grpc_code(status), f"Deployed model {d.id} answered HTTP {status}: {text[:1000]}")
        try:
            answer = json.loads(text)
        except json.JSONDecodeError:
            raise RpcError(grpc.StatusCode.INTERNAL,
                           f"Deployed model {d.id} answered with invalid JSON: {text[:300]}") from None
        if not isinstance(answer, dict) or not isinstance(answer.get("predictions"), list):
            raise RpcError(grpc.StatusCode.INTERNAL, f"Deployed model {d.id} answered without a 'predictions' list: "
                                                     f"{text[:300]}")
        return {
            "predictions": answer["predictions"],
            "deployedModelId": d.id,
            "model": d.model.name,
            "modelVersionId": d.model.version_id,
            "modelDisplayName": d.model.display_name,
        }

    def predict(self, request: types.PredictRequest):
        size = len(types.PredictRequest.serialize(request))
        as_json = json_format.MessageToDict(types.PredictRequest.pb(request))
        out = self.predict_dict(request.endpoint, as_json.get("instances", []), as_json.get("parameters"), size)
        return json_format.ParseDict(out, PredictResponsePb())

    def raw_predict(self, request: types.RawPredictRequest) -> httpbody_pb2.HttpBody:
        body = request.http_body
        d, status, data, ctype = self.call(request.endpoint, body.data, body.content_type or "application/json")
        if status != 200:
            raise RpcError(grpc_code(status), f"Deployed model {d.id} answered HTTP {status}: "
                                              f"{data.decode(errors='replace')[:1000]}")
        return httpbody_pb2.HttpBody(content_type=ctype, data=data)

    def handler(self) -> grpc.GenericRpcHandler:
        return service_handler(SERVICE, {
            "Predict": (types.PredictRequest, PredictResponsePb, self.predict),
            "RawPredict": (types.RawPredictRequest, httpbody_pb2.HttpBody, self.raw_predict),
        }, self.faults)

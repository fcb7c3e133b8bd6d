"""Serve a gRPC service from plain methods, with the real message types on the wire.

Each handler takes the deserialized request (a proto-plus message, or a raw protobuf message for
google.longrunning) and returns the response message, or raises ``RpcError``. Unknown failures
become INTERNAL with the exception text. Every call passes the fault injector first and is logged
with its status and latency.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import grpc
import proto

from localcloud.errors import RpcError
from localcloud.faults import Faults

log = logging.getLogger("localcloud.rpc")


def _codec(cls) -> tuple[Callable[[bytes], Any], Callable[[Any], bytes]]:
    if isinstance(cls, type) and issubclass(cls, proto.Message):
        return cls.deserialize, cls.serialize
    return cls.FromString, lambda m: m.SerializeToString()


def service_handler(service: str, methods: dict[str, tuple[type, type, Callable]],
                    faults: Faults) -> grpc.GenericRpcHandler:
    """``methods``: RPC name -> (request type, response type, handler(request) -> response)."""
    handlers = {}
    for rpc_name, (request_cls, response_cls, fn) in methods.items():
        full = f"{service}/{rpc_name}"
        deserialize, _ = _codec(request_cls)
        _, serialize = _codec(response_cls)
        handlers[rpc_name] = grpc.unary_unary_rpc_method_handler(
            _behavior(full, fn, faults), request_deserializer=deserialize, response_serializer=serialize,
        )
    return grpc.method_handlers_generic_handler(service, handlers)


def _behavior(full: str, fn: Callable, faults: Faults):
    def behavior(request, context: grpc.ServicerContext):
        t0 = time.perf_counter()
        code = "OK"
        try:
            faults.check_rpc(full)
            return fn(request)
        except RpcError as e:
            code = e.code.name
            context.abort(e.code, e.message)
        except Exception as e:
            if isinstance(e, grpc.RpcError) or type(e).__name__ == "_AbortError":
                raise
            code = "INTERNAL"
            log.exception("%s failed", full)
            context.abort(grpc.StatusCode.INTERNAL, f"local Vertex AI server error in {full}: {e}")
        finally:
            log.info("%s %s %.1f ms", full.rsplit(".", 1)[-1], code, (time.perf_counter() - t0) * 1e3)

    return behavior


def paginate(items: list, page_size: int, page_token: str, default_size: int = 100) -> tuple[list, str]:
    """(page, next_page_token) with an offset token, as list RPCs answer."""
    try:
        start = int(page_token) if page_token else 0
    except ValueError:
        raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"Invalid page_token '{page_token}'") from None
    size = page_size if page_size and page_size > 0 else default_size
    end = start + size
    return items[start:end], (str(end) if end < len(items) else "")

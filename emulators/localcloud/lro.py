"""google.longrunning operations: stored, polled with GetOperation, finished by a worker thread.

An operation's work runs in the background; its result (packed into ``response``) or its error is
committed to the store before ``done`` becomes visible. Operations that were still running when the
server stopped are finished with ABORTED on the next start (the caller retries the call).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime

import grpc
from google.longrunning import operations_pb2
from google.protobuf import any_pb2, empty_pb2
from google.rpc import status_pb2

from localcloud.errors import RpcError, not_found
from localcloud.faults import Faults
from localcloud.rpc import paginate, service_handler
from localcloud.store import Store

log = logging.getLogger("localcloud.lro")
KIND = "operation"


def pack(message) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(type(message).pb(message) if not hasattr(message, "SerializeToString") else message)
    return out


def now() -> datetime:
    return datetime.now(UTC)


class Operations:
    def __init__(self, store: Store, faults: Faults):
        self.store = store
        self.faults = faults
        self._threads: list[threading.Thread] = []

    def recover(self) -> int:
        """Finish operations a previous server process left running. Returns how many."""
        n = 0
        for op in self.store.list(KIND, operations_pb2.Operation):
            if not op.done:
                op.done = True
                op.error.CopyFrom(status_pb2.Status(
                    code=grpc.StatusCode.ABORTED.value[0],
                    message="interrupted by a restart of the local Vertex AI server; retry the call"))
                self.store.put(KIND, op.name, op)
                n += 1
        return n

    def start(self, resource: str, method: str, metadata, work: Callable[[], object],
              on_error: Callable[[RpcError], None] | None = None) -> operations_pb2.Operation:
        """Create ``<resource>/operations/<id>`` and run ``work()`` (returns the response message) in
        the background. ``on_error`` undoes partial work when it fails."""
        op = operations_pb2.Operation(name=f"{resource}/operations/{self.store.next_id('operation')}",
                                      metadata=pack(metadata))
        self.store.put(KIND, op.name, op)
        thread = threading.Thread(target=self._run, args=(op.name, method, work, on_error),
                                  name=f"op-{method}", daemon=True)
        self._threads = [t for t in self._threads if t.is_alive()]
        self._threads.append(thread)
        thread.start()
        return op

    def _run(self, name: str, method: str, work, on_error) -> None:
        try:
            injected = self.faults.operation_error(method)
            if injected:
                raise injected
            response = work()
            op = self.store.get(KIND, name, operations_pb2.Operation)  # read after work(): it may add metadata
            op.response.CopyFrom(pack(response if response is not None else empty_pb2.Empty()))
        except Exception as e:
            error = e if isinstance(e, RpcError) else RpcError(grpc.StatusCode.INTERNAL, f"{method} failed: {e}")
            if not isinstance(e, RpcError):
                log.exception("operation %s (%s) failed", name, method)
            if on_error:
                try:
                    on_error(error)
                except Exception:
                    log.exception("undoing operation %s (%s) failed", name, method)
            op = self.store.get(KIND, name, operations_pb2.Operation)
            op.error.CopyFrom(status_pb2.Status(code=error.status_code_number(), message=error.message))
        op.done = True
        self.store.put(KIND, name, op)
        log.info("operation %s (%s) done%s", name, method, f": error {op.error.message}" if op.HasField("error") else "")

    def get(self, name: str) -> operations_pb2.Operation:
        op = self.store.get(KIND, name, operations_pb2.Operation)
        if op is None:
            raise not_found("Operation", name)
        return op

    def wait_all(self, timeout: float = 30) -> None:
        for t in list(self._threads):
            t.join(timeout)

    # ---- google.longrunning.Operations
    def handler(self) -> grpc.GenericRpcHandler:
        return service_handler("google.longrunning.Operations", {
            "GetOperation": (operations_pb2.GetOperationRequest, operations_pb2.Operation,
                             lambda r: self.get(r.name)),
            "ListOperations": (operations_pb2.ListOperationsRequest, operations_pb2.ListOperationsResponse,
                               self._list),
            "DeleteOperation": (operations_pb2.DeleteOperationRequest, empty_pb2.Empty, self._delete),
            "CancelOperation": (operations_pb2.CancelOperationRequest, empty_pb2.Empty, self._cancel),
            "WaitOperation": (operations_pb2.WaitOperationRequest, operations_pb2.Operation,
                              lambda r: self.get(r.name)),
        }, self.faults)

    def _list(self, request) -> operations_pb2.ListOperationsResponse:
        prefix = request.name.rstrip("/") + "/operations/"
        ops = self.store.list(KIND, operations_pb2.Operation, prefix=prefix)
        page, token = paginate(ops, request.page_size, request.page_token)
        return operations_pb2.ListOperationsResponse(operations=page, next_page_token=token)

    def _delete(self, request) -> empty_pb2.Empty:
        self.get(request.name)
        self.store.delete(KIND, request.name)
        return empty_pb2.Empty()

    def _cancel(self, request) -> empty_pb2.Empty:
        self.get(request.name)
        # Vertex AI: "best effort"; these operations finish in seconds, so cancellation is a no-op.
        return empty_pb2.Empty()

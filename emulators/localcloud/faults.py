"""Fault injection for tests: make the n-th call of a method fail, an operation end in an error, or a
deployed model answer predictions with an error. Rules live in memory (a restart clears them) and
are added over the admin REST API (``POST /localcloud/faults``) or directly in-process.

Rule fields:
- ``method``: an RPC's full name (``google.cloud.aiplatform.v1.JobService/GetCustomJob``) or its
  last part (``GetCustomJob``);
- ``kind``: ``rpc`` (the call itself fails with ``code``), ``operation`` (the call answers with an
  operation that then fails with ``code``), ``predict`` (a deployed model's HTTP answer is replaced
  by ``http_status``; ``deployed_model_id`` narrows it);
- ``skip``: let this many matching calls through first; ``times``: fail this many (0 = forever).
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import asdict, dataclass, field

import grpc

from localcloud.errors import RpcError

_ids = itertools.count(1)


@dataclass
class FaultRule:
    method: str = "*"
    kind: str = "rpc"  # rpc | operation | predict
    code: str = "UNAVAILABLE"
    message: str = "injected fault"
    skip: int = 0
    times: int = 1
    http_status: int = 503
    deployed_model_id: str | None = None
    id: int = field(default_factory=lambda: next(_ids))
    seen: int = 0
    fired: int = 0

    def matches(self, kind: str, method: str, deployed_model_id: str | None = None) -> bool:
        if self.kind != kind:
            return False
        if self.method not in ("*", method) and not method.endswith("/" + self.method):
            return False
        return self.deployed_model_id in (None, deployed_model_id)

    def error(self) -> RpcError:
        code = getattr(grpc.StatusCode, self.code.upper(), None)
        if code is None:
            raise ValueError(f"unknown gRPC status code {self.code!r}")
        return RpcError(code, self.message)


class Faults:
    def __init__(self):
        self._rules: list[FaultRule] = []
        self._lock = threading.Lock()

    def add(self, **fields) -> FaultRule:
        rule = FaultRule(**fields)
        if rule.kind not in ("rpc", "operation", "predict"):
            raise ValueError(f"fault kind must be rpc, operation or predict, got {rule.kind!r}")
        if rule.kind != "predict":
            rule.error()  # validate the code now
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    def list(self) -> list[dict]:
        with self._lock:
            return [asdict(r) for r in self._rules]

    def _fire(self, kind: str, method: str, deployed_model_id: str | None = None) -> FaultRule | None:
        with self._lock:
            for rule in self._rules:
                if not rule.matches(kind, method, deployed_model_id):
                    continue
                rule.seen += 1
                if rule.seen <= rule.skip or (rule.times and rule.fired >= rule.times):
                    continue
                rule.fired += 1
                return rule
        return None

    def check_rpc(self, method: str) -> None:
        """Raise the injected error if a ``rpc`` rule fires for this call."""
        rule = self._fire("rpc", method)
        if rule:
            raise rule.error()

    def operation_error(self, method: str) -> RpcError | None:
        rule = self._fire("operation", method)
        return rule.error() if rule else None

    def predict_error(self, deployed_model_id: str) -> FaultRule | None:
        return self._fire("predict", "Predict", deployed_model_id)

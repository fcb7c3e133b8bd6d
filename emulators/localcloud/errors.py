"""The one exception type the services raise: a gRPC status code and a message."""

from __future__ import annotations

import grpc


class RpcError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def status_code_number(self) -> int:
        return self.code.value[0]


def not_found(what: str, name: str) -> RpcError:
    return RpcError(grpc.StatusCode.NOT_FOUND, f"{what} \"{name}\" not found.")


def failed_precondition(message: str) -> RpcError:
    return RpcError(grpc.StatusCode.FAILED_PRECONDITION, message)

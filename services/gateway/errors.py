"""Error bodies of the gateway: `{error, success, code}` with grpc-gateway's HTTP status for each gRPC code."""

from __future__ import annotations

import grpc
from starlette.responses import JSONResponse

from services.gateway.bindings import Binding

# grpc-gateway's mapping of gRPC status codes to HTTP.
HTTP_STATUS = {
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}
# For errors the gateway answers itself, without a call.
STATUS_CODE_NAMES = {404: "NOT_FOUND", 405: "UNIMPLEMENTED", 413: "RESOURCE_EXHAUSTED", 429: "RESOURCE_EXHAUSTED"}


def rpc_error_response(binding: Binding, error: grpc.aio.AioRpcError) -> JSONResponse:
    details = error.details() or error.code().name
    if error.code() == grpc.StatusCode.UNAVAILABLE:
        details = f"the {binding.backend} service is unavailable: {details}"
    elif error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        details = (
            f"the {binding.backend} service did not answer in time ({details}); calls may take "
            f"VERS_RPC_TIMEOUT_SECONDS, an exec its own timeout on top"
        )
    return error_response(HTTP_STATUS.get(error.code(), 500), error.code().name, details)


def error_response(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "success": False, "code": code}, status_code=status)

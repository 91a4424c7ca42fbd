"""Error bodies of the gateway: `{error, success, code}` with grpc-gateway's HTTP status for each gRPC code,
and the fields that an error's details add (`findings` for the secrets that refused a publish)."""

from __future__ import annotations

from typing import Any

import grpc
from grpc_status import rpc_status
from starlette.responses import JSONResponse

from services.gateway.bindings import Binding
from services.gateway.transcode import to_json
from vers.common.v1 import governance_pb2

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
    return error_response(HTTP_STATUS.get(error.code(), 500), error.code().name, details, **detail_fields(error))


def detail_fields(error: grpc.aio.AioRpcError) -> dict[str, Any]:
    """The body's fields for the details the service sent with the error (a google.rpc.Status)."""
    try:
        status = rpc_status.from_call(error)
    except ValueError:  # a status whose code or message disagree with the call's: not the service's own
        return {}
    fields: dict[str, Any] = {}
    for detail in status.details if status is not None else ():
        if detail.Is(governance_pb2.SecretFindings.DESCRIPTOR):
            findings = governance_pb2.SecretFindings()
            detail.Unpack(findings)
            fields["findings"] = to_json(findings)["findings"]
    return fields


def error_response(status: int, code: str, message: str, **fields: Any) -> JSONResponse:
    return JSONResponse({"error": message, "success": False, "code": code, **fields}, status_code=status)

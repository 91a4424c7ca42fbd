"""Streaming RPCs over plain HTTP, from the same bindings as the unary routes.

- A server stream answers NDJSON (`application/x-ndjson`): one JSON object per message and line (the
  `response_body` field's value when the rule names one), unset `optional` fields left out. When the
  `response_body` field is a `google.api.HttpBody`, the answer is instead the raw bytes of each message's
  `data`, with the first message's content type (a file, a tar stream).
- A client stream whose `body` field is a `google.api.HttpBody` takes the HTTP request body, in chunks of at
  most UPLOAD_CHUNK bytes, as that field's `data` of successive messages; the first message also carries the
  path variables and the query string.

An error before the first answer is the usual JSON error with its status. After it the status is gone: an
NDJSON stream ends with one line `{"error": ..., "code": ...}`, a raw body is cut off (the client sees an
incomplete transfer, never a shorter file that looks whole).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from services.gateway.bindings import Binding
from services.gateway.errors import error_response, rpc_error_response
from services.gateway.transcode import BadRequest, build_request, descriptor_of

HTTP_BODY = "google.api.HttpBody"
NDJSON = "application/x-ndjson"
# What one message of an upload carries at most: well under gRPC's message limit, large enough to be cheap.
UPLOAD_CHUNK = 64 * 1024


class StreamCut(Exception):
    """Raised inside a raw answer after its status was sent: the server closes the connection mid-body."""


def http_body_field(descriptor: Descriptor, name: str) -> FieldDescriptor | None:
    field = descriptor.fields_by_name.get(name) if name and name != "*" else None
    if field is not None and field.message_type is not None and field.message_type.full_name == HTTP_BODY:
        return field
    return None


def is_http_stream(binding: Binding) -> bool:
    """Served over plain HTTP: a server stream, or a client stream of an HttpBody (bidi streams are WebSockets)."""
    method = binding.method
    if method.client_streaming and method.server_streaming:
        return False
    if method.server_streaming:
        return True
    return method.client_streaming and http_body_field(method.input_type, binding.body) is not None


def event_json(binding: Binding, message: Message) -> Any:
    data = json_format.MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    return data.get(binding.response_body) if binding.response_body else data


async def serve_server_stream(
    binding: Binding,
    channel: grpc.aio.Channel,
    message: Message,
    response_class: type[Message],
    metadata: tuple[tuple[str, str], ...],
    timeout: float,
) -> Response:
    call = channel.unary_stream(
        binding.grpc_path, request_serializer=type(message).SerializeToString, response_deserializer=response_class.FromString
    )(message, metadata=metadata, timeout=timeout)
    try:
        first = await call.read()
    except grpc.aio.AioRpcError as error:
        return rpc_error_response(binding, error)
    raw = http_body_field(descriptor_of(response_class), binding.response_body)
    if raw is not None:
        content_type = "application/octet-stream"
        if first is not grpc.aio.EOF and getattr(first, raw.name).content_type:
            content_type = getattr(first, raw.name).content_type
        return StreamingResponse(_raw(call, first, raw.name), status_code=binding.success_code, media_type=content_type)
    return StreamingResponse(_lines(binding, call, first), status_code=binding.success_code, media_type=NDJSON)


async def _raw(call: grpc.aio.UnaryStreamCall, answer: Any, field: str) -> AsyncIterator[bytes]:
    try:
        while answer is not grpc.aio.EOF:
            if data := getattr(answer, field).data:
                yield data
            answer = await call.read()
    except grpc.aio.AioRpcError as error:
        raise StreamCut(f"{error.code().name}: {error.details()}") from None
    finally:
        call.cancel()


async def _lines(binding: Binding, call: grpc.aio.UnaryStreamCall, answer: Any) -> AsyncIterator[bytes]:
    try:
        while answer is not grpc.aio.EOF:
            yield json.dumps(event_json(binding, answer), separators=(",", ":")).encode() + b"\n"
            answer = await call.read()
    except grpc.aio.AioRpcError as error:
        body = rpc_error_response(binding, error).body
        problem = json.loads(bytes(body))
        yield json.dumps({"error": problem["error"], "code": problem["code"]}, separators=(",", ":")).encode() + b"\n"
    finally:
        call.cancel()


async def serve_client_stream(
    binding: Binding,
    channel: grpc.aio.Channel,
    request: Request,
    request_class: type[Message],
    response_class: type[Message],
    metadata: tuple[tuple[str, str], ...],
    timeout: float,
    answer_json: Any,
) -> Response:
    field = http_body_field(descriptor_of(request_class), binding.body)
    assert field is not None
    try:
        # The body is the stream, not JSON: the first message is made from the URL alone.
        first = build_request(binding, request_class(), request.path_params, request.query_params.multi_items(), b"")
    except BadRequest as error:
        return error_response(400, "INVALID_ARGUMENT", str(error))
    getattr(first, field.name).content_type = request.headers.get("content-type", "")

    async def messages() -> AsyncIterator[Message]:
        pending: Message | None = first
        async for chunk in request.stream():
            for start in range(0, len(chunk), UPLOAD_CHUNK):
                message = pending if pending is not None else request_class()
                pending = None
                getattr(message, field.name).data = chunk[start : start + UPLOAD_CHUNK]
                yield message
        if pending is not None:  # an empty body: the URL's message alone
            yield pending

    call = channel.stream_unary(
        binding.grpc_path, request_serializer=request_class.SerializeToString, response_deserializer=response_class.FromString
    )
    try:
        answer = await call(messages(), metadata=metadata, timeout=timeout)
    except grpc.aio.AioRpcError as error:
        return rpc_error_response(binding, error)
    return JSONResponse(answer_json(binding, answer), status_code=binding.success_code)

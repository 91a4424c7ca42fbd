"""The one place that speaks gRPC status codes: authentication, authorization and error mapping."""

from __future__ import annotations

import inspect
import logging
from enum import Enum
from functools import cache
from typing import Any

import grpc
from google.protobuf import any_pb2, descriptor_pool
from google.rpc import status_pb2
from grpc_status import rpc_status

from services.common.auth import Principal, TokenResolver, bearer_token, reset_principal, set_principal
from services.common.errors import DomainError, PermissionDenied, Unauthenticated
from vers.common.v1 import annotations_pb2

log = logging.getLogger(__name__)


class Access(Enum):
    PUBLIC = "public"
    ORG = "org"
    ADMIN = "admin"
    INTERNAL = "internal"


@cache
def method_access(full_method: str) -> Access | None:
    """Access rule of `/pkg.Service/Method` from its descriptor options; None for non-Vers services."""
    service_name, _, method_name = full_method.lstrip("/").partition("/")
    if not service_name.startswith("vers."):
        return None  # health checks and reflection
    try:
        method = descriptor_pool.Default().FindServiceByName(service_name).methods_by_name[method_name]
    except KeyError:
        return None
    options = method.GetOptions()
    if options.Extensions[annotations_pb2.public_method]:
        return Access.PUBLIC
    if options.Extensions[annotations_pb2.admin_method]:
        return Access.ADMIN
    if options.Extensions[annotations_pb2.internal_method]:
        return Access.INTERNAL
    return Access.ORG


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, resolver: TokenResolver) -> None:
        self._resolver = resolver

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = await continuation(handler_call_details)
        access = method_access(handler_call_details.method)
        if handler is None or access is None:
            return handler
        return _wrap(handler, self, access, handler_call_details.method)

    async def authenticate(self, context: grpc.aio.ServicerContext, access: Access) -> Principal | None:
        if access is Access.PUBLIC:
            return None
        token = bearer_token(context.invocation_metadata())
        if not token:
            raise Unauthenticated("missing API key: send the header 'Authorization: Bearer <key>'")
        principal = await self._resolver.resolve(token)
        if access is Access.ADMIN and not principal.is_admin:
            raise PermissionDenied("this call needs the platform administrator's key (admin.key in VERS_DATA_DIR)")
        if access is Access.INTERNAL and not principal.is_service:
            raise PermissionDenied("this call is made only between the platform's own services")
        return principal


# The trailer that carries a google.rpc.Status with an error's details (grpc_status.rpc_status reads it).
STATUS_DETAILS_KEY = "grpc-status-details-bin"


def _rich_status(error: DomainError) -> tuple[tuple[str, bytes], ...]:
    """The trailer with `error.details`, or none when it has no details."""
    if not error.details:
        return ()
    packed = []
    for detail in error.details:
        wrapper = any_pb2.Any()
        wrapper.Pack(detail)
        packed.append(wrapper)
    status = status_pb2.Status(code=error.code.value[0], message=error.message, details=packed)
    return tuple(rpc_status.to_status(status).trailing_metadata)


def _peer_details(error: grpc.aio.AioRpcError) -> tuple[tuple[str, bytes], ...]:
    return tuple((key, value) for key, value in error.trailing_metadata() or () if key == STATUS_DETAILS_KEY)


async def _abort(context: grpc.aio.ServicerContext, error: BaseException, method: str) -> None:
    if isinstance(error, DomainError):
        await context.abort(error.code, error.message, _rich_status(error))
    if isinstance(error, grpc.aio.AioRpcError):
        # A peer service's answer passes through as it was: NOT_FOUND stays NOT_FOUND, its details stay.
        await context.abort(error.code(), error.details() or error.code().name, _peer_details(error))
    if isinstance(error, NotImplementedError):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented yet")
    log.exception("unexpected error in %s", method, exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}; the server log has the details")


def _wrap(handler: grpc.RpcMethodHandler, interceptor: ServiceInterceptor, access: Access, method: str):  # type: ignore[no-untyped-def]
    async def enter(context: grpc.aio.ServicerContext) -> Any:
        return set_principal(await interceptor.authenticate(context, access))

    if handler.unary_unary:

        async def unary_unary(request, context):  # type: ignore[no-untyped-def]
            try:
                token = await enter(context)
                try:
                    answer = handler.unary_unary(request, context)
                    return await answer if inspect.isawaitable(answer) else answer
                finally:
                    reset_principal(token)
            except grpc.aio.AbortError:
                raise
            except Exception as error:
                await _abort(context, error, method)

        return grpc.unary_unary_rpc_method_handler(unary_unary, handler.request_deserializer, handler.response_serializer)

    def answers_stream(call):  # type: ignore[no-untyped-def]
        async def streaming(request_or_iterator, context):  # type: ignore[no-untyped-def]
            try:
                # No reset afterwards: the call runs in a task of its own, whose context ends with it,
                # and a stream the client abandons is closed from another context, where a reset fails.
                await enter(context)
                async for response in call(request_or_iterator, context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as error:
                await _abort(context, error, method)

        return streaming

    if handler.stream_stream:
        return grpc.stream_stream_rpc_method_handler(
            answers_stream(handler.stream_stream), handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            answers_stream(handler.unary_stream), handler.request_deserializer, handler.response_serializer
        )
    if handler.stream_unary:

        async def stream_unary(request_iterator, context):  # type: ignore[no-untyped-def]
            try:
                await enter(context)  # no reset: as for the streams above
                return await handler.stream_unary(request_iterator, context)
            except grpc.aio.AbortError:
                raise
            except Exception as error:
                await _abort(context, error, method)

        return grpc.stream_unary_rpc_method_handler(stream_unary, handler.request_deserializer, handler.response_serializer)
    raise TypeError(f"{method}: unknown kind of method")

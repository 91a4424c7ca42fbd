"""The one place that speaks gRPC status codes: authentication, authorization and error mapping."""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import Token
from enum import Enum
from functools import cache
from typing import Any, TypeAlias

import grpc
from google.protobuf import any_pb2, descriptor_pool
from google.rpc import status_pb2
from grpc_status import rpc_status

from services.common.auth import PLATFORM_ITSELF, Principal, TokenResolver, bearer_token, reset_principal, set_principal
from services.common.errors import DomainError, PermissionDenied, Unauthenticated
from vers.common.v1 import annotations_pb2

log = logging.getLogger(__name__)

# Handlers and contexts of any method, whatever its messages.
AioContext: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


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

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        access = method_access(handler_call_details.method)
        if handler is None or access is None:
            return handler
        return _wrap(handler, self, access, handler_call_details.method)

    async def authenticate(self, context: AioContext, access: Access) -> Principal | None:
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
        if principal.org_id == PLATFORM_ITSELF and access is not Access.INTERNAL:
            raise PermissionDenied("the platform's own credential acts for no organization: it makes only calls between services")
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


def _peer_details(error: grpc.aio.AioRpcError) -> tuple[tuple[str, str | bytes], ...]:
    return tuple((key, value) for key, value in error.trailing_metadata() or () if key == STATUS_DETAILS_KEY)


async def _abort(context: AioContext, error: BaseException, method: str) -> None:
    if isinstance(error, DomainError):
        await context.abort(error.code, error.message, _rich_status(error))
    if isinstance(error, grpc.aio.AioRpcError):
        # A peer service's answer passes through as it was: NOT_FOUND stays NOT_FOUND, its details stay.
        await context.abort(error.code(), error.details() or error.code().name, _peer_details(error))
    if isinstance(error, NotImplementedError):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented yet")
    log.exception("unexpected error in %s", method, exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}; the server log has the details")


def _wrap(handler: Handler, interceptor: ServiceInterceptor, access: Access, method: str) -> Handler:
    """The handler with authentication and error mapping around its behaviour. grpc's stubs type a handler's
    behaviours as the sync server calls them; under grpc.aio they take an aio context and async iterators,
    hence the ignores where they are called."""

    async def enter(context: AioContext) -> Token[Principal | None]:
        return set_principal(await interceptor.authenticate(context, access))

    if (unary := handler.unary_unary) is not None:

        async def unary_unary(request: Any, context: AioContext) -> Any:
            try:
                token = await enter(context)
                try:
                    answer = unary(request, context)  # type: ignore[arg-type]
                    return await answer if inspect.isawaitable(answer) else answer
                finally:
                    reset_principal(token)
            except grpc.aio.AbortError:
                raise
            except Exception as error:
                await _abort(context, error, method)

        return grpc.unary_unary_rpc_method_handler(unary_unary, handler.request_deserializer, handler.response_serializer)

    def answers_stream(call: Callable[[Any, AioContext], AsyncIterator[Any]]) -> Callable[[Any, AioContext], AsyncIterator[Any]]:
        async def streaming(request_or_iterator: Any, context: AioContext) -> AsyncIterator[Any]:
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
        streams = answers_stream(handler.stream_stream)  # type: ignore[arg-type]
        return grpc.stream_stream_rpc_method_handler(streams, handler.request_deserializer, handler.response_serializer)
    if handler.unary_stream:
        streams = answers_stream(handler.unary_stream)  # type: ignore[arg-type]
        return grpc.unary_stream_rpc_method_handler(streams, handler.request_deserializer, handler.response_serializer)
    if (client_streams := handler.stream_unary) is not None:

        async def stream_unary(request_iterator: AsyncIterator[Any], context: AioContext) -> Any:
            try:
                await enter(context)  # no reset: as for the streams above
                return await client_streams(request_iterator, context)  # type: ignore[arg-type]
            except grpc.aio.AbortError:
                raise
            except Exception as error:
                await _abort(context, error, method)

        return grpc.stream_unary_rpc_method_handler(stream_unary, handler.request_deserializer, handler.response_serializer)
    raise TypeError(f"{method}: unknown kind of method")

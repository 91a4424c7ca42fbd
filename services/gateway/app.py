"""The REST gateway: holds no business logic; every route comes from a descriptor's google.api.http option."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import grpc
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp
from starlette.websockets import WebSocket

from services.common.peers import max_message_bytes, open_channel
from services.common.settings import SERVICES, Settings
from services.gateway.bindings import Binding, all_bindings
from services.gateway.domains import DomainRouter
from services.gateway.errors import STATUS_CODE_NAMES, error_response, rpc_error_response
from services.gateway.http_streams import is_http_stream, serve_client_stream, serve_server_stream
from services.gateway.limits import AUTHENTICATED, Guard, GuardMiddleware, call_timeout, checks_token
from services.gateway.openapi import openapi_document
from services.gateway.streams import StreamBridge
from services.gateway.transcode import BadRequest, build_request, response_json

log = logging.getLogger(__name__)
# uvicorn's WebSocket implementation: wsproto, because websockets-sansio logs an error after every refused
# handshake (Kludex/uvicorn#3138) and the legacy websockets one is deprecated.
UVICORN_WS = "wsproto"
# uvicorn's HTTP/1.1 parser: h11, named so that an installed httptools is not chosen instead. uvicorn's httptools
# protocol keeps every header and URL byte a client sends before the request starts, with no limit (a client
# without a key could fill the gateway's memory); with h11 uvicorn refuses a request head past 16 KiB.
UVICORN_HTTP = "h11"
# Forwarded from HTTP to gRPC so every service checks the caller itself.
FORWARDED_HEADERS = ("authorization", "x-request-id")


def forwarded(connection: HTTPConnection) -> tuple[tuple[str, str], ...]:
    return tuple((name, connection.headers[name]) for name in FORWARDED_HEADERS if name in connection.headers)


# Where a list answered as a bare JSON array says how to ask for the next page.
NEXT_PAGE_HEADER = "X-Next-Page-Token"


class PayloadTooLarge(Exception):
    pass


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


class Gateway:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.bindings = all_bindings()
        self.channels: dict[str, grpc.aio.Channel] = {}
        # Public methods answer whatever token comes with them: a refused one is not answered from memory there.
        public = frozenset(b.path for b in self.bindings if "{" not in b.path and not checks_token(b))
        self.guard = Guard(settings, public_paths=public)

    @asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        self.channels = {name: open_channel(self.settings, self.settings.addr(name)) for name in SERVICES}
        try:
            yield
        finally:
            for channel in self.channels.values():
                await channel.close()

    def endpoint(self, binding: Binding) -> Callable[[Request], Awaitable[Response]]:
        request_class = message_factory.GetMessageClass(binding.method.input_type)
        response_class = message_factory.GetMessageClass(binding.method.output_type)
        proves_token = checks_token(binding)

        http_stream = is_http_stream(binding)

        async def handle(request: Request) -> Response:
            if binding.streaming and not http_stream:
                return error_response(426, "FAILED_PRECONDITION", f"{binding.path} is a stream: open it as a WebSocket")
            if proves_token and not request.headers.get("authorization"):
                # before the request is read and checked: without a key, the answer is the same whatever it holds
                return error_response(401, "UNAUTHENTICATED", "this call needs an API key: send the header 'Authorization: Bearer <key>'")
            channel = self.channels[binding.backend]
            if binding.method.client_streaming:
                streamed = await serve_client_stream(
                    binding, channel, request, request_class, response_class, forwarded(request),
                    call_timeout(binding, request_class(), self.settings), response_json,
                )  # fmt: skip
                request.scope[AUTHENTICATED] = proves_token and streamed.status_code < 400
                return streamed
            try:
                body = await read_body(request, self.settings.http_max_body_bytes)
                message = build_request(binding, request_class(), request.path_params, request.query_params.multi_items(), body)
            except PayloadTooLarge:
                return self.too_large("request body is too large")
            except BadRequest as error:
                return error_response(400, "INVALID_ARGUMENT", str(error))
            if message.ByteSize() > max_message_bytes(self.settings):
                return self.too_large("request is too large once encoded for the service")
            if http_stream:
                timeout = call_timeout(binding, message, self.settings)
                streamed = await serve_server_stream(binding, channel, message, response_class, forwarded(request), timeout)
                request.scope[AUTHENTICATED] = proves_token and streamed.status_code < 400
                return streamed
            call = channel.unary_unary(
                binding.grpc_path,
                request_serializer=request_class.SerializeToString,
                response_deserializer=response_class.FromString,
            )
            try:
                answer = await call(message, metadata=forwarded(request), timeout=call_timeout(binding, message, self.settings))
            except grpc.aio.AioRpcError as error:
                return rpc_error_response(binding, error)
            request.scope[AUTHENTICATED] = proves_token
            if binding.success_code == 204:
                return Response(status_code=204)
            headers = {}
            if binding.response_body and (next_page_token := getattr(answer, "next_page_token", "")):
                # The body is the list itself (the documented shape): the next page's token rides in a header.
                headers[NEXT_PAGE_HEADER] = next_page_token
            return JSONResponse(response_json(binding, answer), status_code=binding.success_code, headers=headers)

        handle.__name__ = binding.method.name
        return handle

    def too_large(self, what: str) -> Response:
        limit = self.settings.http_max_body_bytes
        return error_response(413, "RESOURCE_EXHAUSTED", f"{what}: the limit is {limit} bytes (VERS_HTTP_MAX_BODY_BYTES)")

    def stream_endpoint(self, binding: Binding) -> Callable[[WebSocket], Awaitable[None]]:
        bridge_for = functools.partial(
            StreamBridge,
            binding,
            request_class=message_factory.GetMessageClass(binding.method.input_type),
            response_class=message_factory.GetMessageClass(binding.method.output_type),
        )

        async def handle(websocket: WebSocket) -> None:
            await bridge_for(self.channels[binding.backend])(websocket, forwarded(websocket))

        return handle

    async def healthz(self, _request: Request) -> Response:
        states = {}
        for name, channel in self.channels.items():
            try:
                answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
                states[name] = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
            except grpc.aio.AioRpcError as error:
                states[name] = error.code().name
        healthy = all(state == "SERVING" for state in states.values())
        return JSONResponse({"status": "ok" if healthy else "degraded", "services": states}, status_code=200 if healthy else 503)

    async def openapi(self, _request: Request) -> Response:
        return JSONResponse(openapi_document(self.bindings))


async def _http_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, HTTPException)
    code = STATUS_CODE_NAMES.get(error.status_code, "UNKNOWN")
    if error.status_code == 404:
        return error_response(404, code, f"no such endpoint: {request.method} {request.url.path}")
    if error.status_code == 405:
        return error_response(405, code, f"{request.method} is not allowed on {request.url.path}")
    return error_response(error.status_code, code, str(error.detail))


def create_app(settings: Settings) -> ASGIApp:
    """The API, behind its rate limits and the router that sends requests for domains (NAME.<VERS_DOMAIN_SUFFIX>)
    to their VMs (which have limits of their own)."""
    gateway = Gateway(settings)
    routes = [
        Route("/openapi.json", gateway.openapi, methods=["GET"]),
        Route("/healthz", gateway.healthz, methods=["GET"]),
        *(Route(b.path, gateway.endpoint(b), methods=[b.verb]) for b in gateway.bindings),
        *(WebSocketRoute(b.path, gateway.stream_endpoint(b)) for b in gateway.bindings if b.streaming and not is_http_stream(b)),
    ]
    api = Starlette(routes=routes, lifespan=gateway.lifespan, exception_handlers={HTTPException: _http_error})
    return DomainRouter(
        GuardMiddleware(api, gateway.guard), settings.domain_suffix, lambda: gateway.channels["orchestrator"], gateway.guard
    )

"""Domains on the gateway: a request whose Host is NAME.<VERS_DOMAIN_SUFFIX> never reaches the API; its bytes go
to the domain's VM port over one ProxyDomain stream, and the VM's answer comes back.

HTTP: the request is written as HTTP/1.1 (`Connection: close`, the body streamed as it arrives) and the
guest's response read with h11, streamed back as it comes: no body is ever held whole. WebSocket: the
handshake is made with the guest (wsproto, as the client), the client's socket accepted with the guest's
answer, then messages are relayed both ways. The Authorization header goes to the orchestrator as gRPC
metadata (a private domain needs its org's key) and never to the guest when it carries a Vers key.
Failures answer with the API's JSON error body, in a reverse proxy's statuses (502, 503).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import grpc
import h11
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)  # fmt: skip
from wsproto.utilities import ProtocolError

from services.common.names import normalize_host, normalize_suffix
from services.gateway.errors import HTTP_STATUS, error_response
from services.gateway.limits import Guard, client_address
from vers.orchestrator.v1 import orchestrator_pb2 as pb
from vers.orchestrator.v1 import orchestrator_pb2_grpc

log = logging.getLogger(__name__)

CHUNK = 1 << 16
# Not passed on: they describe one hop (RFC 9110 §7.6.1), or the gateway handles them itself (Expect).
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
    b"proxy-authorization", b"proxy-authenticate", b"expect",
})  # fmt: skip
# What a client could claim about where its request came from or went: the gateway says it itself.
FORWARDING = frozenset({b"host", b"forwarded", b"x-real-ip", b"x-forwarded-host", b"x-forwarded-proto"})
# Made by wsproto for the handshake with the guest.
HANDSHAKE = frozenset({b"host", b"sec-websocket-key", b"sec-websocket-version", b"sec-websocket-extensions", b"sec-websocket-protocol"})
# The server (uvicorn) adds its own to every answer: the guest's would make them twice.
GATEWAY_HEADERS = frozenset({b"date", b"server"})
# The platform's own credentials (API keys, service tokens): checked by the orchestrator, never shown to a guest.
VERS_TOKEN_PREFIXES = ("vers_", "vers-svc.")
# How a failure to reach a domain's VM reads over HTTP: as a reverse proxy says it, the VM being the upstream.
PROXY_STATUS = {**HTTP_STATUS, grpc.StatusCode.FAILED_PRECONDITION: 503, grpc.StatusCode.UNAVAILABLE: 502}
CLOSE_ERROR = 1011
CLOSE_TOO_BIG = 1009
# A WebSocket message from a guest is put together before it is passed on: no larger than uvicorn takes.
MAX_MESSAGE_BYTES = 1024 * 1024


def _rpc_error(error: grpc.aio.AioRpcError) -> JSONResponse:
    return error_response(PROXY_STATUS.get(error.code(), 500), error.code().name, error.details() or error.code().name)


def _bad_gateway(message: str) -> JSONResponse:
    return error_response(502, "UNAVAILABLE", message)


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return bytes(value)
    return None


def _is_vers_key(value: bytes) -> bool:
    scheme, _, token = value.decode("latin-1").strip().partition(" ")
    return scheme.lower() == "bearer" and token.strip().startswith(VERS_TOKEN_PREFIXES)


def _target(scope: Scope) -> bytes:
    """The request target in origin form (a path and query): an absolute-form target names a host of its
    own, which the guest must never be told instead of the domain's."""
    path = scope.get("raw_path") or scope["path"].encode()
    if not path.startswith(b"/"):
        path = urlsplit(path).path or b"/"
    return path + (b"?" + scope["query_string"] if scope.get("query_string") else b"")


def _metadata(scope: Scope) -> tuple[tuple[str, str], ...]:
    """What the orchestrator checks the caller by, as the API's calls carry it."""
    found = []
    for name in (b"authorization", b"x-request-id"):
        value = _header(scope, name)
        if value is not None and value.isascii() and value.strip():
            found.append((name.decode(), value.decode().strip()))
    return tuple(found)


def _guest_headers(scope: Scope, drop: frozenset[bytes]) -> list[tuple[bytes, bytes]]:
    """The client's headers for the guest: without hop-by-hop ones (and those its Connection header names),
    without a Vers key; with X-Forwarded-For and X-Forwarded-Proto, as a reverse proxy adds them."""
    skip = HOP_BY_HOP | _connection_tokens(scope["headers"]) | drop | FORWARDING
    headers = []
    forwarded_for = None
    for key, value in scope["headers"]:
        name = key.lower()
        if name in skip or (name == b"authorization" and _is_vers_key(value)):
            continue
        if name == b"x-forwarded-for":
            forwarded_for = value if forwarded_for is None else forwarded_for + b", " + value
            continue
        headers.append((name, value))
    # Said by the gateway, never taken from the client: the one host it routed by, and the scheme.
    host = _header(scope, b"host") or b""
    if b"host" not in drop:
        headers.insert(0, (b"host", host))
    client = scope.get("client")
    if client:
        address = client[0].encode()
        headers.append((b"x-forwarded-for", forwarded_for + b", " + address if forwarded_for else address))
    headers.append((b"x-forwarded-host", host))
    headers.append((b"x-forwarded-proto", b"https" if scope.get("scheme") in ("https", "wss") else b"http"))
    return headers


def _answer_headers(headers: list[tuple[bytes, bytes]], drop: frozenset[bytes] = frozenset()) -> list[tuple[bytes, bytes]]:
    skip = HOP_BY_HOP | _connection_tokens(headers) | drop
    return [(name, value) for name, value in headers if name.lower() not in skip]


def _connection_tokens(headers: list[tuple[bytes, bytes]]) -> set[bytes]:
    """Headers a Connection header names: hop-by-hop too."""
    return {
        token.strip().lower() for name, value in headers if name.lower() == b"connection" for token in value.split(b",") if token.strip()
    }


class GuestConnection:
    """One ProxyDomain call: the bytes of one connection to the domain's VM port, both ways. After the first
    answer (empty: open), an empty answer says the guest closed the connection; the call's status follows
    once this side has ended too (services/orchestrator/domains.py says why)."""

    def __init__(self, call: grpc.aio.StreamStreamCall[pb.ProxyDomainRequest, pb.ProxyDomainResponse]) -> None:
        self.call = call
        self.closed = False

    @classmethod
    async def open(cls, channel: grpc.aio.Channel, host: str, metadata: tuple[tuple[str, str], ...], head: bytes) -> GuestConnection:
        """Open once the orchestrator has said yes (the empty first answer), with the request's head in the first
        message: nothing of the body is read before then, so an unknown domain or a missing key is answered
        before any body is sent."""
        call = orchestrator_pb2_grpc.OrchestratorEdgeServiceStub(channel).ProxyDomain(metadata=metadata)
        try:
            await call.write(pb.ProxyDomainRequest(host=host, data=head))
            acknowledgement = await call.read()
        except BaseException:
            call.cancel()
            raise
        if acknowledgement is grpc.aio.EOF:
            call.cancel()
            raise ConnectionError("the orchestrator ended the connection to the domain before it was open")
        return cls(call)

    async def send(self, data: bytes) -> None:
        for start in range(0, len(data), CHUNK):
            await self.call.write(pb.ProxyDomainRequest(data=data[start : start + CHUNK]))

    async def receive(self) -> bytes:
        """The guest's next bytes; b"" once it has closed the connection. The call's error, if it ended with one
        (UNAVAILABLE when nothing answered on the port), is raised."""
        if self.closed:
            return b""
        answer = await self.call.read()
        if isinstance(answer, pb.ProxyDomainResponse) and answer.data:
            return bytes(answer.data)
        self.closed = True
        if answer is not grpc.aio.EOF:
            with contextlib.suppress(asyncio.InvalidStateError):
                await self.call.done_writing()
            await self.call.read()  # the status: raises the call's error, if any
        return b""

    def close(self) -> None:
        self.call.cancel()


class DomainRouter:
    """ASGI middleware: requests for NAME.<suffix> go to the domain's VM; every other request (and the
    lifespan) to the API's app."""

    def __init__(self, app: ASGIApp, suffix: str, channel: Callable[[], grpc.aio.Channel], guard: Guard | None = None) -> None:
        self.app = app
        self.suffix = normalize_suffix(suffix)
        self.channel = channel
        self.guard = guard

    def domain_host(self, scope: Scope) -> str | None:
        raw = _header(scope, b"host")
        if raw is None or not self.suffix:
            return None
        host = raw.decode("latin-1")
        return host if normalize_host(host).endswith(f".{self.suffix}") else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        host = self.domain_host(scope) if scope["type"] in ("http", "websocket") else None
        if host is None:
            await self.app(scope, receive, send)
            return
        refusal = self.guard.check_address(client_address(scope)) if self.guard is not None else None
        if refusal is not None:
            if scope["type"] == "http":
                await refusal.response()(scope, receive, send)
            else:
                await WebSocket(scope, receive, send).send_denial_response(refusal.response())
        elif scope["type"] == "http":
            await self._http(scope, receive, send, host)
        else:
            await self._websocket(scope, receive, send, host)

    async def _http(self, scope: Scope, receive: Receive, send: Send, host: str) -> None:
        exchange = HttpExchange(scope, receive, send)
        try:
            head = exchange.head()
        except h11.LocalProtocolError as error:
            await error_response(400, "INVALID_ARGUMENT", f"the request cannot be passed on: {error}")(scope, receive, send)
            return
        try:
            guest = await GuestConnection.open(self.channel(), host, _metadata(scope), head)
        except grpc.aio.AioRpcError as error:
            await _rpc_error(error)(scope, receive, send)
            return
        except ConnectionError as error:
            await _bad_gateway(str(error))(scope, receive, send)
            return
        try:
            await exchange.run(guest)
        finally:
            guest.close()

    async def _websocket(self, scope: Scope, receive: Receive, send: Send, host: str) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        exchange = WebSocketExchange(scope, receive, send, host)
        try:
            handshake = exchange.handshake_request()
        except (UnicodeError, h11.LocalProtocolError, ProtocolError) as error:
            await _deny(scope, send, error_response(400, "INVALID_ARGUMENT", f"the request cannot be passed on: {error}"))
            return
        try:
            guest = await GuestConnection.open(self.channel(), host, _metadata(scope), handshake)
        except grpc.aio.AioRpcError as error:
            await _deny(scope, send, _rpc_error(error))
            return
        except ConnectionError as error:
            await _deny(scope, send, _bad_gateway(str(error)))
            return
        try:
            await exchange.run(guest)
        finally:
            guest.close()


async def _deny(scope: Scope, send: Send, response: JSONResponse) -> None:
    """Refuse a WebSocket with an HTTP answer (the ASGI denial response), as the API's streams are refused."""
    if "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": 1008})
        return
    await send({"type": "websocket.http.response.start", "status": response.status_code, "headers": response.raw_headers})
    await send({"type": "websocket.http.response.body", "body": response.body})


class HttpExchange:
    """One HTTP request to the guest and its response, both streamed."""

    def __init__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scope = scope
        self.receive = receive
        self.send = send
        self.guest: GuestConnection
        self.connection = h11.Connection(h11.CLIENT)
        self.started = False

    def head(self) -> bytes:
        """The request line and headers, as the guest gets them."""
        return self.connection.send(self._request()) or b""

    def _request(self) -> h11.Request:
        headers = _guest_headers(self.scope, frozenset({b"content-length"}))
        length = _header(self.scope, b"content-length")
        if length is not None:
            headers.append((b"content-length", length))
        elif _header(self.scope, b"transfer-encoding") is not None:
            headers.append((b"transfer-encoding", b"chunked"))  # the server took the client's chunks apart
        headers.append((b"connection", b"close"))
        return h11.Request(method=self.scope["method"], target=_target(self.scope), headers=headers)

    async def run(self, guest: GuestConnection) -> None:
        self.guest = guest
        upload = asyncio.ensure_future(self._upload())
        download = asyncio.ensure_future(self._download())
        try:
            # The upload ends only when the client has gone: then the answer has nobody to go to.
            done, _ = await asyncio.wait({upload, download}, return_when=asyncio.FIRST_COMPLETED)
            if download in done:
                download.result()
        except ConnectionAbortedError as error:
            log.warning("%s %s: %s", self.scope["method"], _target(self.scope).decode("latin-1"), error)
        except OSError:
            pass  # the client went away while the answer was being sent
        finally:
            for task in (upload, download):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _upload(self) -> None:
        """The request's body to the guest as it arrives (its head went with the first message); then wait for
        the client to leave."""
        try:
            more = True
            while more:
                message = await self.receive()
                if message["type"] == "http.disconnect":
                    return
                more = message.get("more_body", False)
                if message.get("body"):
                    await self.guest.send(self.connection.send(h11.Data(data=message["body"])) or b"")
            await self.guest.send(self.connection.send(h11.EndOfMessage()) or b"")
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, h11.LocalProtocolError) as error:
            log.debug("the request body stopped going to the guest: %s", error)  # the download says why
        while (await self.receive())["type"] != "http.disconnect":
            pass

    async def _download(self) -> None:
        while True:
            try:
                event = self.connection.next_event()
                if event is h11.NEED_DATA:
                    self.connection.receive_data(await self.guest.receive())
                    continue
            except grpc.aio.AioRpcError as error:
                await self._fail(_rpc_error(error))
                return
            except h11.RemoteProtocolError as error:
                await self._fail(_bad_gateway(f"the VM's answer is not HTTP/1.1 the gateway can read ({error})"))
                return
            if isinstance(event, h11.Response):
                headers = _answer_headers(list(event.headers), GATEWAY_HEADERS)
                await self.send({"type": "http.response.start", "status": event.status_code, "headers": headers})
                self.started = True
            elif isinstance(event, h11.Data):
                await self.send({"type": "http.response.body", "body": bytes(event.data), "more_body": True})
            elif isinstance(event, h11.EndOfMessage):
                await self.send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            elif isinstance(event, h11.ConnectionClosed):
                await self._fail(_bad_gateway("the VM closed the connection before it answered"))
                return
            # InformationalResponse (100 Continue and the like): for this hop only

    async def _fail(self, response: JSONResponse) -> None:
        if self.started:
            # Headers are out: only cutting the connection short tells the client the body is not whole.
            raise ConnectionAbortedError(f"the VM's answer broke off: {bytes(response.body).decode()}")
        await response(self.scope, self.receive, self.send)


class WebSocketExchange:
    """The handshake with the guest, the client's socket accepted (or refused) with the guest's answer, then
    messages both ways until either side closes."""

    def __init__(self, scope: Scope, receive: Receive, send: Send, host: str) -> None:
        self.scope = scope
        self.receive = receive
        self.send = send
        self.guest: GuestConnection
        self.host = host
        self.ws = WSConnection(ConnectionType.CLIENT)

    def handshake_request(self) -> bytes:
        """The upgrade request the guest gets: the client's, with a key and offers of the gateway's own."""
        return self.ws.send(
            Request(
                host=self.host, target=_target(self.scope).decode("ascii"), subprotocols=list(self.scope.get("subprotocols") or []),
                extra_headers=_guest_headers(self.scope, HANDSHAKE),
            )
        )  # fmt: skip

    async def run(self, guest: GuestConnection) -> None:
        self.guest = guest
        try:
            accepted = await self._handshake()
        except grpc.aio.AioRpcError as error:
            await _deny(self.scope, self.send, _rpc_error(error))
            return
        except ProtocolError as error:
            await _deny(self.scope, self.send, _bad_gateway(f"the VM's answer to the WebSocket handshake is not valid: {error}"))
            return
        if accepted:
            await self._relay()

    async def _handshake(self) -> bool:
        """The guest's answer: accepted (the client's socket is accepted alike), or its refusal passed on."""
        while True:
            data = await self.guest.receive()
            self.ws.receive_data(data or None)
            for event in self.ws.events():
                if isinstance(event, AcceptConnection):
                    headers = _answer_headers(list(event.extra_headers), GATEWAY_HEADERS | {b"content-length"})
                    await self.send({"type": "websocket.accept", "subprotocol": event.subprotocol, "headers": headers})
                    return True
                if isinstance(event, RejectConnection):
                    await self._pass_refusal(event)
                    return False
            if not data:
                await _deny(self.scope, self.send, _bad_gateway("the VM closed the connection before it answered the WebSocket handshake"))
                return False

    async def _pass_refusal(self, refusal: RejectConnection) -> None:
        headers = _answer_headers(list(refusal.headers), GATEWAY_HEADERS)
        await self.send({"type": "websocket.http.response.start", "status": refusal.status_code, "headers": headers})
        finished = not refusal.has_body
        while not finished:
            for event in self.ws.events():
                if isinstance(event, RejectData):
                    finished = event.body_finished
                    await self.send({"type": "websocket.http.response.body", "body": bytes(event.data), "more_body": not finished})
                    if finished:
                        return
            data = await self.guest.receive()
            if not data:
                break
            self.ws.receive_data(data)
        if not finished:
            await self.send({"type": "websocket.http.response.body", "body": b"", "more_body": False})

    async def _relay(self) -> None:
        to_guest = asyncio.ensure_future(self._client_to_guest())
        to_client = asyncio.ensure_future(self._guest_to_client())
        try:
            done, _ = await asyncio.wait({to_guest, to_client}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        except grpc.aio.AioRpcError as error:
            await self._close(CLOSE_ERROR, f"{error.code().name}: {error.details()}")
        except (OSError, asyncio.InvalidStateError):
            pass  # the client or the call is gone: nothing to tell
        finally:
            for task in (to_guest, to_client):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _close(self, code: int, reason: str) -> None:
        with contextlib.suppress(Exception):
            await self.send({"type": "websocket.close", "code": code, "reason": reason.encode()[:120].decode(errors="ignore")})

    async def _client_to_guest(self) -> None:
        while True:
            message = await self.receive()
            if message["type"] == "websocket.disconnect":
                if self.ws.state is ConnectionState.OPEN:
                    with contextlib.suppress(Exception):
                        await self.guest.send(self.ws.send(CloseConnection(code=message.get("code") or 1000)))
                return
            if message["type"] != "websocket.receive" or self.ws.state is not ConnectionState.OPEN:
                continue
            if message.get("bytes") is not None:
                await self.guest.send(self.ws.send(BytesMessage(data=message["bytes"])))
            else:
                await self.guest.send(self.ws.send(TextMessage(data=message.get("text") or "")))

    async def _guest_to_client(self) -> None:
        parts: list[Any] = []
        buffered = 0
        while True:
            data = await self.guest.receive()
            self.ws.receive_data(data or None)
            for event in self.ws.events():
                if isinstance(event, TextMessage | BytesMessage):
                    parts.append(event.data)
                    buffered += len(event.data)
                    if buffered > MAX_MESSAGE_BYTES:
                        await self._close(CLOSE_TOO_BIG, f"the VM sent a message over {MAX_MESSAGE_BYTES} bytes")
                        return
                    if event.message_finished:
                        key = "text" if isinstance(event, TextMessage) else "bytes"
                        joined = "".join(parts) if key == "text" else b"".join(bytes(part) for part in parts)
                        await self.send({"type": "websocket.send", key: joined})
                        parts, buffered = [], 0
                elif isinstance(event, Ping):
                    await self.guest.send(self.ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    if self.ws.state is ConnectionState.REMOTE_CLOSING:
                        with contextlib.suppress(Exception):
                            await self.guest.send(self.ws.send(event.response()))
                    if event.code == 1006:  # the connection ended without a close frame
                        await self._close(CLOSE_ERROR, "the VM closed the connection")
                    else:
                        await self._close(event.code, event.reason or "")
                    return

"""Streaming RPCs as WebSockets, from the same bindings as the unary routes.

The URL (path variables, query string) makes the first request message. Then each binary frame from
the client is a request whose one `bytes` field holds the frame, each text frame a request in JSON
(e.g. `{"rows": 40, "cols": 120}`); each answer goes back as a binary frame when the response is one
`bytes` field, as JSON text otherwise. The server's first answer acknowledges the stream: errors
before it are refused at the handshake with the usual HTTP status and JSON error body; errors after it
close the socket with code 1011 and the message as the reason. A stream the server ends closes with 1000.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Mapping
from typing import TypeAlias

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from starlette.websockets import WebSocket, WebSocketDisconnect

from services.gateway.bindings import Binding
from services.gateway.errors import error_response, rpc_error_response
from services.gateway.limits import AUTHENTICATED, checks_token
from services.gateway.transcode import BadRequest, build_request, descriptor_of, load_json, parse_json, to_json

CLOSE_NORMAL = 1000
CLOSE_INVALID = 1007
CLOSE_ERROR = 1011
_MAX_REASON = 120  # a close reason must fit 123 bytes

Call: TypeAlias = "grpc.aio.StreamStreamCall[Message, Message]"


def bytes_field(descriptor: Descriptor) -> FieldDescriptor | None:
    """The message's only bytes field, if it has exactly one."""
    found = [f for f in descriptor.fields if f.type == FieldDescriptor.TYPE_BYTES and not f.is_repeated]
    return found[0] if len(found) == 1 else None


def _reason(text: str) -> str:
    encoded = text.encode()[:_MAX_REASON]
    return encoded.decode(errors="ignore")


class StreamBridge:
    """One WebSocket relayed to one streaming call."""

    def __init__(
        self,
        binding: Binding,
        channel: grpc.aio.Channel,
        request_class: type[Message],
        response_class: type[Message],
    ) -> None:
        self.binding = binding
        self.channel = channel
        self.request_class = request_class
        self.response_class = response_class
        self.input_field = bytes_field(descriptor_of(request_class))
        self.output_field = bytes_field(descriptor_of(response_class))

    def _from_frame(self, frame: Mapping[str, object]) -> Message:
        if frame.get("bytes") is not None:
            if self.input_field is None:
                raise BadRequest("this stream takes JSON text frames, not binary ones")
            return self.request_class(**{self.input_field.name: frame["bytes"]})
        return parse_json(load_json(str(frame.get("text")), "a text frame"), self.request_class(), "text frame")

    async def _send(self, websocket: WebSocket, answer: Message) -> None:
        if self.output_field is not None and answer.ListFields() == [(self.output_field, getattr(answer, self.output_field.name))]:
            await websocket.send_bytes(getattr(answer, self.output_field.name))
        elif answer.ListFields():
            await websocket.send_text(json.dumps(to_json(answer)))

    async def _pump_client(self, websocket: WebSocket, call: Call) -> None:
        while True:
            frame = await websocket.receive()
            if frame["type"] == "websocket.disconnect":
                break
            await call.write(self._from_frame(frame))
        await call.done_writing()

    async def _pump_server(self, websocket: WebSocket, call: Call) -> None:
        while isinstance(answer := await call.read(), Message):  # until grpc.aio.EOF
            await self._send(websocket, answer)

    async def __call__(self, websocket: WebSocket, metadata: tuple[tuple[str, str], ...]) -> None:
        try:
            first = build_request(self.binding, self.request_class(), websocket.path_params, websocket.query_params.multi_items(), b"")
        except BadRequest as error:
            await websocket.send_denial_response(error_response(400, "INVALID_ARGUMENT", str(error)))
            return
        call = self.channel.stream_stream(
            self.binding.grpc_path,
            request_serializer=self.request_class.SerializeToString,
            response_deserializer=self.response_class.FromString,
        )(metadata=metadata)
        try:
            await call.write(first)
            acknowledgement = await call.read()
        except grpc.aio.AioRpcError as error:
            await websocket.send_denial_response(rpc_error_response(self.binding, error))
            return
        websocket.scope[AUTHENTICATED] = checks_token(self.binding)
        await websocket.accept()
        if not isinstance(acknowledgement, Message):  # grpc.aio.EOF: the server ended the stream at once
            await websocket.close(CLOSE_NORMAL)
            return
        await self._send(websocket, acknowledgement)
        await self._relay(websocket, call)

    async def _relay(self, websocket: WebSocket, call: Call) -> None:
        client = asyncio.ensure_future(self._pump_client(websocket, call))
        server = asyncio.ensure_future(self._pump_server(websocket, call))
        code, reason = CLOSE_NORMAL, ""
        try:
            done, _ = await asyncio.wait({client, server}, return_when=asyncio.FIRST_COMPLETED)
            if client in done and isinstance(client.exception(), grpc.aio.AioRpcError) and not server.done():
                # A write that fails because the server just ended the call reports INTERNAL, not how the
                # call ended: the server's side says that, and it is about to.
                done = (await asyncio.wait({server}, timeout=5))[0] or {client}
            for task in done:
                task.result()  # a client that left ends the call; the server ending ends the socket
        except BadRequest as error:
            code, reason = CLOSE_INVALID, str(error)
        except grpc.aio.AioRpcError as error:
            code, reason = CLOSE_ERROR, f"{error.code().name}: {error.details()}"
        except WebSocketDisconnect:
            pass
        finally:
            call.cancel()
            for task in (client, server):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        with contextlib.suppress(RuntimeError, WebSocketDisconnect):
            await websocket.close(code, _reason(reason))

"""`vers tunnel`: TCP connections to a port inside a VM, as `ssh -L` makes them, each carried by its own
WebSocket on the gateway (`GET /api/v1/vm/{vm_id}/tunnel?port=N`, binary frames both ways).

Every buffer on the way is bounded (a read of at most CHUNK, the WebSocket's write buffer and receive
queue), and each side is read only as fast as the other takes the bytes, so a fast sender or a slow
reader never fills memory, however many connections run at once. The WebSocket has no half-close: the
end of either side ends the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as connect_async
from websockets.sync.client import ClientConnection as SyncConnection
from websockets.sync.client import connect as connect_sync

from services.cli.console import refusal, websocket_url
from services.client import ApiError, Unreachable, seg, unreachable

CHUNK = 1 << 16
CLOSE_NORMAL = 1000
# Frames are what the server read at once (up to 64 KiB); pings are slow to come back from a loaded gateway.
LIMITS: dict[str, Any] = {
    "max_size": 1 << 20,
    "max_queue": 4,
    "compression": None,
    "open_timeout": 60,
    "ping_interval": 30,
    "ping_timeout": 120,
    "close_timeout": 5,
}


def tunnel_url(base_url: str, vm_id: str, port: int) -> str:
    return websocket_url(base_url, f"/api/v1/vm/{seg(vm_id)}/tunnel?port={port}")


def _headers(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"}


def why_closed(code: int | None, reason: str | None) -> str:
    """'' for a connection the guest (or we) ended normally, else what to tell the user."""
    if code in (CLOSE_NORMAL, None):
        return ""
    if code == 1006:
        return "the connection to the gateway was lost"
    return reason or f"the tunnel closed with WebSocket code {code}"


async def open_tunnel(base_url: str, api_key: str, vm_id: str, port: int) -> ClientConnection:
    try:
        url = tunnel_url(base_url, vm_id, port)
        return await connect_async(url, additional_headers=_headers(api_key), write_limit=1 << 18, **LIMITS)
    except websockets.InvalidStatus as error:
        raise refusal(error, "the tunnel") from None
    except (OSError, TimeoutError, websockets.InvalidHandshake) as error:
        raise Unreachable(unreachable(base_url, error)) from None


async def relay(socket: ClientConnection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str:
    """Carry one local connection over its WebSocket until either side ends; answers why_closed()."""

    async def upstream() -> None:
        with contextlib.suppress(ConnectionError, websockets.ConnectionClosed):
            while chunk := await reader.read(CHUNK):
                await socket.send(chunk)

    async def downstream() -> None:
        with contextlib.suppress(ConnectionError, websockets.ConnectionClosed):
            async for message in socket:
                if isinstance(message, bytes):
                    writer.write(message)
                    await writer.drain()

    tasks = {asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())}
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await close(socket)
    return why_closed(socket.close_code, socket.close_reason)


async def close(socket: ClientConnection) -> None:
    """The closing handshake, or the TCP connection dropped when a gateway that stopped reading holds it up
    (soon when the tunnel is stopping: Ctrl-C should not wait on a stuck connection)."""
    task = asyncio.current_task()
    try:
        async with asyncio.timeout(1 if task and task.cancelling() else LIMITS["close_timeout"]):
            await socket.close()
    except TimeoutError:
        socket.transport.abort()


async def serve(
    base_url: str,
    api_key: str,
    vm_id: str,
    port: int,
    local_port: int,
    ready: Callable[[int], None],
    failed: Callable[[str, str], None],
) -> None:
    """Listen on 127.0.0.1:local_port (0: a free one, given to `ready`) until SIGINT or SIGTERM, and carry
    each accepted connection to the VM's port. A connection that fails is reported to `failed` (peer, why)."""
    connections: set[asyncio.Task[None]] = set()

    async def carry(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        connections.add(task)
        peer = ":".join(str(part) for part in (writer.get_extra_info("peername") or ("?",))[:2])
        try:
            socket = await open_tunnel(base_url, api_key, vm_id, port)
            if why := await relay(socket, reader, writer):
                failed(peer, why)
        except ApiError as error:
            failed(peer, f"{error.message} (HTTP {error.status})")
        except Exception as error:  # one connection's trouble never ends the others
            failed(peer, str(error) or type(error).__name__)
        except asyncio.CancelledError:
            pass  # stopping: Python 3.11's stream server logs a handler task that ends cancelled
        finally:
            writer.close()
            connections.discard(task)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    server = await asyncio.start_server(carry, "127.0.0.1", local_port, limit=CHUNK)
    try:
        ready(server.sockets[0].getsockname()[1])
        await stop.wait()
    finally:
        server.close()
        for task in list(connections):
            task.cancel()
        await asyncio.gather(*connections, return_exceptions=True)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def open_stdio(base_url: str, api_key: str, vm_id: str, port: int) -> SyncConnection:
    try:
        return connect_sync(tunnel_url(base_url, vm_id, port), additional_headers=_headers(api_key), **LIMITS)
    except websockets.InvalidStatus as error:
        raise refusal(error, "the tunnel") from None
    except (OSError, TimeoutError, websockets.InvalidHandshake) as error:
        raise Unreachable(unreachable(base_url, error)) from None


def run_stdio(socket: SyncConnection, stdin: int, stdout: int) -> str:
    """One connection on stdin and stdout (ssh's ProxyCommand) until either ends; answers why_closed().
    Threads rather than an event loop: stdin may be a file, which asyncio cannot watch."""

    def send_input() -> None:
        with contextlib.suppress(OSError, websockets.ConnectionClosed):
            while data := os.read(stdin, CHUNK):
                socket.send(data)
        socket.close()

    threading.Thread(target=send_input, daemon=True).start()
    try:
        for message in socket:
            if isinstance(message, bytes):
                _write_all(stdout, message)
    except websockets.ConnectionClosedError:
        pass
    except OSError:  # whoever reads stdout went away: the connection has no one to answer
        socket.close()
        return ""
    socket.close()
    return why_closed(socket.close_code, socket.close_reason)

"""Relaying a VM's console (hvc0) to one interactive client."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable

from services.common.errors import InvalidArgument
from vers.orchestrator.v1 import orchestrator_pb2 as pb

# vers-init writes this when the console's shell exits, so `exit` ends the session.
CLOSED_MARKER = b"\x1b]vers;console-closed\x07"
MAX_TERMINAL_SIZE = 10_000

Resize = Callable[[int, int], Awaitable[None]]


class MarkerScanner:
    """Finds CLOSED_MARKER in a stream that may split it across reads, holding back only a possible prefix."""

    def __init__(self) -> None:
        self._held = b""

    def feed(self, chunk: bytes) -> tuple[bytes, bool]:
        data = self._held + chunk
        at = data.find(CLOSED_MARKER)
        if at >= 0:
            self._held = b""
            return data[:at], True
        keep = next((n for n in range(min(len(data), len(CLOSED_MARKER) - 1), 0, -1) if CLOSED_MARKER.startswith(data[-n:])), 0)
        self._held = data[len(data) - keep :]
        return data[: len(data) - keep], False


def check_size(message: pb.ConnectRequest) -> bool:
    """Whether the message carries a terminal size; both or neither of rows and cols."""
    if not message.rows and not message.cols:
        return False
    if not (0 < message.rows <= MAX_TERMINAL_SIZE and 0 < message.cols <= MAX_TERMINAL_SIZE):
        raise InvalidArgument(f"rows and cols must both be between 1 and {MAX_TERMINAL_SIZE}, not {message.rows}x{message.cols}")
    return True


async def relay(
    first: pb.ConnectRequest,
    requests: AsyncIterable[pb.ConnectRequest],
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    resize: Resize,
) -> AsyncIterator[bytes]:
    """Keystrokes from `requests` to the console, console output back, until either side ends."""
    # Only the latest size asked for is applied, one resize at a time, however many frames ask.
    wanted: list[tuple[int, int]] = []
    resizing: set[asyncio.Task[None]] = set()

    async def apply_sizes() -> None:
        while wanted:
            rows, cols = wanted.pop()
            with contextlib.suppress(Exception):  # a size the guest did not take leaves the console as it is
                await resize(rows, cols)

    def apply(message: pb.ConnectRequest) -> None:
        if check_size(message):
            wanted[:] = [(message.rows, message.cols)]
            if not resizing:
                task = asyncio.ensure_future(apply_sizes())
                resizing.add(task)
                task.add_done_callback(resizing.discard)
        if message.input:
            writer.write(message.input)

    async def forward_input() -> None:
        async for message in requests:
            apply(message)
            await writer.drain()

    apply(first)
    sending = asyncio.ensure_future(forward_input())
    scanner = MarkerScanner()
    try:
        while True:
            reading = asyncio.ensure_future(reader.read(1 << 16))
            await asyncio.wait({reading, sending}, return_when=asyncio.FIRST_COMPLETED)
            if not reading.done():
                reading.cancel()
                sending.result()  # an invalid message ends the stream with its error
                return  # the client is done
            chunk = reading.result()
            if not chunk:
                return  # the VM went away
            output, closed = scanner.feed(chunk)
            if output:
                yield output
            if closed:
                return
    finally:
        sending.cancel()
        for task in resizing:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await sending

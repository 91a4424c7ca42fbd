"""Relaying one TCP connection to a guest port over a gRPC stream (tunnels, SSH, domains)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator
from typing import Protocol

CHUNK = 1 << 16


class CarriesData(Protocol):
    data: bytes


async def pipe(
    first: bytes, requests: AsyncIterable[CarriesData], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> AsyncIterator[bytes]:
    """Bytes of `requests` to the connection, the connection's bytes back, until either side ends. The
    client's end closes the connection's sending side first, so a guest that answers after reading all
    of a request (an HTTP/1.0 server, `nc`) still has its answer carried back."""

    async def forward() -> None:
        if first:
            writer.write(first)
        async for message in requests:
            if message.data:
                writer.write(message.data)
                await writer.drain()  # a client faster than the guest waits: memory stays bounded
        if writer.can_write_eof():
            writer.write_eof()

    sending = asyncio.ensure_future(forward())
    try:
        while True:
            reading = asyncio.ensure_future(reader.read(CHUNK))
            await asyncio.wait({reading, sending}, return_when=asyncio.FIRST_COMPLETED)
            if sending.done() and sending.exception() is not None:
                reading.cancel()
                sending.result()  # a broken connection ends the stream with its error
            chunk = await reading
            if not chunk:
                return  # the guest closed the connection
            yield chunk
    finally:
        sending.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await sending

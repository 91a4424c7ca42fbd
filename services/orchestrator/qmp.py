"""A small asyncio QMP client: commands matched to answers by id, file descriptors passed with a command
(SCM_RIGHTS), and the most recent events kept for waiters."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Events kept for waiters: a guest can make QEMU emit events without end, so only the latest are kept.
RECENT_EVENTS = 256


class QmpError(RuntimeError):
    pass


class QmpClosed(QmpError):
    pass


class Qmp:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._events: collections.deque[dict[str, Any]] = collections.deque(maxlen=RECENT_EVENTS)
        self._event_added = asyncio.Condition()
        self._sending_fds = asyncio.Lock()
        self.closed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def connect(cls, path: Path, timeout: float = 10.0) -> Qmp:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(str(path), limit=16 * 1024 * 1024)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if asyncio.get_running_loop().time() > deadline:
                    raise QmpError(f"QMP socket {path} did not open within {timeout:.0f} s") from None
                await asyncio.sleep(0.01)
        qmp = cls(reader, writer)
        greeting = json.loads(await asyncio.wait_for(reader.readline(), timeout))
        if "QMP" not in greeting:
            raise QmpError(f"unexpected QMP greeting: {greeting}")
        qmp._task = asyncio.create_task(qmp._read_loop())
        await qmp.execute("qmp_capabilities")
        return qmp

    async def _read_loop(self) -> None:
        try:
            while line := await self._reader.readline():
                message = json.loads(line)
                if "event" in message:
                    async with self._event_added:
                        self._events.append(message)
                        self._event_added.notify_all()
                elif (future := self._pending.pop(message.get("id"), None)) and not future.done():
                    if "error" in message:
                        future.set_exception(QmpError(message["error"].get("desc", str(message["error"]))))
                    else:
                        future.set_result(message.get("return"))
        except (ConnectionError, json.JSONDecodeError):
            pass
        finally:
            self.closed.set()
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(QmpClosed("QEMU closed its monitor"))
            async with self._event_added:
                self._event_added.notify_all()

    async def execute(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 60.0, fds: Sequence[int] = ()) -> Any:
        """Run `command`; `fds` travel with it (SCM_RIGHTS), for the commands that take one (getfd, add-fd)."""
        if self.closed.is_set():
            raise QmpClosed("QEMU closed its monitor")
        request_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        message: dict[str, Any] = {"execute": command, "id": request_id}
        if arguments:
            message["arguments"] = arguments
        data = json.dumps(message).encode() + b"\n"
        try:
            if fds:
                await self._send_with_fds(data, fds)
            else:
                self._writer.write(data)
                await self._writer.drain()
        except BaseException:
            self._pending.pop(request_id, None)
            raise
        return await asyncio.wait_for(future, timeout)

    async def _send_with_fds(self, data: bytes, fds: Sequence[int]) -> None:
        """Asyncio's transports cannot carry descriptors: once everything written before has left, the
        message goes out through a duplicate of the connection's socket, the descriptors on its first byte."""
        async with self._sending_fds:
            transport = self._writer.transport
            while transport.get_write_buffer_size():
                await asyncio.sleep(0.001)
            raw = transport.get_extra_info("socket")
            if raw is None:
                raise QmpClosed("QEMU closed its monitor")
            sock = socket.socket(fileno=os.dup(raw.fileno()))  # shares the non-blocking flag: never changed here
            try:
                while True:
                    try:
                        sent = socket.send_fds(sock, [data], list(fds))
                        break
                    except BlockingIOError:
                        await asyncio.sleep(0.001)
            finally:
                sock.close()
            if sent < len(data):
                self._writer.write(data[sent:])
                await self._writer.drain()

    async def wait_event(self, name: str, match: dict[str, Any] | None = None, timeout: float = 60.0) -> dict[str, Any]:
        """The first event `name` (whose data contains `match`) among the latest RECENT_EVENTS, or the next one."""

        def found() -> dict[str, Any] | None:
            for event in self._events:
                data = event.get("data", {})
                if event["event"] == name and all(data.get(k) == v for k, v in (match or {}).items()):
                    return event
            return None

        async def wait() -> dict[str, Any]:
            async with self._event_added:
                while (event := found()) is None:
                    if self.closed.is_set():
                        raise QmpClosed(f"QEMU closed its monitor before {name}")
                    await self._event_added.wait()
                return event

        return await asyncio.wait_for(wait(), timeout)

    def forget_events(self) -> None:
        self._events.clear()

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()
        if self._task:
            await asyncio.gather(self._task, return_exceptions=True)

"""A small asyncio QMP client: commands matched to answers by id, events kept for waiters."""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path
from typing import Any


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
        self._events: list[dict[str, Any]] = []
        self._event_added = asyncio.Condition()
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

    async def execute(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 60.0) -> Any:
        if self.closed.is_set():
            raise QmpClosed("QEMU closed its monitor")
        request_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        message: dict[str, Any] = {"execute": command, "id": request_id}
        if arguments:
            message["arguments"] = arguments
        self._writer.write(json.dumps(message).encode() + b"\n")
        await self._writer.drain()
        return await asyncio.wait_for(future, timeout)

    async def wait_event(self, name: str, match: dict[str, Any] | None = None, timeout: float = 60.0) -> dict[str, Any]:
        """The first event `name` (whose data contains `match`) received since connecting."""

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
        try:
            await self._writer.wait_closed()
        except ConnectionError:
            pass
        if self._task:
            await asyncio.gather(self._task, return_exceptions=True)

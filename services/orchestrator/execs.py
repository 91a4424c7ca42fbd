"""Streaming exec (ExecVmStream, AttachExecStream) and the VMs' exec logs (GetVmLogs).

A streamed exec is an `ExecSession` of the engine's `ExecRegistry` (`engine.execs`): registered at once,
it waits for its VM's boot and runs in a task of its own, so no caller's connection holds it up or cuts it
short. Its events (chunks of output, then its exit) are numbered from 1 and kept, bounded, for a while after
it ends, so a client whose connection dropped attaches again after the last cursor it saw.

Every exec's output (streamed or not) also goes to its VM's exec log: JSON lines in files of the data
folder, at byte offsets that count from the log's beginning and stay valid as the oldest files are dropped.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from services.common.errors import Conflict, DomainError, FailedPrecondition, Internal, InvalidArgument, NotFound, ResourceExhausted
from services.common.names import require_uuid
from services.common.peers import GRPC_DEFAULT_MESSAGE_BYTES
from services.orchestrator.agent import CHUNK
from services.orchestrator.models import VmRow, require_not_paused
from vers.orchestrator.v1 import orchestrator_pb2 as pb

if TYPE_CHECKING:
    from services.orchestrator.engine import Engine
    from services.orchestrator.store import OrchestratorStore

log = logging.getLogger(__name__)

STREAMS = ("stdout", "stderr")
# What one kept event costs besides its bytes, counted against a session's bound: a command writing a
# byte at a time keeps as few events as one writing large pieces keeps bytes.
EVENT_COST = 256
# GetVmLogs: entries one answer gives when not asked (and at most), and the data it carries at most (its
# answer stays well under gRPC's message size, base64 in JSON included).
DEFAULT_LOG_ENTRIES = 100
MAX_LOG_ENTRIES = 1000
MAX_LOG_ANSWER_BYTES = GRPC_DEFAULT_MESSAGE_BYTES // 4
# Offsets are uint32: a log whose end would pass this starts again at 0 (readers past the end start over).
MAX_OFFSET = 2**32 - 1
SEGMENT_SUFFIX = ".log"


def new_exec_id(given: str) -> str:
    if not given:
        return str(uuid.uuid4())
    return require_uuid(given, "exec_id", ": leave it empty and one is made")


# --- the exec log of one VM --------------------------------------------------------------------------


class ExecLog:
    """A VM's exec log: files named by the offset of their first byte, each of JSON lines; the oldest file
    goes when the log passes its bound, so the offsets of what is kept never change."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        # A file is started past a quarter of the bound: dropping one drops at most that much.
        self.segment_bytes = max(max_bytes // 4, 64 * 1024)
        self._segments: list[tuple[int, Path]] | None = None
        # Appends come from the event loop, reads from a worker thread: one at a time sees the file list.
        self._lock = threading.Lock()

    def _load(self) -> list[tuple[int, Path]]:
        if self._segments is None:
            found = []
            if self.folder.is_dir():
                for path in self.folder.glob(f"*{SEGMENT_SUFFIX}"):
                    with contextlib.suppress(ValueError):
                        found.append((int(path.stem), path))
            self._segments = sorted(found)
        return self._segments

    def _end(self) -> int:
        segments = self._load()
        if not segments:
            return 0
        start, path = segments[-1]
        try:
            return start + path.stat().st_size
        except FileNotFoundError:
            return start

    def append(self, exec_id: str, stream: str, data: bytes, when: datetime | None = None) -> None:
        """Entries of at most CHUNK bytes each (a unary exec's whole output is split)."""
        stamp = (when or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        lines = b"".join(
            json.dumps(
                {"exec_id": exec_id, "stream": stream, "timestamp": stamp, "data_b64": base64.b64encode(data[at : at + CHUNK]).decode()},
                separators=(",", ":"),
            ).encode() + b"\n"
            for at in range(0, len(data), CHUNK)
        )  # fmt: skip
        if not lines:
            return
        try:
            with self._lock:
                self._write(lines)
        except OSError as error:  # a full disk loses log lines, never an exec
            log.warning("the exec log of %s could not be written: %s", self.folder.name, error)

    def _write(self, lines: bytes) -> None:
        segments = self._load()
        end = self._end()
        if end + len(lines) > MAX_OFFSET:
            self.drop()
            segments, end = self._load(), 0
        if not segments or end - segments[-1][0] >= self.segment_bytes:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            segments.append((end, self.folder / f"{end:010d}{SEGMENT_SUFFIX}"))
        with open(segments[-1][1], "ab") as file:
            file.write(lines)
        while len(segments) > 1 and end + len(lines) - segments[0][0] > self.max_bytes:
            segments.pop(0)[1].unlink(missing_ok=True)

    def read(self, offset: int, max_entries: int, stream: str) -> tuple[list[pb.VmExecLogEntry], bool, int]:
        """Entries from `offset` (the oldest kept when it is before them, or past the end), up to
        max_entries of `stream` (both when empty): (entries, reached the end, the offset after them)."""
        with self._lock:  # a copy: appends in the event loop may drop the oldest meanwhile
            segments = list(self._load())
            end = self._end()
        if not segments:
            return [], True, 0
        if offset < segments[0][0] or offset > end:
            offset = segments[0][0]
        entries: list[pb.VmExecLogEntry] = []
        carried = 0
        for index, (start, path) in enumerate(segments):
            stop = segments[index + 1][0] if index + 1 < len(segments) else end
            if offset >= stop:
                continue
            try:
                with open(path, "rb") as file:
                    file.seek(offset - start)
                    if offset > start:  # an offset inside a line starts at the next one
                        file.seek(offset - start - 1)
                        if file.read(1) != b"\n":
                            skipped = file.readline()
                            offset += len(skipped)
                    while offset < stop:
                        line = file.readline()
                        if not line.endswith(b"\n"):
                            break  # being written
                        if len(entries) >= max_entries or carried >= MAX_LOG_ANSWER_BYTES:
                            return entries, False, offset
                        offset += len(line)
                        entry = json.loads(line)
                        if stream and entry["stream"] != stream:
                            continue
                        data = base64.b64decode(entry["data_b64"])
                        carried += len(line)  # the whole entry: its exec id and stream travel too
                        entries.append(pb.VmExecLogEntry(
                            data_b64=data, stream=entry["stream"], timestamp=entry["timestamp"], exec_id=entry["exec_id"],
                        ))  # fmt: skip
            except FileNotFoundError:
                continue  # dropped while read: the next file goes on
            offset = max(offset, stop)
        return entries, offset >= end, offset

    def drop(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        self._segments = []


# --- streamed execs ----------------------------------------------------------------------------------


@dataclass
class ExecEvent:
    cursor: int
    exec_id: str
    stream: str = ""  # a chunk's: "stdout" or "stderr"
    data: bytes = b""
    exit_code: int | None = None  # the exit's
    stdout_truncated: bool = False
    stderr_truncated: bool = False

    @property
    def type(self) -> str:
        return "chunk" if self.exit_code is None else "exit"

    def as_pb(self) -> pb.ExecStreamEvent:
        if self.exit_code is not None:
            return pb.ExecStreamEvent(
                type="exit", exec_id=self.exec_id, cursor=self.cursor, exit_code=self.exit_code,
                stdout_truncated=self.stdout_truncated, stderr_truncated=self.stderr_truncated,
            )  # fmt: skip
        return pb.ExecStreamEvent(type="chunk", exec_id=self.exec_id, cursor=self.cursor, stream=self.stream, data_b64=self.data)


@dataclass
class ExecSession:
    """One streamed exec: its events as they come, kept (at most `budget`, the oldest dropped first) for
    those who attach later."""

    exec_id: str
    vm_id: str
    budget: int
    _events: list[ExecEvent] = field(default_factory=list)
    _kept: int = 0
    _last_cursor: int = 0
    _last_chunk: int = 0
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _done: asyncio.Future[int] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    error: DomainError | None = None
    finished_at: float | None = None
    stdout_truncated: bool = False
    stderr_truncated: bool = False

    @property
    def running(self) -> bool:
        return self.finished_at is None

    def _add(self, event: ExecEvent) -> None:
        self._events.append(event)
        self._kept += len(event.data) + EVENT_COST
        while self._kept > self.budget and len(self._events) > 1:
            dropped = self._events.pop(0)
            self._kept -= len(dropped.data) + EVENT_COST
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def chunk(self, stream: str, data: bytes) -> None:
        self._last_cursor += 1
        self._last_chunk = self._last_cursor
        self._add(ExecEvent(self._last_cursor, self.exec_id, stream=stream, data=data))

    def finish(self, exit_code: int | None, error: DomainError | None = None) -> None:
        if not self.running:
            return
        if exit_code is not None:
            self._last_cursor += 1
            self._add(ExecEvent(self._last_cursor, self.exec_id, exit_code=exit_code, stdout_truncated=self.stdout_truncated,
                                stderr_truncated=self.stderr_truncated))  # fmt: skip
            self._done.set_result(exit_code)
        else:
            self.error = error or Internal("the command ended without an exit code")
            self._done.set_exception(self.error)
            self._done.exception()  # retrieved: nobody may wait for it
            changed, self._changed = self._changed, asyncio.Event()
            changed.set()
        self.finished_at = time.monotonic()

    async def events(self, after: int | None = None, from_latest: bool = False) -> AsyncIterator[ExecEvent]:
        """The kept events after cursor `after` (all kept when None; from the latest chunk on with
        `from_latest`), then the new ones until the exit. A session that failed raises its error last."""
        position = self._last_chunk if from_latest else (after or 0)
        while True:
            changed = self._changed
            while self._events and self._events[-1].cursor > position:
                first = self._events[0].cursor
                event = self._events[max(0, position + 1 - first)]
                position = event.cursor
                yield event
            if not self.running:
                if self.error is not None:
                    raise self.error
                return
            await changed.wait()

    @property
    def kept_bytes(self) -> int:
        return self._kept

    async def wait(self) -> int:
        """The command's exit code (or the error that ended the session)."""
        return await asyncio.shield(self._done)


@dataclass
class _VmExecs:
    """What the registry holds of one VM: its sessions, oldest first, and its exec log."""

    log: ExecLog
    sessions: OrderedDict[str, ExecSession] = field(default_factory=OrderedDict)


class ExecRegistry:
    """The streamed execs and exec logs of the engine's VMs (one registry per engine)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._vms: dict[str, _VmExecs] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def _of(self, vm_id: str) -> _VmExecs:
        found = self._vms.get(vm_id)
        if found is None:
            found = self._vms[vm_id] = _VmExecs(ExecLog(self.engine.layout.exec_log_folder(vm_id), self.engine.settings.vm_log_max_bytes))
        return found

    def log(self, vm_id: str) -> ExecLog:
        return self._of(vm_id).log

    def _prune(self) -> None:
        """Finished sessions past their time go, and the oldest finished beyond the number kept per VM; then,
        across every VM, the oldest finished ones while all kept output passes VERS_EXEC_RETAIN_MAX_BYTES."""
        settings = self.engine.settings
        now = time.monotonic()
        for each in self._vms.values():
            finished = [s for s in each.sessions.values() if not s.running]
            over = len(finished) - settings.exec_retain_per_vm
            for session in finished:
                assert session.finished_at is not None
                if over > 0 or now - session.finished_at > settings.exec_retain_seconds:
                    each.sessions.pop(session.exec_id, None)
                    over -= 1
        kept = [(s.finished_at or now, each, s) for each in self._vms.values() for s in each.sessions.values()]
        total = sum(s.kept_bytes for _, _, s in kept)
        for _, each, session in sorted((k for k in kept if not k[2].running), key=lambda k: k[0]):
            if total <= settings.exec_retain_max_bytes:
                break
            each.sessions.pop(session.exec_id, None)
            total -= session.kept_bytes

    def start(
        self, vm: VmRow, command: Sequence[str], *, env: Mapping[str, str], stdin: bytes | None, working_dir: str,
        timeout_secs: int, exec_id: str = "",
    ) -> ExecSession:  # fmt: skip
        """Register a streamed exec and start it in a task of its own (it waits for the VM's boot first);
        what is wrong with the request is refused here, before anything runs."""
        engine, settings = self.engine, self.engine.settings
        exec_id = new_exec_id(exec_id)
        if not command:
            raise InvalidArgument('command is empty: give the program and its arguments, e.g. ["sh", "-c", "ls"]')
        require_not_paused(vm)
        engine.check_exec(timeout_secs, stdin)
        machine = engine.machine(vm)
        record = self._of(vm.id)
        self._prune()
        running = sum(1 for s in record.sessions.values() if s.running)
        if max(running, machine.agent.running) >= settings.vm_max_execs:
            raise ResourceExhausted(
                f"{max(running, machine.agent.running)} commands already run in this VM, the most at once (VERS_VM_MAX_EXECS): "
                f"wait for one to end, or raise VERS_VM_MAX_EXECS"
            )
        earlier = record.sessions.get(exec_id)
        if earlier is not None:
            # Finished or not, it is not run twice: a client that retries a start whose answer it lost
            # attaches to the first one instead.
            state = "is still running" if earlier.running else "already ran"
            raise Conflict(f"exec {exec_id} {state} in VM {vm.id}: attach to it to read its output, or give another exec_id")
        session = ExecSession(exec_id, vm.id, budget=2 * (settings.exec_max_output_bytes + EVENT_COST))
        record.sessions[exec_id] = session
        task = asyncio.create_task(self._run(session, vm, command, env, stdin, working_dir, timeout_secs))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return session

    async def _run(
        self, session: ExecSession, vm: VmRow, command: Sequence[str], env: Mapping[str, str], stdin: bytes | None,
        working_dir: str, timeout_secs: int,
    ) -> None:  # fmt: skip
        try:
            result = await self.engine.exec(
                vm, command, env=env, stdin=stdin, working_dir=working_dir, timeout_secs=timeout_secs,
                exec_id=session.exec_id, on_output=session.chunk,
            )  # fmt: skip
        except DomainError as error:
            session.finish(None, error)
        except asyncio.CancelledError:
            session.finish(None, FailedPrecondition("the orchestrator stopped while the command ran: its output does not come back"))
            raise
        except Exception as error:
            log.exception("exec %s in VM %s failed", session.exec_id, vm.id)
            session.finish(None, Internal(f"the command could not run: {error}"))
        else:
            session.stdout_truncated, session.stderr_truncated = result.stdout_truncated, result.stderr_truncated
            session.finish(result.exit_code)

    def get(self, vm_id: str, exec_id: str) -> ExecSession:
        self._prune()
        record = self._vms.get(vm_id)
        key = new_exec_id(exec_id)
        session = record.sessions.get(key) if record is not None else None
        if session is None:
            raise NotFound(
                f"no exec session {key} in VM {vm_id}: it never ran here as a streamed exec, or it ended more "
                f"than VERS_EXEC_RETAIN_SECONDS ago (or more than VERS_EXEC_RETAIN_PER_VM execs ended since)"
            )
        return session

    def drop_vm(self, vm_id: str) -> None:
        """The VM is deleted: its sessions (which its deletion ended) and its exec log go."""
        record = self._vms.pop(vm_id, None)
        for session in record.sessions.values() if record is not None else ():
            session.finish(None, FailedPrecondition(f"VM {vm_id} was deleted while the command ran"))
        shutil.rmtree(self.engine.layout.exec_log_folder(vm_id), ignore_errors=True)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


# --- RPCs --------------------------------------------------------------------------------------------


class ExecStreamMethods:
    """Methods of OrchestratorServicer (a mixin: `self` is the servicer)."""

    engine: Engine
    store: OrchestratorStore

    if TYPE_CHECKING:

        async def _vm(self, vm_id: str) -> VmRow: ...
        async def _exec_env(self, org_id: str, requested: Mapping[str, str]) -> dict[str, str]: ...

    async def ExecVmStream(
        self, request: pb.ExecVmStreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ExecVmStreamResponse]:
        vm = await self._vm(request.vm_id)
        session = self.engine.execs.start(
            vm, list(request.command), env=await self._exec_env(vm.org_id, request.env),
            stdin=request.stdin.encode() if request.stdin else None, working_dir=request.working_dir,
            timeout_secs=request.timeout_secs, exec_id=request.exec_id,
        )  # fmt: skip
        async for event in session.events():
            yield pb.ExecVmStreamResponse(event=event.as_pb())

    async def AttachExecStream(
        self, request: pb.AttachExecStreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.AttachExecStreamResponse]:
        vm = await self._vm(request.vm_id)
        if not request.exec_id:
            raise InvalidArgument("exec_id is required: the exec_id of a streamed exec of this VM")
        session = self.engine.execs.get(vm.id, request.exec_id)
        after = request.cursor if request.HasField("cursor") else None
        async for event in session.events(after, request.from_latest):
            yield pb.AttachExecStreamResponse(event=event.as_pb())

    async def GetVmLogs(self, request: pb.GetVmLogsRequest, context: grpc.aio.ServicerContext) -> pb.GetVmLogsResponse:
        vm = await self._vm(request.vm_id)
        if request.stream not in ("", *STREAMS):
            raise InvalidArgument(f"stream is 'stdout' or 'stderr' (or empty for both), not {request.stream!r}")
        max_entries = min(request.max_entries or DEFAULT_LOG_ENTRIES, MAX_LOG_ENTRIES)
        entries, eof, next_offset = await asyncio.to_thread(self.engine.execs.log(vm.id).read, request.offset, max_entries, request.stream)
        return pb.GetVmLogsResponse(entries=entries, eof=eof, next_offset=next_offset)

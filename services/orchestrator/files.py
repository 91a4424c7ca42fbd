"""Files of a VM: small ones whole (ReadFile, WriteFile), any size as tar streams (DownloadFiles, UploadFiles).

Small files go through the guest agent (the virtio-serial port every VM has, network or not), whole, so
they are capped by VERS_FILE_MAX_BYTES. Tar streams are started over SSH to the guest (services/orchestrator/
guestssh.py), where `tar` packs or unpacks them: each side reads only as fast as the other takes, so memory
stays bounded whatever the size.

The bytes themselves go over a plain TCP connection when the guest has busybox (its `nc`): the guest's CPU is
emulated (TCG), and SSH's encryption there caps a stream at 6-10 MB/s whatever the window, where a plain
connection moves 50 MB/s and more (bench/files.py). The SSH session still starts the guest's side, carries
its errors and exit code, and ends it. The connection goes through the VM's own host forward
(Engine.connect_port), in the VM's network namespace: nothing but the orchestrator reaches it, and it never
leaves this host, so there is nothing to encrypt against. `nc -l` serves one connection, and gives up when
no one connects within RAW_ACCEPT_SECONDS, so an error on the host's side leaves nothing running. A guest
without busybox gets the whole stream over SSH, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import posixpath
import secrets
import shlex
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

import asyncssh
import grpc
from google.api import httpbody_pb2

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.orchestrator.guestssh import describe, guest_ssh
from services.orchestrator.models import require_not_paused
from vers.orchestrator.v1 import orchestrator_pb2 as pb

if TYPE_CHECKING:
    from services.orchestrator.engine import Engine
    from services.orchestrator.models import VmRow
    from services.orchestrator.store import OrchestratorStore

TAR = "application/x-tar"
# Bytes of tar in one DownloadFiles message: large enough to cost little per message, small enough that
# the few messages in flight (gRPC's and HTTP/2's windows) stay a few MiB.
CHUNK = 256 * 1024
PATH_MAX = 4096
# What the guest's stderr may add to an error message.
STDERR_KEPT = 2048
# How long the guest agent may take for a small file (it sends it in 32 KiB frames over a serial port).
SMALL_FILE_SECONDS = 120.0

# Exit codes of the guest scripts below, each a mistake of the caller's to tell apart.
MISSING, IS_FOLDER, TOO_LARGE, NOT_REGULAR, NO_PARENT, NOT_A_FOLDER = 3, 4, 5, 6, 7, 8

# The guest port a tar stream's plain connection is served on, one transfer at a time per VM (another at
# the same time goes over SSH); how long the guest's `nc -l` waits for the host to connect.
RAW_PORT = 60022
RAW_ACCEPT_SECONDS = 30
# The first byte the guest scripts write on the SSH session: the tar follows over SSH, or over the port.
OVER_SSH, OVER_PORT = b"S", b"R"
# How often the host tries the port again while the guest's `nc` is not listening yet.
RAW_RETRY_SECONDS = 0.05

READ = f"""
p=$1
[ -e "$p" ] || exit {MISSING}
[ -d "$p" ] && exit {IS_FOLDER}
[ -f "$p" ] || exit {NOT_REGULAR}
s=$(stat -L -c %s -- "$p") || exit 1
[ "$s" -gt "$2" ] && {{ echo "$s"; exit {TOO_LARGE}; }}
exec cat -- "$p"
"""

# Written next to the file and moved over it, so a reader never sees half a file and a failed write
# leaves the old one (or none) in place.
WRITE = f"""
p=$1; d=$(dirname -- "$p"); t="$d/.vers-write.$4"
if [ ! -d "$d" ]; then
  [ -e "$d" ] && exit {NOT_A_FOLDER}
  [ "$2" = 1 ] || exit {NO_PARENT}
  mkdir -p -- "$d" || exit 1
fi
[ -d "$p" ] && exit {IS_FOLDER}
if cat > "$t" && chmod "$3" "$t" && mv -f -- "$t" "$p"; then exit 0; fi
rm -f -- "$t"; exit 1
"""

# Everything of a tar stream goes through the channel or the port, so tar's own complaints go on stderr.
# Over the port, nc runs tar with the connection as its stdin and stdout (-e): tar's own large writes (or
# sendfile) go straight to the socket, where nc's own copying moves 1 KiB at a time (3 MB/s out of a guest
# under TCG), and nc's exit code is tar's.
DOWNLOAD = f"""
p=$1
[ -e "$p" ] || [ -L "$p" ] || exit {MISSING}
cd -- "$2" || exit 1
if [ -n "$4" ] && command -v busybox >/dev/null; then
  printf {OVER_PORT.decode()}
  exec busybox nc -l -w {RAW_ACCEPT_SECONDS} -p "$4" -e tar -c -f - -- "$3"
fi
printf {OVER_SSH.decode()}
exec tar -c -f - -- "$3"
"""

# Files unpacked belong to root, the user the platform logs in as (as with scp), whoever made the tar.
# Over the port, the guest first sends the host one byte: the host then knows it reached the listener, not
# a port with no one on it yet.
UPLOAD = f"""
d=$1
[ -e "$d" ] && [ ! -d "$d" ] && exit {NOT_A_FOLDER}
mkdir -p -- "$d" && cd -- "$d" || exit 1
if [ -n "$2" ] && command -v busybox >/dev/null; then
  printf {OVER_PORT.decode()}
  exec busybox nc -l -w {RAW_ACCEPT_SECONDS} -p "$2" -e sh -c 'printf {OVER_PORT.decode()}; exec tar -x -o -f -'
fi
printf {OVER_SSH.decode()}
exec tar -x -o -f -
"""


def absolute(path: str, what: str = "path") -> str:
    if not path:
        raise InvalidArgument(f"{what} is missing: give an absolute path in the VM, e.g. /root/notes.txt")
    if not path.startswith("/"):
        raise InvalidArgument(f"{what} {path!r} is not absolute: give the whole path in the VM, e.g. /root/{path}")
    if "\0" in path or len(path.encode()) > PATH_MAX:
        raise InvalidArgument(f"{what} must be at most {PATH_MAX} bytes with no NUL character")
    return path


def guest_said(stderr: bytes) -> str:
    text = stderr[:STDERR_KEPT].decode(errors="replace").strip()
    return f": {text}" if text else ""


class _Stderr:
    """Reads a process's stderr all along, keeping its start: unread, it would fill the channel's window
    (which stdout shares) and stall the transfer."""

    def __init__(self, process: asyncssh.SSHClientProcess[bytes]) -> None:
        self.kept = bytearray()
        self.task = asyncio.create_task(self._read(process))

    async def _read(self, process: asyncssh.SSHClientProcess[bytes]) -> None:
        with contextlib.suppress(asyncssh.Error, OSError):
            while data := await process.stderr.read(65536):
                self.kept += data[: max(0, STDERR_KEPT - len(self.kept))]

    async def text(self) -> bytes:
        with contextlib.suppress(asyncio.TimeoutError, Exception):
            await asyncio.wait_for(asyncio.shield(self.task), 5.0)
        self.task.cancel()
        return bytes(self.kept)


class FileMethods:
    """Methods of OrchestratorServicer (a mixin: `self` is the servicer)."""

    engine: Engine
    store: OrchestratorStore

    _vm: Callable[[str], Awaitable[VmRow]]  # OrchestratorServicer's: the caller's VM, or NotFound

    async def _running(self, vm_id: str) -> VmRow:
        vm = await self._vm(vm_id)
        require_not_paused(vm)
        return vm

    # Small files, whole

    async def ReadFile(self, request: pb.ReadFileRequest, context: grpc.aio.ServicerContext) -> pb.ReadFileResponse:
        path = absolute(request.path)
        vm = await self._running(request.vm_id)
        limit = self.engine.settings.file_max_bytes
        machine = await self.engine.wait_booted(vm)
        result = await machine.agent.exec(
            ["sh", "-c", READ, "sh", path, str(limit)], max_output=limit + 1, wait=SMALL_FILE_SECONDS,
            max_running=self.engine.settings.vm_max_execs,
        )  # fmt: skip
        code = result.exit_code
        if code == MISSING:
            raise NotFound(f"no file {path} in VM {vm.id}")
        if code == IS_FOLDER:
            raise InvalidArgument(f"{path} is a folder in VM {vm.id}: download folders as a tar (GET /vm/{vm.id}/files/tar, or vers copy)")
        if code == NOT_REGULAR:
            raise InvalidArgument(f"{path} in VM {vm.id} is not a regular file (a device, socket or pipe): only files can be read")
        if code == TOO_LARGE or (code == 0 and result.stdout_truncated):
            size = result.stdout.decode(errors="replace").strip() if code == TOO_LARGE else f"more than {limit}"
            raise FailedPrecondition(
                f"{path} is {size} bytes, more than a file read whole may be ({limit}, VERS_FILE_MAX_BYTES): download it "
                f"as a tar (GET /vm/{vm.id}/files/tar?path=..., or vers copy {vm.id}:{path} .)"
            )
        if code != 0:
            raise FailedPrecondition(f"VM {vm.id} could not read {path}{guest_said(result.stderr)}")
        return pb.ReadFileResponse(content_b64=result.stdout)

    async def WriteFile(self, request: pb.WriteFileRequest, context: grpc.aio.ServicerContext) -> pb.WriteFileResponse:
        path = absolute(request.path)
        if path.endswith("/"):
            raise InvalidArgument(f"path {path!r} names a folder: give the file's path, e.g. {path}notes.txt")
        limit = self.engine.settings.file_max_bytes
        content = request.content_b64
        if len(content) > limit:
            raise InvalidArgument(
                f"the file is {len(content)} bytes, more than a file written whole may be ({limit}, VERS_FILE_MAX_BYTES): "
                f"upload it as a tar (PUT /vm/{{vm_id}}/files/tar?path=..., or vers copy)"
            )
        mode = request.mode if request.HasField("mode") else 0o644
        if mode > 0o7777:
            raise InvalidArgument(f"mode {mode} is not a file mode: give permission bits as a number, e.g. 420 (0644) or 493 (0755)")
        vm = await self._running(request.vm_id)
        machine = await self.engine.wait_booted(vm)
        result = await machine.agent.exec(
            ["sh", "-c", WRITE, "sh", path, "1" if request.create_dirs else "0", format(mode, "o"), secrets.token_hex(8)],
            stdin=content or None, wait=SMALL_FILE_SECONDS, max_running=self.engine.settings.vm_max_execs,
        )  # fmt: skip
        code, parent = result.exit_code, posixpath.dirname(path)
        if code == NO_PARENT:
            raise NotFound(f"no folder {parent} in VM {vm.id} to write {path} into: create it, or send create_dirs: true")
        if code == NOT_A_FOLDER:
            raise InvalidArgument(f"{parent} in VM {vm.id} is a file, not a folder: {path} cannot be written")
        if code == IS_FOLDER:
            raise InvalidArgument(f"{path} is a folder in VM {vm.id}: give the path of a file")
        if code != 0:
            raise FailedPrecondition(f"VM {vm.id} could not write {path}{guest_said(result.stderr)}")
        return pb.WriteFileResponse()

    # Any size, as tar streams

    async def DownloadFiles(
        self, request: pb.DownloadFilesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.DownloadFilesResponse]:
        path = absolute(request.path)
        vm = await self._running(request.vm_id)
        trimmed = path.rstrip("/") or "/"
        parent, name = posixpath.split(trimmed) if trimmed != "/" else ("/", ".")
        async with asyncio.timeout(self.engine.settings.file_transfer_timeout_seconds), _raw_port(vm) as port:
            command = f"sh -c {shlex.quote(DOWNLOAD)} sh {shlex.quote(trimmed)} {shlex.quote(parent)} {shlex.quote(name)} {port}"
            async with guest_ssh(self.engine, vm) as ssh, ssh.create_process(command, encoding=None) as process:
                stderr = _Stderr(process)
                try:
                    if await process.stdout.read(1) == OVER_PORT:
                        exited = asyncio.create_task(process.wait())
                        try:
                            async with _connected(self.engine, vm, port, exited) as connection:
                                if connection is not None:
                                    reader, _, data = connection
                                    while data:
                                        if len(data) < CHUNK:
                                            data += await _read_up_to(reader, CHUNK - len(data))
                                        yield pb.DownloadFilesResponse(data=httpbody_pb2.HttpBody(content_type=TAR, data=data))
                                        data = await _read_up_to(reader, CHUNK)
                            code = _exit_code(await exited)
                        finally:
                            exited.cancel()
                    else:
                        while data := await _read_up_to(process.stdout, CHUNK):
                            yield pb.DownloadFilesResponse(data=httpbody_pb2.HttpBody(content_type=TAR, data=data))
                        code = _exit_code(await process.wait())
                except (asyncssh.Error, OSError) as error:
                    raise FailedPrecondition(f"the download of {path} from VM {vm.id} broke off: {describe(error)}") from None
                said = guest_said(await stderr.text())
        if code == MISSING:
            raise NotFound(f"no file or folder {path} in VM {vm.id}")
        if code != 0:
            raise FailedPrecondition(f"VM {vm.id} could not pack {path} into a tar (tar exited with {code}){said}")

    async def UploadFiles(
        self, request_iterator: AsyncIterator[pb.UploadFilesRequest], context: grpc.aio.ServicerContext
    ) -> pb.UploadFilesResponse:
        first = await anext(aiter(request_iterator), None)
        if first is None or not first.vm_id:
            raise InvalidArgument("the first message of UploadFiles names the VM and the folder: {vm_id, path}")
        path = absolute(first.path)
        vm = await self._running(first.vm_id)
        sent = 0
        async with (
            asyncio.timeout(self.engine.settings.file_transfer_timeout_seconds),
            _raw_port(vm) as port,
            guest_ssh(self.engine, vm) as ssh,
        ):
            command = f"sh -c {shlex.quote(UPLOAD)} sh {shlex.quote(path)} {port}"
            async with ssh.create_process(command, encoding=None) as process, contextlib.AsyncExitStack() as stack:
                stderr = _Stderr(process)
                way = await process.stdout.read(1)  # before wait(), which reads what is left
                exited = asyncio.create_task(process.wait())
                target: asyncssh.SSHWriter[bytes] | asyncio.StreamWriter | None = process.stdin if way == OVER_SSH else None
                if way == OVER_PORT:
                    connection = await stack.enter_async_context(_connected(self.engine, vm, port, exited))
                    target = connection[1] if connection is not None else None

                async def feed() -> None:
                    nonlocal sent
                    unpacking = target is not None
                    async for message in _chain(first, request_iterator):
                        data = message.data.data
                        sent += len(data)
                        if data and unpacking:
                            assert target is not None
                            try:
                                target.write(data)
                                await target.drain()  # the guest's tar sets the pace
                            except (asyncssh.Error, OSError):
                                # tar has ended: its exit code tells why. It stops at the archive's end
                                # marker, so what a writer pads its last record with is read and dropped.
                                unpacking = False
                    if unpacking:
                        assert target is not None
                        with contextlib.suppress(asyncssh.Error, OSError):
                            target.write_eof()

                feeding = asyncio.create_task(feed())
                try:
                    await asyncio.wait({feeding, exited}, return_when=asyncio.FIRST_COMPLETED)
                    if feeding.done():
                        feeding.result()  # the caller's stream broke off: that error is the answer
                    code = _exit_code(await exited)
                    if code == 0:
                        await feeding
                finally:
                    for task in (feeding, exited):
                        task.cancel()
                        with contextlib.suppress(asyncio.CancelledError, Exception):
                            await task
                said = guest_said(await stderr.text())
        if code == NOT_A_FOLDER:
            raise InvalidArgument(f"{path} in VM {vm.id} is a file, not a folder: give the folder to unpack into")
        if code != 0:
            raise FailedPrecondition(f"VM {vm.id} could not unpack the tar into {path} (tar exited with {code}){said}")
        return pb.UploadFilesResponse(bytes=sent)


# Per VM, the lock of the plain connection's port (see _raw_port).
_RAW_LOCKS: dict[str, asyncio.Lock] = {}


@contextlib.asynccontextmanager
async def _raw_port(vm: VmRow) -> AsyncIterator[str]:
    """The guest port for this transfer's plain connection, or "" (over SSH) while another transfer of the
    VM has it: one `nc -l` at a time listens there."""
    lock = _RAW_LOCKS.setdefault(vm.id, asyncio.Lock())
    if lock.locked():
        yield ""
        return
    async with lock:
        try:
            yield str(RAW_PORT)
        finally:
            del _RAW_LOCKS[vm.id]


@contextlib.asynccontextmanager
async def _connected(
    engine: Engine,
    vm: VmRow,
    port: str,
    exited: asyncio.Task[asyncssh.SSHCompletedProcess],
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes] | None]:
    """A connection to the guest's `nc -l` on `port`, with the first bytes it sent; None when the guest's
    side ended first (its exit code says why). Until nc listens, the host forward accepts and closes at once,
    so a connection counts only once something arrives on it."""
    while True:
        async with engine.connect_port(vm, int(port)) as (reader, writer):
            first = await reader.read(CHUNK)
            if first:
                yield reader, writer, first
                return
        if exited.done():
            yield None
            return
        await asyncio.wait({exited}, timeout=RAW_RETRY_SECONDS)


async def _chain(first: pb.UploadFilesRequest, rest: AsyncIterator[pb.UploadFilesRequest]) -> AsyncIterator[pb.UploadFilesRequest]:
    yield first
    async for message in rest:
        yield message


async def _read_up_to(stream: asyncssh.SSHReader[bytes] | asyncio.StreamReader, size: int) -> bytes:
    """`size` bytes, or what is left before the end: SSH packets are small, gRPC messages cost per message."""
    try:
        return await stream.readexactly(size)
    except asyncio.IncompleteReadError as end:
        return end.partial


def _exit_code(completed: asyncssh.SSHCompletedProcess) -> int:
    """The guest command's exit code; -1 when a signal ended it, or the channel closed without one."""
    return completed.exit_status if completed.exit_status is not None and completed.exit_status >= 0 else -1

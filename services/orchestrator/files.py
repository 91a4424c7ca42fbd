"""Files of a VM: small ones whole (ReadFile, WriteFile), any size as tar streams (DownloadFiles, UploadFiles).

Small files go through the guest agent (the virtio-serial port every VM has, network or not), whole, so
they are capped by VERS_FILE_MAX_BYTES. Tar streams go over SSH to the guest (services/orchestrator/
guestssh.py), where `tar` packs or unpacks them: each side reads only as fast as the other takes, so memory
stays bounded whatever the size.
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

# Everything of a tar stream goes through the channel, so tar's own complaints go on stderr.
DOWNLOAD = f"""
p=$1
[ -e "$p" ] || [ -L "$p" ] || exit {MISSING}
cd -- "$2" && exec tar -c -f - -- "$3"
"""

# Files unpacked belong to root, the user the platform logs in as (as with scp), whoever made the tar.
UPLOAD = f"""
d=$1
[ -e "$d" ] && [ ! -d "$d" ] && exit {NOT_A_FOLDER}
mkdir -p -- "$d" && cd -- "$d" && exec tar -x -o -f -
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
        if vm.state == "paused":
            raise FailedPrecondition(f'VM {vm.id} is paused: resume it first (PATCH /vm/{vm.id}/state {{"state": "Running"}})')
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

    async def DownloadFiles(self, request: pb.DownloadFilesRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.DownloadFilesResponse]:
        path = absolute(request.path)
        vm = await self._running(request.vm_id)
        trimmed = path.rstrip("/") or "/"
        parent, name = posixpath.split(trimmed) if trimmed != "/" else ("/", ".")
        command = f"sh -c {shlex.quote(DOWNLOAD)} sh {shlex.quote(trimmed)} {shlex.quote(parent)} {shlex.quote(name)}"
        async with asyncio.timeout(self.engine.settings.file_transfer_timeout_seconds):
            async with guest_ssh(self.engine, vm) as ssh:
                async with ssh.create_process(command, encoding=None) as process:
                    stderr = _Stderr(process)
                    try:
                        while data := await _read_up_to(process.stdout, CHUNK):
                            yield pb.DownloadFilesResponse(data=httpbody_pb2.HttpBody(content_type=TAR, data=data))
                    except (asyncssh.Error, OSError) as error:
                        raise FailedPrecondition(f"the download of {path} from VM {vm.id} broke off: {describe(error)}") from None
                    code = _exit_code(await process.wait())
                    said = guest_said(await stderr.text())
        if code == MISSING:
            raise NotFound(f"no file or folder {path} in VM {vm.id}")
        if code != 0:
            raise FailedPrecondition(f"VM {vm.id} could not pack {path} into a tar (tar exited with {code}){said}")

    async def UploadFiles(self, request_iterator: AsyncIterator[pb.UploadFilesRequest], context: grpc.aio.ServicerContext) -> pb.UploadFilesResponse:
        first = await anext(aiter(request_iterator), None)
        if first is None or not first.vm_id:
            raise InvalidArgument("the first message of UploadFiles names the VM and the folder: {vm_id, path}")
        path = absolute(first.path)
        vm = await self._running(first.vm_id)
        sent = 0
        async with asyncio.timeout(self.engine.settings.file_transfer_timeout_seconds):
            async with guest_ssh(self.engine, vm) as ssh:
                async with ssh.create_process(f"sh -c {shlex.quote(UPLOAD)} sh {shlex.quote(path)}", encoding=None) as process:
                    stderr = _Stderr(process)

                    async def feed() -> None:
                        nonlocal sent
                        unpacking = True
                        async for message in _chain(first, request_iterator):
                            data = message.data.data
                            sent += len(data)
                            if data and unpacking:
                                try:
                                    process.stdin.write(data)
                                    await process.stdin.drain()  # the guest's tar sets the pace
                                except (asyncssh.Error, OSError):
                                    # tar has ended: its exit code tells why. It stops at the archive's end
                                    # marker, so what a writer pads its last record with is read and dropped.
                                    unpacking = False
                        if unpacking:
                            with contextlib.suppress(asyncssh.Error, OSError):
                                process.stdin.write_eof()

                    feeding = asyncio.create_task(feed())
                    exited = asyncio.create_task(process.wait())
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


async def _chain(first: pb.UploadFilesRequest, rest: AsyncIterator[pb.UploadFilesRequest]) -> AsyncIterator[pb.UploadFilesRequest]:
    yield first
    async for message in rest:
        yield message


async def _read_up_to(stream: asyncssh.SSHReader[bytes], size: int) -> bytes:
    """`size` bytes, or what is left before the end: SSH packets are small, gRPC messages cost per message."""
    try:
        return await stream.readexactly(size)
    except asyncio.IncompleteReadError as end:
        return end.partial


def _exit_code(completed: asyncssh.SSHCompletedProcess) -> int:
    """The guest command's exit code; -1 when a signal ended it, or the channel closed without one."""
    return completed.exit_status if completed.exit_status is not None and completed.exit_status >= 0 else -1

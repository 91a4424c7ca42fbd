"""`vers copy`: files and folders into and out of a VM. main.py adds the commands; this module needs nothing from it.

A copy is a tar stream both ways (PUT / GET /api/v1/vm/{id}/files/tar?path=...), written and read as it goes,
so a file of any size passes through a few hundred KiB of memory. As with `scp -r`: when the destination is
a folder that exists, the source goes inside it under its own name; otherwise the destination is the
source's new name. Modes are kept; files take the owner of whoever unpacks them (root in the VM).
"""

from __future__ import annotations

import contextlib
import io
import os
import posixpath
import queue
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import httpx

from services.cli.output import Output, size, vers_command
from services.client import ApiClient, seg

if TYPE_CHECKING:
    from services.cli.app import Context

# Bytes of tar handed to the HTTP body at a time, and how many may wait: what an upload holds in memory.
CHUNK = 256 * 1024
QUEUED = 8


class CopyError(OSError):
    """A copy that cannot be done as asked (the message says why); an OSError, as the local file errors a
    copy may also raise, so a caller reports both alike."""


def upload(client: ApiClient, vm_id: str, local: Path, remote: str) -> None:
    """Copy the local file or folder `local` to `remote` (an absolute path) in the VM."""
    if not local.exists() and not local.is_symlink():
        raise CopyError(f"no {local} on this machine")
    remote = _absolute(remote)
    if remote.endswith("/") or _is_remote_folder(client, vm_id, remote):
        folder, name = remote, local.resolve().name or "root"
    else:
        folder, name = posixpath.split(remote)
    with _tar_stream(local, name) as body:
        client.request("PUT", f"/api/v1/vm/{seg(vm_id)}/files/tar", params={"path": folder or "/"}, content=body, timeout=None)


def download(client: ApiClient, vm_id: str, remote: str, local: Path) -> None:
    """Copy the file or folder `remote` (an absolute path) of the VM to `local` on this machine."""
    remote = _absolute(remote)
    if local.is_dir():
        folder, name = local, None  # inside it, under the source's own name
    else:
        folder, name = local.parent, local.name
        if not folder.is_dir():
            raise CopyError(f"no folder {folder} on this machine to copy into")
    path = f"/api/v1/vm/{seg(vm_id)}/files/tar"
    with client.stream("GET", path, params={"path": remote}, timeout=None) as response:
        reader = io.BufferedReader(_ChunkReader(response.iter_raw(CHUNK)), CHUNK)
        try:
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                _extract(tar, folder, posixpath.basename(remote.rstrip("/")) or "root", name)
        except (httpx.HTTPError, tarfile.ReadError, EOFError) as error:
            raise CopyError(f"the copy of {remote} from VM {vm_id} broke off ({error}): what arrived is in {folder}, incomplete") from None


def _absolute(remote: str) -> str:
    if not remote.startswith("/"):
        raise CopyError(f"the VM's path {remote!r} is not absolute: write it VM:/whole/path, e.g. dev:/root/{remote}")
    return remote


def _is_remote_folder(client: ApiClient, vm_id: str, remote: str) -> bool:
    answer = client.request("POST", f"/api/v1/vm/{seg(vm_id)}/exec", json={"command": ["test", "-d", remote]})
    return int(answer.get("exit_code") or 0) == 0


@contextlib.contextmanager
def _tar_stream(local: Path, name: str) -> Iterator[Iterator[bytes]]:
    """The tar of `local` (under `name`) as an iterator of chunks, written by a thread as the HTTP body is
    sent: the queue between them is all it holds."""
    chunks: queue.Queue[bytes | BaseException | None] = queue.Queue(QUEUED)
    stop = threading.Event()

    class Sink(io.RawIOBase):
        def writable(self) -> bool:
            return True

        def write(self, data: Any) -> int:
            if stop.is_set():
                raise BrokenPipeError("the upload ended")
            chunks.put(bytes(data))
            return len(data)

    def write() -> None:
        try:
            with io.BufferedWriter(Sink(), CHUNK) as sink, tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                tar.add(local, arcname=name, filter=_as_root)
            chunks.put(None)
        except BaseException as error:  # handed to the reader, which raises it in the caller's thread
            chunks.put(error)

    def body() -> Iterator[bytes]:
        while (chunk := chunks.get()) is not None:
            if isinstance(chunk, BaseException):
                raise CopyError(f"{local} could not be read: {chunk}")
            yield chunk

    writer = threading.Thread(target=write, name="vers-copy-tar", daemon=True)
    writer.start()
    try:
        yield body()
    finally:
        stop.set()
        while writer.is_alive():  # unblock a writer waiting on a full queue
            with contextlib.suppress(queue.Empty):
                chunks.get(timeout=0.1)


def _as_root(member: tarfile.TarInfo) -> tarfile.TarInfo:
    """Files in the tar belong to no one in particular: the VM's tar makes them root's, as scp would."""
    member.uid = member.gid = 0
    member.uname = member.gname = "root"
    return member


class _ChunkReader(io.RawIOBase):
    """A file to read from, over the chunks of a response body."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._left = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._left:
            self._left = next(self._chunks, b"")
            if not self._left:
                return 0
        count = min(len(buffer), len(self._left))
        buffer[:count] = self._left[:count]
        self._left = self._left[count:]
        return count


def _extract(tar: tarfile.TarFile, folder: Path, sent: str, name: str | None) -> None:
    """Each member as it comes, into `folder`, under the top entry `sent` (renamed to `name` when given); files
    become the copier's, as with scp. What the VM sends is not trusted (a guest may run anyone's code): a
    member outside that top entry, a link to outside it, or a path through a link (a symlink the stream made
    earlier, or one already there) that leads out of it is refused, as the 'tar' filter refuses absolute
    paths and `..`."""
    uid, gid = os.getuid(), os.getgid()
    top = name or sent
    root = folder / top
    folders: list[tuple[Path, int]] = []
    for member in tar:
        member.name = _renamed(member.name, sent, top)
        if member.islnk():
            member.linkname = _renamed(member.linkname, sent, top)
        target = folder / member.name
        if member.name != top and not _inside(target.parent, root):
            raise CopyError(f"the VM sent {member.name!r}, which leads out of {root} (through a link): refused")
        if member.islnk() and not _inside(folder / member.linkname, root):
            raise CopyError(f"the VM sent a hard link to {member.linkname!r}, out of {root}: refused")
        member.uid, member.gid, member.uname, member.gname = uid, gid, "", ""
        if member.isdir():
            # A read-only folder gets its mode once its files are in (members come in stream order).
            folders.append((target, member.mode & 0o755))
            member.mode |= 0o700
        elif member.isfile() and (target.is_symlink() or (target.exists() and os.stat(target).st_nlink > 1)):
            target.unlink()  # written anew, never through a link into another file
        tar.extract(member, folder, filter="tar")
    for path, mode in reversed(folders):
        with contextlib.suppress(OSError):
            path.chmod(mode)


def _renamed(member: str, sent: str, top: str) -> str:
    parts = [part for part in member.split("/") if part not in ("", ".")]
    if not parts or parts[0] != sent:
        raise CopyError(f"the VM sent {member!r}, which is not under {sent!r}, what was asked for: refused")
    return posixpath.join(top, *parts[1:])


def _inside(path: Path, root: Path) -> bool:
    """`path`, its links followed, is `root` or under it (`root` followed the same way)."""
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    return real == real_root or real.startswith(real_root.rstrip("/") + "/")


def _split(argument: str) -> tuple[str | None, str]:
    """("dev", "/srv/app") for dev:/srv/app; (None, "./src") for a local path (one with a / before any :)."""
    head, colon, tail = argument.partition(":")
    if not colon or "/" in head or not head:
        return None, argument
    return head, tail


@vers_command("copy")
@click.argument("source")
@click.argument("destination")
def copy(ctx: Context, out: Output, source: str, destination: str) -> None:
    """Copy files and folders between this machine and a VM, recursively, modes kept.

    One side is VM:PATH (an alias, an ID or the start of one, then an absolute path in the VM):
    `vers copy ./src dev:/srv/app` uploads, `vers copy dev:/var/log/app.log .` downloads. As with scp -r,
    a destination folder that exists receives the source under its own name; any other destination is the
    copy's new name. Files of any size stream through.
    """
    source_vm, source_path = _split(source)
    destination_vm, destination_path = _split(destination)
    if (source_vm is None) == (destination_vm is None):
        raise click.UsageError("exactly one side is a VM: write it VM:PATH (e.g. dev:/srv/app), the other a local path")
    try:
        if source_vm is not None:
            vm_id = ctx.vm(source_vm)
            local = Path(destination_path).expanduser()
            download(ctx.client, vm_id, source_path, local)
            summary = {"direction": "from_vm", "vm_id": vm_id, "remote": source_path, "local": str(local)}
            line = f"✓ Copied {vm_id}:{source_path} → {local}"
        else:
            assert destination_vm is not None
            vm_id = ctx.vm(destination_vm)
            local = Path(source_path).expanduser()
            upload(ctx.client, vm_id, local, destination_path)
            summary = {"direction": "to_vm", "vm_id": vm_id, "remote": destination_path, "local": str(local)}
            line = f"✓ Copied {local} ({size(_local_bytes(local))}) → {vm_id}:{destination_path}"
    except OSError as error:
        raise click.ClickException(
            str(error) if isinstance(error, CopyError) else f"{error.strerror or error}: {error.filename or ''}".rstrip(": ")
        ) from None
    ctx.remember(vm_id)
    out.result(summary, line)


def _local_bytes(local: Path) -> int:
    if not local.is_dir():
        return local.lstat().st_size
    return sum(path.lstat().st_size for path in local.rglob("*") if path.is_file() and not path.is_symlink())


# Top-level commands.
TOP_COMMANDS: list[click.Command] = [copy]

__all__ = ["TOP_COMMANDS", "CopyError", "download", "upload"]

"""Files the platform relies on are written whole or not at all: to a temporary file beside the target,
flushed to disk, renamed over the target, and the folder flushed so the rename itself survives a crash."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def fsync_path(path: Path, flags: int = 0) -> None:
    fd = os.open(path, os.O_RDONLY | flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
    fsync_path(folder, os.O_DIRECTORY)


def write_atomic(path: Path, data: bytes | str, mode: int = 0o600, *, exclusive: bool = False) -> bool:
    """Replace `path` with `data` atomically, with permissions `mode` (private unless said) from the first
    byte on; folders it makes are private. With `exclusive`, an existing file is kept and False returned
    (two writers racing: the first one wins)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    content = data.encode() if isinstance(data, str) else data
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as out:
            out.write(content)
            out.flush()
            os.fsync(out.fileno())
        if exclusive:
            try:
                os.link(temporary, path)  # fails if the target exists: no window where it is half-written
            except FileExistsError:
                return False
            finally:
                os.unlink(temporary)
        else:
            os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    fsync_dir(path.parent)
    return True


def fsync_tree(folder: Path) -> None:
    """Flush every file of a folder, and the folder, to disk (a commit's files before its row is written)."""
    for entry in folder.iterdir():
        if entry.is_file():
            fsync_path(entry)
    fsync_dir(folder)

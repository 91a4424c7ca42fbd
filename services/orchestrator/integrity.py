"""A commit's files are checksummed when it is made and verified before they are used: the state and RAM
files whole (SHA-256), the frozen disk layer by size and the hash of its head (its qcow2 header and
tables), since hashing a whole disk on every restore would cost more than the restore."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from services.common.errors import DataLoss
from services.orchestrator.layout import Layout

HEAD_BYTES = 1 << 20


def file_digest(path: Path, limit: int | None = None) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        remaining = limit
        while chunk := source.read(min(8 << 20, remaining) if remaining is not None else 8 << 20):
            digest.update(chunk)
            if remaining is not None:
                remaining -= len(chunk)
                if remaining <= 0:
                    break
    return digest.hexdigest()


def _stat_key(path: Path) -> tuple[int, int, int, int]:
    stat = path.stat()
    return (stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


class Verifier:
    """Checks the files of the commits in one layout: hashes whole files the first time they are checked,
    and again only when their inode, size or times change."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self._verified: dict[Path, tuple[int, int, int, int]] = {}

    def checksums(self, commit_id: str, layer_id: str) -> dict[str, object]:
        """What the commit's files are (its folder's files and the disk layer it froze), to record with it."""
        folder, layer = self.layout.commit_folder(commit_id), self.layout.layer_file(layer_id)
        files = {path.name: {"size": path.stat().st_size, "sha256": file_digest(path)} for path in folder.iterdir()}
        for path in folder.iterdir():
            self._verified[path] = _stat_key(path)
        head = {"size": layer.stat().st_size, "head_sha256": file_digest(layer, HEAD_BYTES)}
        return {"files": files, "layer": head}

    def verify(self, commit_id: str, checksums: str, layer_id: str, in_store: bool = False) -> None:
        """DataLoss naming the file when one of the commit's is missing or does not match what was recorded: this
        host's copies, or with `in_store` those of the shared commit store (`vers admin fsck` reads them)."""
        if in_store:
            folder, layer = self.layout.store_commit_folder(commit_id), self.layout.store_layer_file(layer_id)
        else:
            folder, layer = self.layout.commit_folder(commit_id), self.layout.layer_file(layer_id)
        recorded = json.loads(checksums)
        for name, expected in recorded["files"].items():
            path = folder / name
            if not path.exists():
                raise DataLoss(f"commit {commit_id} is damaged: its {name} file is missing")
            key = _stat_key(path)
            if self._verified.get(path) == key:
                continue
            if path.stat().st_size != expected["size"] or file_digest(path) != expected["sha256"]:
                raise DataLoss(f"commit {commit_id} is damaged: its {name} file does not match its checksum")
            self._verified[path] = key
        if not layer.exists():
            raise DataLoss(f"commit {commit_id} is damaged: its disk layer is missing")
        expected_layer = recorded["layer"]
        if layer.stat().st_size != expected_layer["size"] or file_digest(layer, HEAD_BYTES) != expected_layer["head_sha256"]:
            raise DataLoss(f"commit {commit_id} is damaged: its disk layer does not match its checksum")

    def linked(self, commit_id: str) -> None:
        """The commit's folder was just made of hard links to another commit's files (a copy of that commit): a
        file verified under any of its names holds under all of them, though the new link moved its change
        time. Only a file whose inode, size and modification time are still those verified is taken as such."""
        for path in self.layout.commit_folder(commit_id).iterdir():
            key = _stat_key(path)
            names = [known for known, verified in list(self._verified.items()) if verified[:3] == key[:3]]
            if names:
                for name in (*names, path):
                    self._verified[name] = key

    def forget(self, commit_id: str) -> list[tuple[int, int, int, int]]:
        """The commit is being deleted, or its copies here dropped: what was known of its files goes (and is
        returned, for `unlinked` once they are gone)."""
        folders = {self.layout.commit_folder(commit_id)}
        if self.layout.store is not None:
            folders.add(self.layout.store_commit_folder(commit_id))
        gone = [path for path in self._verified if path.parent in folders]
        return [self._verified.pop(path) for path in gone]

    def unlinked(self, gone: list[tuple[int, int, int, int]]) -> None:
        """Names of verified files were removed (a deleted commit whose files other commits share, a fork's copy
        or its source): the other names' change time moved with it, their contents did not. A name whose inode,
        size and modification time are still those verified stays verified."""
        moved = {key[:3] for key in gone}
        for path, verified in list(self._verified.items()):
            if verified[:3] in moved:
                try:
                    key = _stat_key(path)
                except OSError:
                    continue
                if key[:3] == verified[:3]:
                    self._verified[path] = key

"""A commit's files are checksummed when it is made and verified before they are used: the state and RAM
files whole (SHA-256), the frozen disk layer by size and the hash of its head (its qcow2 header and
tables), since hashing a whole disk on every restore would cost more than the restore."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from services.common.errors import DataLoss

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
    """Hashes whole files the first time they are checked, and again only when their inode, size or
    times change."""

    def __init__(self) -> None:
        self._verified: dict[Path, tuple[int, int, int, int]] = {}

    def checksums(self, folder: Path, layer: Path) -> dict[str, object]:
        files = {path.name: {"size": path.stat().st_size, "sha256": file_digest(path)} for path in folder.iterdir()}
        for path in folder.iterdir():
            self._verified[path] = _stat_key(path)
        head = {"size": layer.stat().st_size, "head_sha256": file_digest(layer, HEAD_BYTES)}
        return {"files": files, "layer": head}

    def verify(self, commit_id: str, checksums: str, folder: Path, layer: Path) -> None:
        """DataLoss naming the file when one is missing or does not match what was recorded."""
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

    def forget(self, folder: Path) -> None:
        for path in [p for p in self._verified if p.parent == folder]:
            del self._verified[path]

"""Where commits are kept so that every VM host can branch them: the commit store (VERS_COMMIT_STORE).

A commit is two things: its folder (the memory file `ram` when the VM had one, the device state `state`) and its
disk, a chain of frozen qcow2 layers, each backed by the one under it, the lowest by an image's root disk. QEMU
runs a VM from files on its own host: the VM's writable layer (never in the store) stands on the commit's layers,
which must be there too, in the host's data folder (services.orchestrator.layout.Layout `layers/`, `commits/`).

The engine asks a store for six things, and a backend implements them as its medium allows:

- `publish`: a commit just made is written to the store, whole and durable, before its row is recorded (the
  commit call answers only after that): a host that fails a moment later loses nothing of it.
- `fetch`: a commit about to be branched or restored is made present on this host: its folder and every layer of
  its chain, copied from the store when this host lacks them (a host keeps what it copied: its cache).
- `link`: a commit is copied under a new id (a fork's), its files hard-linked rather than copied: the same files
  under a second name, which outlive the deletion of either name.
- `drop_cached`: this host's copies of a commit go (they did not match the commit's checksums), so the next
  `fetch` copies them again from the store.
- `delete_commit`, `delete_layer`: a deleted commit's folder, and a layer nothing stands on any more, go from
  the store and from this host; other hosts' copies go at their next start (their orphan cleanup).
- `stored` and `remove_orphans`: what the store holds, and removing what no row names (start-up cleanup, fsck).

Layers name their backing layer by a relative name (`<parent id>.qcow2`, in the same folder), so a chain works in
whichever folder it sits: the store's or a host's. Images' root disks are named by their absolute path (they are
at the same path on every host, VERS_IMAGES_DIR). Sleeping VMs' saved states and exec logs are never in the
store: a VM sleeps and wakes on its host.

Two backends are here: `LocalCommitStore` ("local": the data folder is the store, nothing is copied, as on one
machine) and `SharedPathCommitStore` (a POSIX folder every host mounts at the same path: NFS, CephFS). Another
backend (Ceph RBD, docs/ceph-rbd.md) implements the same `CommitStore` protocol."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from services.common.errors import DataLoss
from services.common.files import fsync_dir, fsync_path, write_atomic
from services.orchestrator.layout import Layout
from services.orchestrator.machine import copy_sparse

# A file or folder being written into the store or a host's cache has this in its name until it is complete.
PART = ".part-"
# A partial write older than this was left by a writer that stopped (a crash, a host gone): it is removed.
# No copy of a commit takes a day; a younger one may belong to another host's publish under way.
STALE_PART_SECONDS = 24 * 3600
# Written last into a commit's folder in a shared store: the commit's checksums (the same as its row's), so the
# store's files can be checked without the database.
CHECKSUMS_FILE = "checksums.json"


@dataclass(frozen=True)
class Stored:
    """What a store holds: the ids of its commit folders and of its layers (partial writes left out)."""

    commits: frozenset[str]
    layers: frozenset[str]


class CommitStore(Protocol):
    """The operations the engine needs of a commit store. All are blocking (the engine runs them in a thread),
    take ids (not paths: a backend keeps its files as it likes), and are safe to call from several hosts and
    several threads of one host at once. `shared` is False when the store is this host's data folder itself."""

    shared: bool

    def describe(self) -> str:
        """Where the store is, for messages (a path, a pool name)."""
        ...

    def prepare(self) -> None:
        """Ready the store when the orchestrator starts; RuntimeError saying what to fix when it cannot be used
        (not mounted, not writable)."""
        ...

    def publish(self, commit_id: str, layer_ids: Sequence[str], checksums: str) -> None:
        """Write the commit to the store from this host's files, durably, before the caller records it.
        `layer_ids` is its disk chain, top first: `layer_ids[0]` is the layer the commit froze, always written
        (replacing any partial or stale copy); the layers under it are written only when the store lacks them
        (they were frozen, hence published, before). `checksums` is what the commit's row records (JSON).
        When it returns, the layers and the commit's folder are complete in the store and flushed to stable
        storage, each one appearing under its name at once, whole (never half written). Raises OSError."""
        ...

    def fetch(self, commit_id: str, layer_ids: Sequence[str]) -> bool:
        """Make the commit's folder and every layer of `layer_ids` (its chain, top first) present on this host
        (Layout.commit_folder, Layout.layer_file), copying from the store what is missing. Each copy appears
        under its name at once, whole; two fetches of the same files at once (threads or processes) both
        succeed. True when anything was copied. Raises DataLoss naming what is neither here nor in the store."""
        ...

    def link(self, source_id: str, commit_id: str) -> bool:
        """The folder of commit `source_id` again as the folder of `commit_id` (its layers are shared: rows name
        them), in the store and on this host, as hard links of its files: no byte is copied, and each name keeps
        the files whole whatever becomes of the other. Durable when it returns, each folder appearing whole under
        its name; a folder already there (a copy a crash cut short after it appeared) is kept, being the same
        files. True when this host has the copy too (a shared store's host may not have the source: a restore
        then copies the new one in). Raises DataLoss when the source's files are not in the store."""
        ...

    def drop_cached(self, commit_id: str, layer_id: str) -> None:
        """This host's copies of the commit's folder and of the layer it froze go (they did not match the
        commit's checksums), so that the next `fetch` copies them from the store again; a store that is this
        host's data folder keeps them (they are its only copies)."""
        ...

    def delete_commit(self, commit_id: str) -> None:
        """The commit's folder goes, from the store and from this host (its layers are deleted by the layer
        collection, when nothing stands on them). Gone already is fine."""
        ...

    def delete_layer(self, layer_id: str) -> None:
        """The layer goes, from the store and from this host: no VM or commit stands on it any more. Gone
        already is fine."""
        ...

    def folder_bytes(self, commit_id: str) -> int:
        """Bytes the commit's folder takes in the store (0 when it is not there)."""
        ...

    def layer_bytes(self, layer_id: str) -> int:
        """Bytes the layer takes in the store (0 when it is not there)."""
        ...

    def stored(self) -> Stored:
        """The commit folders and layers in the store (for the start-up cleanup and `vers admin fsck`)."""
        ...

    def remove_orphans(self, listed: Stored, commits: Iterable[str], layers: Iterable[str]) -> list[str]:
        """Remove from the store what `listed` (an earlier `stored()`) holds and no row names: commit folders not
        in `commits`, layers not in `layers`; and partial writes older than STALE_PART_SECONDS. The caller lists
        the store before it reads the rows it passes, and passes every id any host's rows and operations in
        flight name: what another host publishes meanwhile is either not listed or named by its operation.
        Returns what was removed, for the log. The data folder's files are the engine's to clean."""
        ...


class LocalCommitStore:
    """The data folder is the store ("local", one host): a commit's files are already where they are kept,
    so nothing is copied; deletions remove the data folder's files, as they always did."""

    shared = False

    def __init__(self, layout: Layout) -> None:
        self.layout = layout

    def describe(self) -> str:
        return str(self.layout.data)

    def prepare(self) -> None:
        return None  # the engine makes the data folder's folders

    def publish(self, commit_id: str, layer_ids: Sequence[str], checksums: str) -> None:
        return None  # the engine flushed the files where they stay

    def fetch(self, commit_id: str, layer_ids: Sequence[str]) -> bool:
        return False  # a missing file is reported by the checksum check, which names it

    def link(self, source_id: str, commit_id: str) -> bool:
        _link_folder(_existing_folder(self.layout.commit_folder(source_id), source_id), self.layout.commit_folder(commit_id))
        return True

    def drop_cached(self, commit_id: str, layer_id: str) -> None:
        return None  # the only copies: kept for an operator to look at

    def delete_commit(self, commit_id: str) -> None:
        shutil.rmtree(self.layout.commit_folder(commit_id), ignore_errors=True)

    def delete_layer(self, layer_id: str) -> None:
        self.layout.layer_file(layer_id).unlink(missing_ok=True)

    def folder_bytes(self, commit_id: str) -> int:
        return _folder_bytes(self.layout.commit_folder(commit_id))

    def layer_bytes(self, layer_id: str) -> int:
        return _allocated(self.layout.layer_file(layer_id))

    def stored(self) -> Stored:
        return Stored(frozenset(_entries(self.layout.commits)), frozenset(_layer_ids(self.layout.layers)))

    def remove_orphans(self, listed: Stored, commits: Iterable[str], layers: Iterable[str]) -> list[str]:
        return []  # the data folder is cleaned by the engine, which knows its VMs' files too


class SharedPathCommitStore:
    """A POSIX folder every host mounts at the same path (NFS, CephFS): `<store>/layers/<id>.qcow2` and
    `<store>/commits/<id>/`. Files are written under a partial name, flushed, renamed into place, and the folder
    flushed: a name in the store is always a whole file. Each host keeps the copies it made or fetched in its
    data folder (its cache), which is what its QEMU processes open."""

    shared = True

    def __init__(self, layout: Layout) -> None:
        assert layout.store is not None
        self.layout = layout

    def describe(self) -> str:
        return str(self.layout.store)

    def prepare(self) -> None:
        """The store's folder must be there (mounted) and writable; its `layers/`, `commits/` and `org-images/`
        are made."""
        root = self.layout.store
        assert root is not None
        if not root.is_dir():
            raise RuntimeError(
                f"the commit store {root} (VERS_COMMIT_STORE) is not a folder: mount the shared folder there on every host, "
                f"or set VERS_COMMIT_STORE=local for a single host"
            )
        for folder in (self.layout.store_layers, self.layout.store_commits, self.layout.org_images):
            folder.mkdir(mode=0o700, exist_ok=True)
        if not os.access(self.layout.store_commits, os.W_OK | os.X_OK):
            raise RuntimeError(f"the commit store {root} (VERS_COMMIT_STORE) is not writable by this process (uid {os.geteuid()})")

    def publish(self, commit_id: str, layer_ids: Sequence[str], checksums: str) -> None:
        frozen, *under = layer_ids
        for layer_id in reversed(under):  # lowest first: a layer in the store always has the ones under it there
            if not self.layout.store_layer_file(layer_id).exists():
                _put_file(self.layout.layer_file(layer_id), self.layout.store_layer_file(layer_id), replace=False)
        _put_file(self.layout.layer_file(frozen), self.layout.store_layer_file(frozen), replace=True)
        _put_folder(self.layout.commit_folder(commit_id), self.layout.store_commit_folder(commit_id), {CHECKSUMS_FILE: checksums})

    def fetch(self, commit_id: str, layer_ids: Sequence[str]) -> bool:
        copied = False
        for layer_id in reversed(layer_ids):
            local, kept = self.layout.layer_file(layer_id), self.layout.store_layer_file(layer_id)
            if local.exists():
                continue
            if not kept.exists():
                raise DataLoss(
                    f"commit {commit_id} cannot be used here: its disk layer {layer_id} is neither on this host ({local}) nor in "
                    f"the commit store ({kept}); it was made before the store was shared, or the store lost it"
                )
            _copy_in(kept, local)
            copied = True
        folder, kept = self.layout.commit_folder(commit_id), self.layout.store_commit_folder(commit_id)
        if not folder.exists():
            if not kept.is_dir():
                raise DataLoss(
                    f"commit {commit_id} cannot be used here: its memory and device state are neither on this host ({folder}) "
                    f"nor in the commit store ({kept})"
                )
            _copy_folder_in(kept, folder)
            copied = True
        return copied

    def link(self, source_id: str, commit_id: str) -> bool:
        kept = _existing_folder(self.layout.store_commit_folder(source_id), source_id)
        _link_folder(kept, self.layout.store_commit_folder(commit_id))  # its checksums file too: the copy's are the same
        try:
            _link_folder(self.layout.commit_folder(source_id), self.layout.commit_folder(commit_id))
        except FileNotFoundError:
            return False  # this host has no copy of the source (or let it go meanwhile)
        return True

    def drop_cached(self, commit_id: str, layer_id: str) -> None:
        shutil.rmtree(self.layout.commit_folder(commit_id), ignore_errors=True)
        self.layout.layer_file(layer_id).unlink(missing_ok=True)

    def delete_commit(self, commit_id: str) -> None:
        _remove_durably(self.layout.store_commit_folder(commit_id))
        shutil.rmtree(self.layout.commit_folder(commit_id), ignore_errors=True)

    def delete_layer(self, layer_id: str) -> None:
        _remove_durably(self.layout.store_layer_file(layer_id))
        self.layout.layer_file(layer_id).unlink(missing_ok=True)

    def folder_bytes(self, commit_id: str) -> int:
        return _folder_bytes(self.layout.store_commit_folder(commit_id))

    def layer_bytes(self, layer_id: str) -> int:
        return _allocated(self.layout.store_layer_file(layer_id))

    def stored(self) -> Stored:
        return Stored(frozenset(_entries(self.layout.store_commits)), frozenset(_layer_ids(self.layout.store_layers)))

    def remove_orphans(self, listed: Stored, commits: Iterable[str], layers: Iterable[str]) -> list[str]:
        removed = [self.layout.store_commit_folder(commit_id) for commit_id in sorted(listed.commits - set(commits))]
        removed += [self.layout.store_layer_file(layer_id) for layer_id in sorted(listed.layers - set(layers))]
        for folder in (self.layout.store_commits, self.layout.store_layers):
            removed += [path for path in _listing(folder) if PART in path.name and _age(path) > STALE_PART_SECONDS]
        for path in removed:
            _remove_durably(path)
        return [str(path) for path in removed]


def open_commit_store(layout: Layout) -> CommitStore:
    """The store VERS_COMMIT_STORE names, as the layout has it."""
    return SharedPathCommitStore(layout) if layout.store is not None else LocalCommitStore(layout)


# Files


def _part_name(path: Path) -> Path:
    return path.with_name(f"{path.name}{PART}{uuid.uuid4().hex[:12]}")


def _put_file(source: Path, target: Path, replace: bool) -> None:
    """`source` copied to `target` in the store durably: a partial name, flushed, renamed, the folder flushed."""
    partial = _part_name(target)
    try:
        copy_sparse(source, partial)
        partial.chmod(0o400)
        fsync_path(partial)
        if replace:
            os.replace(partial, target)
        else:
            _link_once(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    fsync_dir(target.parent)


def _put_folder(source: Path, target: Path, extra: dict[str, str]) -> None:
    """The files of `source` (and `extra` ones, written last) as the folder `target`, durably. A folder already
    there (a publish a crash cut after its rename) is replaced."""
    partial = _part_name(target)
    try:
        partial.mkdir(mode=0o700)
        for path in sorted(source.iterdir()):
            copy_sparse(path, partial / path.name)
            (partial / path.name).chmod(0o400)
            fsync_path(partial / path.name)
        for name, text in extra.items():
            write_atomic(partial / name, text, 0o400)
        fsync_dir(partial)
        if target.exists():
            _remove_durably(target)
        os.rename(partial, target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    fsync_dir(target.parent)


def _copy_in(source: Path, target: Path) -> None:
    """A store file copied into this host's cache: whole under its name or not at all; a copy another fetch
    made meanwhile is kept."""
    partial = _part_name(target)
    try:
        copy_sparse(source, partial)
        partial.chmod(0o400)
        fsync_path(partial)
        _link_once(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def _copy_folder_in(source: Path, target: Path) -> None:
    partial = _part_name(target)
    try:
        partial.mkdir(mode=0o700)
        for path in sorted(source.iterdir()):
            if PART not in path.name:
                copy_sparse(path, partial / path.name)
                (partial / path.name).chmod(0o400)
                fsync_path(partial / path.name)
        fsync_dir(partial)
        try:
            os.rename(partial, target)
        except OSError:
            if not target.is_dir():  # not another fetch's copy that came first
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _existing_folder(folder: Path, commit_id: str) -> Path:
    if not folder.is_dir():
        raise DataLoss(f"commit {commit_id} cannot be copied: its memory and device state are missing ({folder})")
    return folder


def _link_folder(source: Path, target: Path) -> None:
    """The files of `source` as the folder `target`, each a hard link (the same file under a second name),
    durably: linked under a partial name, flushed, renamed. A folder already there is kept (the same files)."""
    if target.is_dir():
        return
    partial = _part_name(target)
    try:
        partial.mkdir(mode=0o700)
        for path in sorted(source.iterdir()):
            if PART not in path.name:
                os.link(path, partial / path.name)
        fsync_dir(partial)
        try:
            os.rename(partial, target)
        except OSError:
            if not target.is_dir():  # not a copy that came first
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    fsync_dir(target.parent)


def _link_once(partial: Path, target: Path) -> None:
    """`partial` under the name `target`, unless a whole copy is already there (link, unlike rename, never
    replaces a file a QEMU may have open)."""
    with contextlib.suppress(FileExistsError):
        os.link(partial, target)


def _remove_durably(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    if path.parent.is_dir():
        fsync_dir(path.parent)


def _listing(folder: Path) -> list[Path]:
    return sorted(folder.iterdir()) if folder.is_dir() else []


def _entries(folder: Path) -> list[str]:
    return [path.name for path in _listing(folder) if path.is_dir() and PART not in path.name]


def _layer_ids(folder: Path) -> list[str]:
    return [path.stem for path in _listing(folder) if path.suffix == ".qcow2" and PART not in path.name]


def _allocated(path: Path) -> int:
    """Bytes a file takes on disk; 0 when it is not there (removed by a deletion under way)."""
    try:
        return path.stat().st_blocks * 512
    except FileNotFoundError:
        return 0


def _folder_bytes(folder: Path) -> int:
    return sum(_allocated(path) for path in _listing(folder)) if folder.is_dir() else 0


def _age(path: Path) -> float:
    try:
        return time.time() - path.lstat().st_mtime
    except OSError:
        return 0.0

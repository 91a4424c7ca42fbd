"""A commit copied under a new id (a fork's), on files without VMs: the copy's folder is hard links of the
source's, in the shared store and on a host that has the source; either outlives the other's deletion; and
what the verifier knew of the source's files holds for the copy's, so the copy is not hashed again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.common.errors import DataLoss
from services.orchestrator import integrity
from services.orchestrator.commitstore import CHECKSUMS_FILE, LocalCommitStore
from services.orchestrator.integrity import Verifier
from tests.test_commit_store import base, host, make_commit, shared_hosts

__all__ = ["base"]  # the fixture, used by name


def inode(path: Path) -> int:
    return path.stat().st_ino


def test_a_copy_in_a_shared_store_is_the_same_files_and_outlives_its_source(tmp_path: Path, base: Path) -> None:
    a, b, shared_a, shared_b = shared_hosts(tmp_path)
    commit_id, chain = make_commit(a, base)
    shared_a.publish(commit_id, chain, '{"files": {}}')
    ram = (a.commit_folder(commit_id) / "ram").read_bytes()

    assert shared_a.link(commit_id, "copy-a") is True
    for name in ("state", "ram", CHECKSUMS_FILE):
        assert inode(a.store_commit_folder("copy-a") / name) == inode(a.store_commit_folder(commit_id) / name)
    for name in ("state", "ram"):
        assert inode(a.commit_folder("copy-a") / name) == inode(a.commit_folder(commit_id) / name)
    assert shared_a.link(commit_id, "copy-a") is True, "a copy already there is kept"
    # a host without the source's files copies in the store alone; a restore there fetches the copy
    assert shared_b.link(commit_id, "copy-b") is False
    assert not b.commit_folder("copy-b").exists() and shared_b.fetch("copy-b", chain) is True

    shared_a.delete_commit(commit_id)
    assert not a.store_commit_folder(commit_id).exists()
    assert (a.store_commit_folder("copy-a") / "ram").read_bytes() == ram
    assert (a.commit_folder("copy-a") / "ram").read_bytes() == ram
    assert json.loads((a.store_commit_folder("copy-a") / CHECKSUMS_FILE).read_text()) == {"files": {}}
    with pytest.raises(DataLoss, match="cannot be copied"):
        shared_a.link(commit_id, "copy-c")
    assert not a.store_commit_folder("copy-c").exists()


def test_a_local_copy_and_its_source_each_outlive_the_other(tmp_path: Path, base: Path) -> None:
    a = host(tmp_path, "host-a", None)
    local = LocalCommitStore(a)
    commit_id, _ = make_commit(a, base)
    state = (a.commit_folder(commit_id) / "state").read_bytes()
    assert local.link(commit_id, "copy") is True
    local.delete_commit("copy")
    assert (a.commit_folder(commit_id) / "state").read_bytes() == state
    assert local.link(commit_id, "copy") is True
    local.delete_commit(commit_id)
    assert (a.commit_folder("copy") / "state").read_bytes() == state
    with pytest.raises(DataLoss, match="cannot be copied"):
        local.link(commit_id, "another")


def test_the_verifier_takes_a_linked_copy_as_verified_and_still_checks_it(
    tmp_path: Path, base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = host(tmp_path, "host-a", None)
    commit_id, chain = make_commit(a, base)
    verifier = Verifier(a)
    checksums = json.dumps(verifier.checksums(commit_id, chain[0]))
    LocalCommitStore(a).link(commit_id, "copy")
    verifier.linked("copy")
    whole: list[Path] = []
    digest = integrity.file_digest

    def counted(path: Path, limit: int | None = None) -> str:
        if limit is None:
            whole.append(path)
        return digest(path, limit)

    monkeypatch.setattr(integrity, "file_digest", counted)
    verifier.verify("copy", checksums, chain[0])
    verifier.verify(commit_id, checksums, chain[0])
    assert whole == [], "files verified under another name are hashed again"
    # deleting the copy moves the source's files' change time, not their contents: they stay verified
    gone = verifier.forget("copy")
    LocalCommitStore(a).delete_commit("copy")
    verifier.unlinked(gone)
    verifier.verify(commit_id, checksums, chain[0])
    assert whole == [], "the source is hashed again after its copy was deleted"
    LocalCommitStore(a).link(commit_id, "copy")
    verifier.linked("copy")
    # a file changed since is hashed, and refused
    (a.commit_folder("copy") / "state").chmod(0o600)
    (a.commit_folder("copy") / "state").write_bytes(b"changed")
    with pytest.raises(DataLoss, match="state file does not match"):
        verifier.verify(commit_id, checksums, chain[0])

"""The one writer of files the platform relies on: a crash or an error never leaves a torn file, a wider
mode, or a stray temporary file behind."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from services.common.files import write_atomic


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_mode_is_right_from_the_first_byte(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A key file must never exist, even as a temporary, with a wider mode than asked."""
    seen: list[int] = []
    real_fsync = os.fsync

    def spying_fsync(fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            seen.append(stat.S_IMODE(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spying_fsync)
    key = tmp_path / "keys" / "secret.key"
    write_atomic(key, "token\n", 0o600)
    assert key.read_text() == "token\n"
    assert _mode(key) == 0o600
    assert seen == [0o600]  # the temporary, once its data is written and before it is renamed

    old_umask = os.umask(0o077)  # the mode asked for is the mode given, whatever the umask
    try:
        write_atomic(tmp_path / "index.json", "{}", 0o644)
    finally:
        os.umask(old_umask)
    assert _mode(tmp_path / "index.json") == 0o644


def test_exclusive_keeps_the_first_file(tmp_path: Path) -> None:
    target = tmp_path / "first-org.key"
    assert write_atomic(target, "first\n", 0o600, exclusive=True) is True
    assert write_atomic(target, "second\n", 0o600, exclusive=True) is False
    assert target.read_text() == "first\n"
    assert _mode(target) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first-org.key"]


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_a_failure_mid_write_leaves_the_old_content_and_no_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str) -> None:
    """The disk failing while the data is flushed, or the rename failing: readers still see the old file."""
    target = tmp_path / "manifest.json"
    write_atomic(target, '{"version": 1}')

    def broken(*_args: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, failing, broken)
    with pytest.raises(OSError, match="Input/output error"):
        write_atomic(target, '{"version": 2}')
    monkeypatch.undo()
    assert target.read_text() == '{"version": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_the_folder_holds_no_leftovers(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    for version in range(20):
        write_atomic(target, f'{{"version": {version}}}', 0o600)
    write_atomic(tmp_path / "index.json", b"{}")
    assert target.read_text() == '{"version": 19}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.json", "state.json"]

"""The end-of-session marker the guest prints when its console shell exits, found however reads split it."""

from __future__ import annotations

import pytest

from services.orchestrator.console import CLOSED_MARKER, MarkerScanner


@pytest.mark.parametrize("cut", range(1, len(CLOSED_MARKER)))
def test_marker_split_across_reads_ends_the_session_and_keeps_output(cut: int) -> None:
    scanner = MarkerScanner()
    stream = b"logout\r\n" + CLOSED_MARKER + b"next prompt"
    at = len(b"logout\r\n") + cut
    first, closed_early = scanner.feed(stream[:at])
    rest, closed = scanner.feed(stream[at:])
    assert (closed_early, closed) == (False, True)
    assert first + rest == b"logout\r\n"


def test_text_like_the_marker_start_is_not_held_forever() -> None:
    scanner = MarkerScanner()
    held, _ = scanner.feed(b"abc\x1b]")
    assert held == b"abc"
    more, closed = scanner.feed(b"0;title\x07")
    assert (more, closed) == (b"\x1b]0;title\x07", False)

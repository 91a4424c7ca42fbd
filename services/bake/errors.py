"""How a bake reports: log lines as it goes, one BakeError that says which step failed and why."""

from __future__ import annotations

from collections.abc import Callable

Log = Callable[[str], None]


class BakeError(Exception):
    """A bake failed; the message says which step and why."""

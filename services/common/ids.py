"""Identifiers: every VM, commit, domain, saga and exec is named by a UUID in its canonical form."""

from __future__ import annotations

import re

_CANONICAL = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def is_uuid(text: str) -> bool:
    """True for a UUID written as 8-4-4-4-12 hex digits, the only form the platform gives out: an ID is then
    looked up, anything else is a name (an alias, a tag) or a mistake."""
    return bool(_CANONICAL.fullmatch(text))

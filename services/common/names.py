"""The documented name rules: repositories 1-64, tags 1-128 characters of A-Z, a-z, 0-9, '.', '_', '-'."""

from __future__ import annotations

import re

from services.common.errors import InvalidName

_ALLOWED = "A-Z, a-z, 0-9, '.', '_' and '-'"
_PATTERNS = {64: re.compile(r"[A-Za-z0-9._-]{1,64}"), 128: re.compile(r"[A-Za-z0-9._-]{1,128}")}

ORG_NAME_MAX = 64
REPO_NAME_MAX = 64
TAG_NAME_MAX = 128


def validate_name(kind: str, name: str, max_length: int) -> str:
    """Return `name` if it follows the rule for `kind`, else raise InvalidName saying what the rule is."""
    if _PATTERNS[max_length].fullmatch(name):
        return name
    if not name:
        problem = "is empty"
    elif len(name) > max_length:
        problem = f"is {len(name)} characters long"
    else:
        bad = sorted({c for c in name if not re.fullmatch(r"[A-Za-z0-9._-]", c)})
        problem = "contains " + ", ".join(repr(c) for c in bad)
    raise InvalidName(f"{kind} name {name!r} {problem}: use 1-{max_length} characters of {_ALLOWED}")


def validate_org_name(name: str) -> str:
    return validate_name("organization", name, ORG_NAME_MAX)


def validate_repo_name(name: str) -> str:
    return validate_name("repository", name, REPO_NAME_MAX)


def validate_tag_name(name: str) -> str:
    return validate_name("tag", name, TAG_NAME_MAX)


def normalize_host(host: str) -> str:
    """A Host header as a name: lowercase, without its port or a final dot (the gateway and the orchestrator
    read domains' hosts alike)."""
    host = host.strip().lower()
    if host.startswith("[") and "]" in host:
        return host[: host.index("]") + 1]  # an IPv6 address, never a domain
    name, colon, port = host.partition(":")
    if colon and port.isdigit():
        host = name
    return host.rstrip(".")


def normalize_suffix(suffix: str) -> str:
    """VERS_DOMAIN_SUFFIX as compared: lowercase, no dots at either end."""
    return suffix.strip().strip(".").lower()

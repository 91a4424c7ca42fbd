"""The documented name rules (repositories 1-64, tags 1-128 characters of A-Z, a-z, 0-9, '.', '_', '-', never
only dots, which a path would read as `.` or `..`), and the length limits of the free text a request stores."""

from __future__ import annotations

import re

from services.common.errors import InvalidArgument, InvalidName
from services.common.ids import is_uuid

_ALLOWED = "A-Z, a-z, 0-9, '.', '_' and '-'"
_PATTERNS = {64: re.compile(r"[A-Za-z0-9._-]{1,64}"), 128: re.compile(r"[A-Za-z0-9._-]{1,128}")}

ORG_NAME_MAX = 64
REPO_NAME_MAX = 64
TAG_NAME_MAX = 128


def validate_name(kind: str, name: str, max_length: int) -> str:
    """Return `name` if it follows the rule for `kind`, else raise InvalidName saying what the rule is."""
    if _PATTERNS[max_length].fullmatch(name) and name.strip("."):
        return name
    if name and not name.strip(".") and len(name) <= max_length:
        raise InvalidName(
            f"{kind} name {name!r} is only dots, which paths read as the folder itself or its parent: use "
            f"1-{max_length} characters of {_ALLOWED}, at least one of them not a dot"
        )
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


# Free text a request stores: descriptions up to 4 KiB, shorter where the text is a name or a label.
DESCRIPTION_MAX_BYTES = 4096
# A commit's description may say more: a baked image's lists every Debian and npm package version in it.
COMMIT_DESCRIPTION_MAX_BYTES = 64 * 1024
COMMIT_NAME_MAX = 256
KEY_LABEL_MAX = 128
VM_LABELS_MAX = 64
VM_LABEL_KEY_MAX = 128
VM_LABEL_VALUE_MAX_BYTES = 1024


def validate_text(field: str, value: str, max_bytes: int = DESCRIPTION_MAX_BYTES) -> str:
    """Return `value` if its UTF-8 form fits in `max_bytes`, else InvalidArgument naming the field and the limit."""
    size = len(value.encode())
    if size > max_bytes:
        raise InvalidArgument(f"{field} is {size} bytes long: it may be at most {max_bytes} bytes (UTF-8); shorten it")
    return value


def validate_label(field: str, value: str, max_length: int) -> str:
    """A short free-text name (a key's label, a commit's name): at most `max_length` characters."""
    if len(value) > max_length:
        raise InvalidArgument(f"{field} is {len(value)} characters long: it may be at most {max_length} characters; shorten it")
    return value


def validate_vm_labels(labels: dict[str, str]) -> dict[str, str]:
    if len(labels) > VM_LABELS_MAX:
        raise InvalidArgument(f"labels has {len(labels)} entries: a VM may have at most {VM_LABELS_MAX} labels")
    for key, value in labels.items():
        if not key:
            raise InvalidArgument("labels: a label's key may not be empty")
        validate_label(f"label key {key[:40]!r}", key, VM_LABEL_KEY_MAX)
        validate_text(f"label {key!r}", value, VM_LABEL_VALUE_MAX_BYTES)
    return labels


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


def require_uuid(value: str, what: str, hint: str = "") -> str:
    """`value` if it is an ID as the platform gives them out (a UUID, 8-4-4-4-12 hex digits), else InvalidArgument."""
    if not is_uuid(value):
        raise InvalidArgument(f"{what} {value[:64]!r} is not a valid ID (a UUID){hint}")
    return value.lower()

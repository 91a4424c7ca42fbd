"""Pages of a list (AIP-158): `page_size` with a default and a maximum, and an opaque `page_token` that names
where the next page starts and which list it belongs to, so a token of another list is refused."""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from typing import TypeVar

from services.common.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000

T = TypeVar("T")


def _scope_digest(scope: str) -> str:
    return hashlib.sha256(scope.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Page:
    """One page of the list `scope` (e.g. "repositories:<org_id>"): rows [offset, offset + size)."""

    scope: str
    size: int
    offset: int

    @classmethod
    def of(cls, scope: str, page_size: int, page_token: str) -> Page:
        if page_size < 0 or page_size > MAX_PAGE_SIZE:
            raise InvalidArgument(
                f"page_size must be between 1 and {MAX_PAGE_SIZE} ({DEFAULT_PAGE_SIZE} when 0 or left out), not {page_size}"
            )
        return cls(scope, page_size or DEFAULT_PAGE_SIZE, cls._offset(scope, page_token))

    @staticmethod
    def _offset(scope: str, token: str) -> int:
        if not token:
            return 0
        try:
            data = json.loads(base64.urlsafe_b64decode(token.encode() + b"=" * (-len(token) % 4)))
            offset, digest = data["o"], data["s"]
        except (ValueError, TypeError, KeyError):
            raise InvalidArgument("page_token is not one this list gave: pass next_page_token of its previous answer as it was") from None
        if not isinstance(offset, int) or not 0 <= offset < 2**31 or digest != _scope_digest(scope):
            raise InvalidArgument("page_token belongs to another list (or to other filters): start again without it")
        return offset

    @property
    def fetch(self) -> int:
        """Rows to ask the database for: one more than the page, to know whether another page follows."""
        return self.size + 1

    def cut(self, rows: list[T]) -> tuple[list[T], str]:
        """The page's rows and the token of the next page ("" when this is the last)."""
        if len(rows) <= self.size:
            return rows, ""
        data = json.dumps({"o": self.offset + self.size, "s": _scope_digest(self.scope)}, separators=(",", ":"))
        return rows[: self.size], base64.urlsafe_b64encode(data.encode()).decode().rstrip("=")

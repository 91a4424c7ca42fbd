"""The audit log: every change a service makes for an org is recorded in that service's own database, in the
transaction that makes the change (so a change is never without its entry, nor an entry without its change).
The registry answers `GET /api/v1/audit` by merging its own entries with the tagging service's and the
orchestrator's, oldest first. Entries are append-only: on SQLite the database refuses to update or delete one
(triggers its migrations make, services/common/migrations.py)."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from sqlmodel import Field, SQLModel, col, or_, select
from sqlmodel.ext.asyncio.session import AsyncSession

from services.common.auth import acting_key_id
from services.common.db import Database, time_column
from services.common.errors import InvalidArgument
from services.common.paging import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from services.common.timestamps import as_utc, utcnow
from vers.common.v1 import governance_pb2


class AuditEventRow(SQLModel, table=True):
    __tablename__ = "audit_events"

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = Field(default_factory=utcnow, sa_column=time_column())
    org_id: str = Field(index=True)
    api_key_id: str = ""
    type: str = Field(index=True)
    target: str = ""
    before: str = ""
    after: str = ""


def _json(value: Any) -> str:
    if value is None or value == "":
        return ""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def record(
    session: AsyncSession, org_id: str, type: str, target: str, before: Any = None, after: Any = None, key_id: str | None = None
) -> None:
    """Add the entry to the transaction of `session`. Who made the change is `key_id` when given (a change
    finished later, for the key that asked), else the caller of this call when it acts for `org_id`, else
    none (the platform itself, e.g. a scheduled collection)."""
    if key_id is None:
        key_id = acting_key_id(org_id)
    session.add(AuditEventRow(org_id=org_id, api_key_id=key_id, type=type, target=target, before=_json(before), after=_json(after)))


_TYPE = re.compile(r"[a-z_]{1,32}(\.[a-z_]{1,32})?")


class _ListRequest(Protocol):
    since: str
    type: str
    page_size: int
    page_token: str


@dataclass(frozen=True)
class AuditQuery:
    """One page of an org's audit log, as asked of the registry and passed on to each service as it is."""

    org_id: str
    since: datetime | None
    type: str
    size: int
    # The last entry of the previous page: (time, service, sequence); None for the first page.
    after: tuple[datetime, str, int] | None

    @classmethod
    def of(cls, org_id: str, request: _ListRequest) -> AuditQuery:
        if request.page_size < 0 or request.page_size > MAX_PAGE_SIZE:
            raise InvalidArgument(
                f"page_size must be between 1 and {MAX_PAGE_SIZE} ({DEFAULT_PAGE_SIZE} when 0 or left out), not {request.page_size}"
            )
        since = None
        if request.since:
            try:
                since = as_utc(datetime.fromisoformat(request.since.replace("Z", "+00:00").replace("z", "+00:00")))
            except ValueError:
                raise InvalidArgument(f"since must be a time in RFC 3339 (2026-11-27T10:00:00Z), not {request.since!r}") from None
        if request.type and not _TYPE.fullmatch(request.type):
            raise InvalidArgument(f"type must be an event type (tag.move) or a family (tag), not {request.type!r}")
        query = cls(org_id, since, request.type, request.page_size or DEFAULT_PAGE_SIZE, None)
        return query if not request.page_token else query._resume(request.page_token)

    def _scope(self) -> str:
        scope = f"audit:{self.org_id}:{self.since.isoformat() if self.since else ''}:{self.type}"
        return hashlib.sha256(scope.encode()).hexdigest()[:16]

    def _resume(self, token: str) -> AuditQuery:
        try:
            data = json.loads(base64.urlsafe_b64decode(token.encode() + b"=" * (-len(token) % 4)))
            after = (as_utc(datetime.fromisoformat(data["t"])), str(data["v"]), int(data["n"]))
            scope = data["s"]
        except (ValueError, TypeError, KeyError, OverflowError):
            raise InvalidArgument("page_token is not one this list gave: pass next_page_token of its previous answer as it was") from None
        if scope != self._scope():
            raise InvalidArgument("page_token belongs to another list (or to other filters): start again without it")
        return AuditQuery(self.org_id, self.since, self.type, self.size, after)

    def token_after(self, event: governance_pb2.AuditEvent) -> str:
        service, _, sequence = event.event_id.rpartition("-")
        data = {"t": event.at, "v": service, "n": int(sequence), "s": self._scope()}
        return base64.urlsafe_b64encode(json.dumps(data, separators=(",", ":")).encode()).decode().rstrip("=")


def sort_key(event: governance_pb2.AuditEvent) -> tuple[datetime, str, int]:
    service, _, sequence = event.event_id.rpartition("-")
    return (datetime.fromisoformat(event.at), service, int(sequence))


async def list_events(db: Database, service: str, query: AuditQuery) -> list[governance_pb2.AuditEvent]:
    """This service's entries of the page: at most `query.size`, oldest first, after the previous page's last."""
    statement = select(AuditEventRow).where(AuditEventRow.org_id == query.org_id)
    if query.since is not None:
        statement = statement.where(col(AuditEventRow.at) >= query.since)
    if query.type:
        kind = AuditEventRow.type
        statement = statement.where(
            kind == query.type if "." in query.type else or_(kind == query.type, col(kind).startswith(f"{query.type}.", autoescape=True))
        )
    if query.after is not None:
        at, after_service, sequence = query.after
        if service > after_service:
            statement = statement.where(col(AuditEventRow.at) >= at)
        elif service == after_service:
            statement = statement.where(or_(col(AuditEventRow.at) > at, (col(AuditEventRow.at) == at) & (col(AuditEventRow.id) > sequence)))
        else:
            statement = statement.where(col(AuditEventRow.at) > at)
    statement = statement.order_by(col(AuditEventRow.at), col(AuditEventRow.id)).limit(query.size)
    async with db.read() as session:
        rows = list(await session.exec(statement))
    return [
        governance_pb2.AuditEvent(
            event_id=f"{service}-{row.id}", at=as_utc(row.at).isoformat(timespec="microseconds"), org_id=row.org_id,
            api_key_id=row.api_key_id, type=row.type, target=row.target, before=row.before, after=row.after,
        )
        for row in rows
    ]  # fmt: skip


async def service_page(db: Database, service: str, org_id: str, request: _ListRequest) -> tuple[list[governance_pb2.AuditEvent], str]:
    """One service's page for the registry's merge (its internal ListAuditEvents): the events, and the next
    page's token when the page is full."""
    query = AuditQuery.of(org_id, request)
    events = await list_events(db, service, query)
    return events, query.token_after(events[-1]) if len(events) == query.size else ""


def merge(query: AuditQuery, *pages: list[governance_pb2.AuditEvent]) -> tuple[list[governance_pb2.AuditEvent], str]:
    """The page the registry answers: the oldest `query.size` of the services' pages, and the next token."""
    events = sorted((event for page in pages for event in page), key=sort_key)
    if len(events) <= query.size and all(len(page) < query.size for page in pages):
        return events, ""
    events = events[: query.size]
    return events, query.token_after(events[-1])

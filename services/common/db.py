"""The one database module: an async engine per service database, SQLite by default, PostgreSQL by URL.

SQLite gets WAL (readers never block the writer), busy_timeout, foreign keys, and write transactions
that start with BEGIN IMMEDIATE: the write lock is taken up front, so a transaction that reads and
then writes never has to upgrade its lock and cannot fail with "database is locked" midway. Writes of
one process are also serialized in-process, so they queue on an asyncio lock instead of SQLite's.
The models and queries are portable SQL; PostgreSQL runs them with ordinary transactions (READ COMMITTED),
so a read that a write depends on takes a lock there (`serialize`, or SELECT ... FOR UPDATE). The schema is
made and upgraded by services/common/migrations.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager, nullcontext
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Column, Connection, CursorResult, DateTime, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry
from sqlmodel.ext.asyncio.session import AsyncSession

from services.common.errors import AlreadyExists


def time_column(nullable: bool = False) -> Column[datetime]:
    """A timestamp column that keeps its time zone (UTC), alike in SQLite and PostgreSQL."""
    return Column(DateTime(timezone=True), nullable=nullable)


SQLITE_BUSY_TIMEOUT_MS = 30_000
# SQLite connections each service keeps open (each an aiosqlite thread), and as many more at busy times.
SQLITE_CONNECTIONS = 32


def _sqlite_engine(url: str, begin: str, connections: int) -> AsyncEngine:
    # Connections kept open: with SQLAlchemy's default (5, and 10 more closed after each use) a service under a
    # few dozen concurrent calls opens a new connection for most of them, a thread and four PRAGMAs each.
    # (An in-memory database has one connection, SQLAlchemy's StaticPool.)
    in_memory = make_url(url).database in (None, "", ":memory:")
    pool: dict[str, Any] = {} if in_memory else {"pool_size": connections, "max_overflow": connections}
    engine = create_async_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}, **pool)

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
        # Leave transaction control to the "begin" hook below, not to the driver.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Connection) -> None:
        connection.exec_driver_sql(begin)

    return engine


class Database:
    def __init__(self, url: str) -> None:
        parsed = make_url(url)
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        if self.is_sqlite:
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
                # Readable by this user only (keys and their hashes live here); SQLite gives its -wal and
                # -shm files the database file's mode, and a database made before this keeps none wider.
                # Made here only when missing: closing a descriptor of a database this process has open would
                # drop SQLite's locks on it (POSIX record locks belong to the process).
                with contextlib.suppress(FileExistsError):
                    os.close(os.open(parsed.database, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
                for path in (parsed.database, f"{parsed.database}-wal", f"{parsed.database}-shm"):
                    with contextlib.suppress(OSError):
                        os.chmod(path, 0o600)
            self._read_engine = _sqlite_engine(url, "BEGIN", SQLITE_CONNECTIONS)
            self._write_engine = _sqlite_engine(url, "BEGIN IMMEDIATE", 1)  # writes take turns (_write_lock)
            self._write_lock: asyncio.Lock | None = asyncio.Lock()
        else:
            self._read_engine = self._write_engine = create_async_engine(url, pool_pre_ping=True)
            self._write_lock = None

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        async with AsyncSession(self._read_engine, expire_on_commit=False) as session:
            yield session

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncSession]:
        """A transaction that commits when the block ends and rolls back if it raises."""
        async with (
            self._write_lock or nullcontext(),
            AsyncSession(self._write_engine, expire_on_commit=False) as session,
            session.begin(),
        ):
            yield session

    async def close(self) -> None:
        await self._read_engine.dispose()
        if self._write_engine is not self._read_engine:
            await self._write_engine.dispose()


async def execute_sql(session: AsyncSession, sql: str, params: Mapping[str, object] | None = None) -> CursorResult[*tuple[Any, ...]]:
    """Plain SQL in the session's transaction (sqlmodel's `exec` takes only statements built from its models)."""
    return await (await session.connection()).execute(text(sql), params)


async def insert_unique(session: AsyncSession, row: object, conflict: str) -> None:
    """Insert a row; the database's unique constraints decide conflicts, reported as AlreadyExists(conflict)."""
    session.add(row)
    try:
        await session.flush()
    except IntegrityError:
        raise AlreadyExists(conflict) from None


async def serialize(session: AsyncSession, *keys: str) -> None:
    """Make write transactions that name the same keys run one after the other (a tag made on a commit and
    that commit's deletion, say), so a check and the write it guards see each other. SQLite's write
    transactions already run one at a time (BEGIN IMMEDIATE); PostgreSQL takes a transaction-scoped advisory
    lock per key, in a fixed order so two transactions cannot wait on each other."""
    connection = await session.connection()
    if connection.dialect.name != "postgresql":
        return
    for key in sorted(set(keys)):
        await connection.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"), {"key": key})

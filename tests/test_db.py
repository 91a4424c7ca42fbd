"""The database module under write contention: never "database is locked", nothing lost."""

from __future__ import annotations

import asyncio
from pathlib import Path

from sqlmodel import Field, SQLModel, select

from services.common.db import Database


class Counter(SQLModel, table=True):
    __tablename__ = "test_counters"

    id: int = Field(primary_key=True)
    value: int = 0


async def _create_counters(db: Database) -> None:
    async with db.write() as session:
        # SQLModel's metaclass adds __table__ to table models without declaring it.
        await (await session.connection()).run_sync(Counter.__table__.create)  # type: ignore[attr-defined]


async def test_read_then_write_transactions_from_two_engines(tmp_path: Path) -> None:
    """Two Database objects on one file stand for two processes; each increment reads then writes."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'contended.db'}"
    first, second = Database(url), Database(url)
    await _create_counters(first)
    async with first.write() as session:
        session.add(Counter(id=1, value=0))

    async def increment(db: Database) -> None:
        async with db.write() as session:
            counter = (await session.exec(select(Counter).where(Counter.id == 1))).one()
            await asyncio.sleep(0)  # let the other engine try to interleave
            counter.value += 1
            session.add(counter)

    await asyncio.gather(*(increment(first if i % 2 else second) for i in range(200)))
    async with second.read() as session:
        assert (await session.exec(select(Counter))).one().value == 200
    await first.close()
    await second.close()


async def test_a_failed_write_leaves_nothing(tmp_path: Path) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'atomic.db'}")
    await _create_counters(db)
    try:
        async with db.write() as session:
            session.add(Counter(id=7, value=1))
            await session.flush()
            raise RuntimeError("fails halfway")
    except RuntimeError:
        pass
    async with db.read() as session:
        assert (await session.exec(select(Counter))).all() == []
    await db.close()


async def test_wal_busy_timeout_and_foreign_keys_are_on(tmp_path: Path) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'pragmas.db'}")
    async with db.read() as session:
        connection = await session.connection()
        pragmas = {}
        for name in ("journal_mode", "foreign_keys", "busy_timeout"):
            pragmas[name] = (await connection.exec_driver_sql(f"PRAGMA {name}")).scalar()
    assert pragmas == {"journal_mode": "wal", "foreign_keys": 1, "busy_timeout": 30000}
    await db.close()

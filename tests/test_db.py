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


async def test_read_then_write_transactions_from_two_engines(tmp_path: Path) -> None:
    """Two Database objects on one file stand for two processes; each increment reads then writes."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'contended.db'}"
    first, second = Database(url), Database(url)
    await first.create_tables([Counter.__table__])  # type: ignore[attr-defined]
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
    await db.create_tables([Counter.__table__])  # type: ignore[attr-defined]
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


async def test_a_database_made_before_a_column_existed_gets_it_with_its_default(tmp_path: Path) -> None:
    """An upgrade: the VMs and commits of the previous version (no `network` column) read as VMs without a NIC."""
    from sqlalchemy import text

    from services.orchestrator.models import TABLES

    url = f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"
    old = Database(url)
    async with old.write() as session:
        await session.exec(text(  # type: ignore[call-overload]
            "CREATE TABLE vms (id VARCHAR PRIMARY KEY, org_id VARCHAR NOT NULL, state VARCHAR NOT NULL, "
            "vcpu_count INTEGER NOT NULL, mem_size_mib INTEGER NOT NULL, fs_size_mib INTEGER NOT NULL, "
            "image_name VARCHAR NOT NULL, kernel_path VARCHAR NOT NULL, initramfs_path VARCHAR NOT NULL, "
            "created_at DATETIME NOT NULL, deleted_at DATETIME, labels VARCHAR NOT NULL, layer_id VARCHAR NOT NULL, "
            "ram_mode VARCHAR NOT NULL, ram_source VARCHAR NOT NULL, parent_commit_id VARCHAR, grandparent_vm_id VARCHAR, "
            "pid INTEGER NOT NULL)"
        ))  # fmt: skip
        await session.exec(text(  # type: ignore[call-overload]
            "INSERT INTO vms VALUES ('vm-1', 'org', 'sleeping', 1, 256, 1024, 'default', 'k', 'i', "
            "'2026-11-01 00:00:00', NULL, '{}', 'layer', 'shared', '', NULL, NULL, 0)"
        ))  # fmt: skip
    await old.close()

    upgraded = Database(url)
    await upgraded.create_tables(TABLES)
    async with upgraded.read() as session:
        row = (await session.exec(text("SELECT id, network FROM vms"))).one()  # type: ignore[call-overload]
    await upgraded.close()
    assert tuple(row) == ("vm-1", "")

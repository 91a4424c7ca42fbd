"""Schema migrations: each service's database is brought to its newest revision (Alembic) when the service
starts, on SQLite and PostgreSQL alike.

A service's revisions live beside its code, in services/<service>/migrations/versions/, one module each;
revision 0001 is the schema every service had before migrations existed, written out table by table. A
database that version made (its tables but no `alembic_version` table) is adopted: columns that
version's start-up added to older databases are added the same way, tables it lacks are made, and it is
stamped 0001 before the upgrade goes on. Alembic runs here as a library: no alembic.ini, no env.py.

The upgrade runs in one write transaction. On SQLite that transaction holds the write lock (BEGIN
IMMEDIATE); on PostgreSQL replicas starting together take a transaction-scoped advisory lock first, so
one upgrades and the others find the database already at its head.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Column, ColumnDefault, Connection, DateTime, Integer, MetaData, String, Table, inspect, text

from services.common.db import Database

SERVICES_DIR = Path(__file__).resolve().parent.parent
BASELINE = "0001"  # the schema databases made before migrations have


def script_directory(service: str) -> ScriptDirectory:
    """The revisions of one service's database, from its package (services/<service>/migrations)."""
    return ScriptDirectory(str(SERVICES_DIR / service / "migrations"))


async def migrate(db: Database, service: str) -> None:
    """Bring the service's database to its newest revision: made from nothing, adopted from the version
    before migrations, or upgraded from the revision it is at."""
    script = script_directory(service)
    async with db.write() as session:
        connection = await session.connection()
        if connection.dialect.name == "postgresql":
            await connection.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"), {"key": f"vers.migrations.{service}"})
        await connection.run_sync(_upgrade, script, service)


def _upgrade(connection: Connection, script: ScriptDirectory, service: str) -> None:
    _adopt_unversioned(connection, script)
    _refuse_unknown_revisions(connection, script, service)

    def steps(revision: Any, _context: MigrationContext) -> Any:
        return script._upgrade_revs("head", revision)

    with EnvironmentContext(Config(), script, fn=steps, destination_rev="head") as environment:
        environment.configure(connection=connection)
        environment.run_migrations()


def _adopt_unversioned(connection: Connection, script: ScriptDirectory) -> None:
    """A database of the version before migrations: brought to revision 0001 and stamped with it."""
    existing = set(inspect(connection).get_table_names())
    if "alembic_version" in existing:
        return
    baseline = script.get_revision(BASELINE)
    assert baseline is not None, f"revision {BASELINE} is missing from {script.dir}"
    metadata: MetaData = baseline.module.metadata
    present = [table for name, table in metadata.tables.items() if name in existing]
    if not present:
        return  # a new database: the upgrade makes everything
    _add_missing_columns(connection, present)
    baseline.module.create(connection)  # what that version would have made on this start (create_all skips what exists)
    MigrationContext.configure(connection).stamp(script, BASELINE)


def _add_missing_columns(connection: Connection, tables: list[Table]) -> None:
    """What the version before migrations did at each start: columns added to a table after its database was
    made, added with their default so the rows it holds read as they did."""
    inspector = inspect(connection)
    for table in tables:
        present = {column["name"] for column in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in present:
                continue
            default = column.default.arg if isinstance(column.default, ColumnDefault) and column.default.is_scalar else None
            if default is None and not column.nullable:
                raise RuntimeError(f"the database's table {table.name} has no column {column.name}, and it has no default to add it with")
            kind = column.type.compile(dialect=connection.dialect)
            clause = f" NOT NULL DEFAULT {_literal(default)}" if default is not None else ""
            connection.exec_driver_sql(f"ALTER TABLE {table.name} ADD COLUMN {column.name} {kind}{clause}")


def _literal(value: object) -> str:
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int | float):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


def _refuse_unknown_revisions(connection: Connection, script: ScriptDirectory, service: str) -> None:
    """A database a newer version upgraded is not touched by this one: it says so instead of Alembic's trace."""
    for revision in MigrationContext.configure(connection).get_current_heads():
        try:
            script.get_revision(revision)
        except CommandError:
            raise RuntimeError(
                f"the {service} database is at schema revision {revision}, which this version does not know: "
                "a newer version upgraded it; run that version (or newer) on it"
            ) from None


# The audit log's table, which every service's database has (services/common/audit.py), as revision 0001
# made it; each service's 0001 adds it to its own tables.
AUDIT_APPEND_ONLY = (
    "CREATE TRIGGER IF NOT EXISTS audit_events_no_update BEFORE UPDATE ON audit_events "
    "BEGIN SELECT RAISE(ABORT, 'audit entries cannot be changed'); END",
    "CREATE TRIGGER IF NOT EXISTS audit_events_no_delete BEFORE DELETE ON audit_events "
    "BEGIN SELECT RAISE(ABORT, 'audit entries cannot be deleted'); END",
)


def audit_events_0001(metadata: MetaData) -> Table:
    return Table(
        "audit_events",
        metadata,
        Column("id", Integer(), primary_key=True, nullable=False),
        Column("at", DateTime(timezone=True), nullable=False),
        Column("org_id", String(), nullable=False, index=True),
        Column("api_key_id", String(), nullable=False, default=""),
        Column("type", String(), nullable=False, index=True),
        Column("target", String(), nullable=False, default=""),
        Column("before", String(), nullable=False, default=""),
        Column("after", String(), nullable=False, default=""),
    )


def create_0001(connection: Connection, metadata: MetaData) -> None:
    """Revision 0001 of any service: its tables (those missing), and on SQLite the triggers that make the
    audit log append-only."""
    metadata.create_all(connection)
    if connection.dialect.name == "sqlite":
        for statement in AUDIT_APPEND_ONLY:
            connection.exec_driver_sql(statement)

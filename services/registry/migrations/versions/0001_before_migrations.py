"""Revision 0001: the registry database as it was before migrations existed (git commit 7c2cf7c), written out
table by table so that it never changes with the models. Databases that version made are adopted at this
revision (services/common/migrations.py); each later change of the models is a revision after it."""

from __future__ import annotations

from alembic import op
from sqlalchemy import Boolean, Column, Connection, DateTime, ForeignKey, Integer, MetaData, String, Table, UniqueConstraint

from services.common.migrations import audit_events_0001, create_0001

revision = "0001"
down_revision = None

metadata = MetaData()

Table(
    "orgs",
    metadata,
    Column("id", String(), primary_key=True, nullable=False),
    Column("name", String(), nullable=False, unique=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("max_vms", Integer(), nullable=True),
    Column("max_vcpus", Integer(), nullable=True),
    Column("max_memory_mib", Integer(), nullable=True),
    Column("max_disk_mib", Integer(), nullable=True),
    Column("max_commits", Integer(), nullable=True),
    Column("max_commit_mib", Integer(), nullable=True),
    Column("max_repositories", Integer(), nullable=True),
    Column("max_tags", Integer(), nullable=True),
    Column("max_api_keys", Integer(), nullable=True),
    Column("max_domains", Integer(), nullable=True),
    Column("untagged_older_than_days", Integer(), nullable=False, default=0),
)

Table(
    "api_keys",
    metadata,
    Column("id", String(), primary_key=True, nullable=False),
    Column("org_id", String(), ForeignKey("orgs.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("label", String(), nullable=False, default=""),
    Column("token_hash", String(), nullable=False, unique=True),
    Column("is_admin", Boolean(), nullable=False, default=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=True),
)

Table(
    "repositories",
    metadata,
    Column("id", String(), primary_key=True, nullable=False),
    Column("org_id", String(), ForeignKey("orgs.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("name", String(), nullable=False),
    Column("description", String(), nullable=False, default=""),
    Column("is_public", Boolean(), nullable=False, index=True, default=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("immutable_tags", String(), nullable=False, default="[]"),
    Column("retention", String(), nullable=False, default="{}"),
    UniqueConstraint("org_id", "name", name="uq_repositories_org_name"),
)

Table(
    "sagas",
    metadata,
    Column("id", String(), primary_key=True, nullable=False),
    Column("kind", String(), nullable=False),
    Column("org_id", String(), nullable=False, index=True),
    Column("step", String(), nullable=False),
    Column("payload", String(), nullable=False, default="{}"),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

audit_events_0001(metadata)


def create(connection: Connection) -> None:
    create_0001(connection, metadata)


def upgrade() -> None:
    create(op.get_bind())

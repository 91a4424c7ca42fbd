"""Revision 0001: the tagging database as it was before migrations existed (git commit 7c2cf7c), written out
table by table so that it never changes with the models. Databases that version made are adopted at this
revision (services/common/migrations.py); each later change of the models is a revision after it."""

from __future__ import annotations

from alembic import op
from sqlalchemy import Column, Connection, DateTime, Integer, MetaData, String, Table, UniqueConstraint

from services.common.migrations import audit_events_0001, create_0001

revision = "0001"
down_revision = None

metadata = MetaData()

Table(
    "repo_tags",
    metadata,
    Column("id", String(), primary_key=True, nullable=False),
    Column("repo_id", String(), nullable=False, index=True),
    Column("repo_name", String(), nullable=False),
    Column("org_id", String(), nullable=False, index=True),
    Column("name", String(), nullable=False),
    Column("commit_id", String(), nullable=False, index=True),
    Column("description", String(), nullable=False, default=""),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("repo_id", "name", name="uq_repo_tags_repo_name"),
)

Table(
    "tag_events",
    metadata,
    Column("id", Integer(), primary_key=True, nullable=False),
    Column("repo_id", String(), nullable=False, index=True),
    Column("tag_name", String(), nullable=False),
    Column("action", String(), nullable=False),
    Column("old_commit_id", String(), nullable=False, default=""),
    Column("new_commit_id", String(), nullable=False, default=""),
    Column("org_id", String(), nullable=False),
    Column("api_key_id", String(), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

Table(
    "commit_tags",
    metadata,
    Column("id", String(), primary_key=True, nullable=False),
    Column("org_id", String(), nullable=False, index=True),
    Column("name", String(), nullable=False),
    Column("commit_id", String(), nullable=False, index=True),
    Column("description", String(), nullable=False, default=""),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("org_id", "name", name="uq_commit_tags_org_name"),
)

Table(
    "deleted_commits",
    metadata,
    Column("commit_id", String(), primary_key=True, nullable=False),
    Column("org_id", String(), nullable=False, index=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

audit_events_0001(metadata)


def create(connection: Connection) -> None:
    create_0001(connection, metadata)


def upgrade() -> None:
    create(op.get_bind())

from __future__ import annotations

from datetime import datetime

from sqlalchemy import UniqueConstraint
from sqlmodel import Field, SQLModel

from services.common.audit import AuditEventRow
from services.common.db import time_column
from services.common.timestamps import utcnow


class RepoTagRow(SQLModel, table=True):
    """A tag points at a repository by id, so a repository deleted and made again starts empty."""

    __tablename__ = "repo_tags"
    __table_args__ = (UniqueConstraint("repo_id", "name", name="uq_repo_tags_repo_name"),)

    id: str = Field(primary_key=True)
    repo_id: str = Field(index=True)
    # Repositories cannot be renamed, so the name kept here stays true; it makes references readable.
    repo_name: str
    org_id: str = Field(index=True)
    name: str
    commit_id: str = Field(index=True)
    description: str = ""
    created_at: datetime = Field(default_factory=utcnow, sa_column=time_column())
    updated_at: datetime = Field(default_factory=utcnow, sa_column=time_column())


class TagEventRow(SQLModel, table=True):
    __tablename__ = "tag_events"

    id: int | None = Field(default=None, primary_key=True)
    repo_id: str = Field(index=True)
    tag_name: str
    action: str
    old_commit_id: str = ""
    new_commit_id: str = ""
    org_id: str
    api_key_id: str
    created_at: datetime = Field(default_factory=utcnow, sa_column=time_column())


class CommitTagRow(SQLModel, table=True):
    """Legacy org-scoped tags (pre-repositories commit_tags)."""

    __tablename__ = "commit_tags"
    __table_args__ = (UniqueConstraint("org_id", "name", name="uq_commit_tags_org_name"),)

    id: str = Field(primary_key=True)
    org_id: str = Field(index=True)
    name: str
    commit_id: str = Field(index=True)
    description: str = ""
    created_at: datetime = Field(default_factory=utcnow, sa_column=time_column())
    updated_at: datetime = Field(default_factory=utcnow, sa_column=time_column())


class DeletedCommitRow(SQLModel, table=True):
    """A commit the orchestrator is deleting (or has deleted): no tag may name it from then on."""

    __tablename__ = "deleted_commits"

    commit_id: str = Field(primary_key=True)
    org_id: str = Field(index=True)
    created_at: datetime = Field(default_factory=utcnow, sa_column=time_column())


# The audit log of tag changes lives beside the tags, so that an entry is written in the change's transaction.
TABLES = [RepoTagRow.__table__, TagEventRow.__table__, CommitTagRow.__table__, DeletedCommitRow.__table__, AuditEventRow.__table__]  # type: ignore[attr-defined]

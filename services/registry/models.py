from __future__ import annotations

from datetime import datetime

from sqlalchemy import UniqueConstraint
from sqlmodel import Field, SQLModel

from services.common.audit import AuditEventRow
from services.common.db import time_column
from services.common.timestamps import utcnow


class OrgRow(SQLModel, table=True):
    __tablename__ = "orgs"

    id: str = Field(primary_key=True)
    name: str = Field(unique=True)
    created_at: datetime = Field(default_factory=utcnow, sa_column=time_column())
    # The org's own limits, set by the platform administrator; None: the setting's default (VERS_ORG_MAX_*).
    max_vms: int | None = None
    max_vcpus: int | None = None
    max_memory_mib: int | None = None
    max_disk_mib: int | None = None
    max_commits: int | None = None
    max_commit_mib: int | None = None
    max_repositories: int | None = None
    max_tags: int | None = None
    max_api_keys: int | None = None
    max_domains: int | None = None
    # The org's retention rule: commits no tag or legacy tag names go once older than this many days; 0 keeps them.
    untagged_older_than_days: int = 0


class ApiKeyRow(SQLModel, table=True):
    __tablename__ = "api_keys"

    id: str = Field(primary_key=True)
    org_id: str = Field(foreign_key="orgs.id", index=True, ondelete="CASCADE")
    label: str = ""
    token_hash: str = Field(unique=True)
    is_admin: bool = False
    created_at: datetime = Field(default_factory=utcnow, sa_column=time_column())
    expires_at: datetime | None = Field(default=None, sa_column=time_column(nullable=True))


class RepositoryRow(SQLModel, table=True):
    __tablename__ = "repositories"
    __table_args__ = (UniqueConstraint("org_id", "name", name="uq_repositories_org_name"),)

    id: str = Field(primary_key=True)
    org_id: str = Field(foreign_key="orgs.id", index=True, ondelete="CASCADE")
    name: str
    description: str = ""
    is_public: bool = Field(default=False, index=True)
    created_at: datetime = Field(default_factory=utcnow, sa_column=time_column())
    # JSON: the shell-style patterns of tags that cannot be moved or deleted once made (a list), and the
    # retention rules (vers.common.v1.RetentionPolicy's fields).
    immutable_tags: str = "[]"
    retention: str = "{}"


class SagaRow(SQLModel, table=True):
    """A change that spans services (a fork, a repository delete), written before its first side effect and
    moved on after each step, removed once it is finished or wholly undone. One found at start-up was cut
    short by a crash: its payload says what its steps made, so it can be finished or undone."""

    __tablename__ = "sagas"

    id: str = Field(primary_key=True)
    kind: str  # fork | repo_delete
    org_id: str = Field(index=True)
    step: str
    payload: str = "{}"  # JSON: the request, then what each step made
    created_at: datetime = Field(default_factory=utcnow, sa_column=time_column())


TABLES = [OrgRow.__table__, ApiKeyRow.__table__, RepositoryRow.__table__, SagaRow.__table__, AuditEventRow.__table__]  # type: ignore[attr-defined]

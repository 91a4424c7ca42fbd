"""Revision 0001: the orchestrator database as it was before migrations existed (git commit 7c2cf7c), written out
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
    "layers",
    metadata,
    Column("id", String(), primary_key=True, nullable=False),
    Column("parent_id", String(), ForeignKey("layers.id"), nullable=True, index=True),
    Column("base_path", String(), nullable=False, default=""),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

Table(
    "vms",
    metadata,
    Column("vcpu_count", Integer(), nullable=False),
    Column("mem_size_mib", Integer(), nullable=False),
    Column("fs_size_mib", Integer(), nullable=False),
    Column("image_name", String(), nullable=False),
    Column("kernel_path", String(), nullable=False),
    Column("initramfs_path", String(), nullable=False),
    Column("network", String(), nullable=False, default=""),
    Column("id", String(), primary_key=True, nullable=False),
    Column("org_id", String(), nullable=False, index=True),
    Column("state", String(), nullable=False, default="booting"),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("deleted_at", DateTime(timezone=True), nullable=True),
    Column("labels", String(), nullable=False, default="{}"),
    Column("layer_id", String(), nullable=False),
    Column("ram_mode", String(), nullable=False),
    Column("ram_source", String(), nullable=False, default=""),
    Column("parent_commit_id", String(), nullable=True, index=True),
    Column("grandparent_vm_id", String(), nullable=True),
    Column("pid", Integer(), nullable=False, default=0),
)

Table(
    "commits",
    metadata,
    Column("vcpu_count", Integer(), nullable=False),
    Column("mem_size_mib", Integer(), nullable=False),
    Column("fs_size_mib", Integer(), nullable=False),
    Column("image_name", String(), nullable=False),
    Column("kernel_path", String(), nullable=False),
    Column("initramfs_path", String(), nullable=False),
    Column("network", String(), nullable=False, default=""),
    Column("id", String(), primary_key=True, nullable=False),
    Column("org_id", String(), nullable=False, index=True),
    Column("name", String(), nullable=False, default=""),
    Column("description", String(), nullable=False, default=""),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("deleted_at", DateTime(timezone=True), nullable=True),
    Column("parent_vm_id", String(), nullable=True),
    Column("grandparent_commit_id", String(), nullable=True),
    Column("layer_id", String(), nullable=False),
    Column("ram_format", String(), nullable=False),
    Column("checksums", String(), nullable=False, default="{}"),
    Column("size_bytes", Integer(), nullable=False, default=0),
    Column("is_public", Boolean(), nullable=False, default=False),
)

Table(
    "operations",
    metadata,
    Column("id", String(), primary_key=True, nullable=False),
    Column("vm_id", String(), nullable=False, index=True),
    Column("kind", String(), nullable=False),
    Column("commit_id", String(), nullable=True),
    Column("old_layer_id", String(), nullable=True),
    Column("new_layer_id", String(), nullable=True),
    Column("vm_ids", String(), nullable=False, default="[]"),
    Column("started_at", DateTime(timezone=True), nullable=False),
)

Table(
    "commit_deletions",
    metadata,
    Column("commit_id", String(), primary_key=True, nullable=False),
    Column("org_id", String(), nullable=False, index=True),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("api_key_id", String(), nullable=False, default=""),
    Column("reason", String(), nullable=False, default=""),
)

Table(
    "fork_requests",
    metadata,
    Column("saga_id", String(), primary_key=True, nullable=False),
    Column("org_id", String(), nullable=False, index=True),
    Column("vm_id", String(), nullable=True),
    Column("commit_id", String(), nullable=True),
    Column("state", String(), nullable=False, default="running"),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

Table(
    "ssh_keys",
    metadata,
    Column("vm_id", String(), primary_key=True, nullable=False),
    Column("private_key", String(), nullable=False),
    Column("public_key", String(), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

Table(
    "domains",
    metadata,
    Column("id", String(), primary_key=True, nullable=False),
    Column("name", String(), nullable=False, unique=True),
    Column("org_id", String(), nullable=False, index=True),
    Column("vm_id", String(), nullable=False, index=True),
    Column("port", Integer(), nullable=False, default=80),
    Column("is_public", Boolean(), nullable=False, default=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

Table(
    "secret_scans",
    metadata,
    Column("commit_id", String(), primary_key=True, nullable=False),
    Column("rules_version", String(), primary_key=True, nullable=False),
    Column("findings", String(), nullable=False, default="[]"),
    Column("scanned_at", DateTime(timezone=True), nullable=False),
    Column("forced_by_key_id", String(), nullable=False, default=""),
    Column("forced_at", DateTime(timezone=True), nullable=True),
    Column("purpose", String(), nullable=False, default=""),
)

Table(
    "env_vars",
    metadata,
    Column("org_id", String(), primary_key=True, nullable=False),
    Column("name", String(), primary_key=True, nullable=False),
    Column("token", String(), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

Table(
    "images",
    metadata,
    Column("id", String(), primary_key=True, nullable=False),
    Column("org_id", String(), nullable=False, index=True),
    Column("image_name", String(), nullable=False),
    Column("is_public", Boolean(), nullable=False, default=False),
    Column("size_mib", Integer(), nullable=False),
    Column("source_type", String(), nullable=False),
    Column("description", String(), nullable=True),
    Column("status", String(), nullable=False, default="creating"),
    Column("error_message", String(), nullable=False, default=""),
    Column("job_id", String(), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("org_id", "image_name"),
)

audit_events_0001(metadata)


def create(connection: Connection) -> None:
    create_0001(connection, metadata)


def upgrade() -> None:
    create(op.get_bind())

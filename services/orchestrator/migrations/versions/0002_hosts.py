"""Revision 0002: several VM hosts. Each VM names the host agent it runs on (`vms.host_id`, "" on a single-host
platform, as every VM made before), each image the host that builds it (`images.host_id`), and the API keeps
a row per host agent (`hosts`)."""

from __future__ import annotations

from alembic import op
from sqlalchemy import Column, DateTime, Integer, String

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    op.add_column("vms", Column("host_id", String(), nullable=False, server_default=""))
    op.create_index("ix_vms_host_id", "vms", ["host_id"])
    op.add_column("images", Column("host_id", String(), nullable=False, server_default=""))
    op.create_table(
        "hosts",
        Column("id", String(), primary_key=True, nullable=False),
        Column("address", String(), nullable=False),
        Column("state", String(), nullable=False),
        Column("accelerator", String(), nullable=False),
        Column("instance", String(), nullable=False),
        Column("memory_total_mib", Integer(), nullable=False),
        Column("memory_free_mib", Integer(), nullable=False),
        Column("disk_free_mib", Integer(), nullable=False),
        Column("run_free_mib", Integer(), nullable=False),
        Column("vcpus", Integer(), nullable=False),
        Column("vm_count", Integer(), nullable=False),
        Column("registered_at", DateTime(timezone=True), nullable=False),
        Column("heartbeat_at", DateTime(timezone=True), nullable=False),
    )

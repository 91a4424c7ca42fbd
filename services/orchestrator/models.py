from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlmodel import Field, SQLModel

from services.common.db import time_column
from services.common.errors import FailedPrecondition
from services.common.timestamps import utcnow


class VmState(StrEnum):
    """A VM's state: its row holds the value, and the API sends it as it is."""

    BOOTING = "booting"  # its QEMU runs, its guest has not yet said it is up
    RUNNING = "running"
    PAUSED = "paused"  # its QEMU runs, its vCPUs are stopped
    SLEEPING = "sleeping"  # no QEMU: its devices and memory are saved to disk until it wakes
    DEAD = "dead"  # its QEMU ended unasked (or the VM was deleted): it never runs again


# The states of a VM whose QEMU runs.
LIVE_STATES = (VmState.BOOTING, VmState.RUNNING, VmState.PAUSED)


class LayerRow(SQLModel, table=True):
    """A qcow2 file in the layer store. A VM writes to one; a commit freezes one. Each is backed by its
    parent layer, or by an image's root disk."""

    __tablename__ = "layers"

    id: str = Field(primary_key=True)
    parent_id: str | None = Field(default=None, foreign_key="layers.id", index=True)
    base_path: str = ""
    created_at: datetime = Field(default_factory=utcnow, sa_column=time_column())


class MachineShape(SQLModel):
    """What a VM is made of; a commit keeps it so VMs started from it get the same."""

    vcpu_count: int
    mem_size_mib: int
    fs_size_mib: int
    image_name: str
    kernel_path: str
    initramfs_path: str
    # "nat" (outbound network), "none" (a NIC no packet leaves), "" (made before VMs had a NIC: none at all)
    network: str = ""


class VmRow(MachineShape, table=True):
    __tablename__ = "vms"

    id: str = Field(primary_key=True)
    org_id: str = Field(index=True)
    state: str = VmState.BOOTING  # a VmState (a column of plain text)
    created_at: datetime = Field(default_factory=utcnow, sa_column=time_column())
    deleted_at: datetime | None = Field(default=None, sa_column=time_column(nullable=True))
    labels: str = "{}"
    layer_id: str  # rows outlive their layers once deleted, so no foreign key
    ram_mode: str
    ram_source: str = ""
    parent_commit_id: str | None = Field(default=None, index=True)
    grandparent_vm_id: str | None = None
    pid: int = 0
    # The host agent it runs on (VERS_HOST_ID), which all of its calls go to; "" on a single-host platform.
    host_id: str = Field(default="", index=True)


def require_not_paused(vm: VmRow) -> None:
    """What a paused VM cannot do (run commands, reach its ports, copy files) is refused saying how to resume it."""
    if vm.state == VmState.PAUSED:
        raise FailedPrecondition(f'VM {vm.id} is paused: resume it first (PATCH /vm/{vm.id}/state {{"state": "Running"}})')


class CommitRow(MachineShape, table=True):
    __tablename__ = "commits"

    id: str = Field(primary_key=True)
    org_id: str = Field(index=True)
    name: str = ""
    description: str = ""
    created_at: datetime = Field(default_factory=utcnow, sa_column=time_column())
    deleted_at: datetime | None = Field(default=None, sa_column=time_column(nullable=True))
    parent_vm_id: str | None = None
    grandparent_commit_id: str | None = None
    layer_id: str  # rows outlive their layers once deleted, so no foreign key
    # "file": RAM in its own file (branches map it copy-on-write); "stream": RAM inside the state file.
    ram_format: str
    checksums: str = "{}"
    # Bytes of its files (memory, device state, the disk layer it froze), counted against its org's quota.
    size_bytes: int = 0
    # Published by its owner (UpdateCommit, after the secret scan): any org may branch or restore it by id.
    is_public: bool = False


class HostState(StrEnum):
    UP = "up"
    DEAD = "dead"  # silent for VERS_HOST_DEAD_SECONDS: its live VMs were marked dead


class HostRow(SQLModel, table=True):
    """A host agent, as it said in its last heartbeat (several VM hosts: VERS_ORCHESTRATOR_ROLE)."""

    __tablename__ = "hosts"

    id: str = Field(primary_key=True)
    address: str
    state: str = HostState.UP
    accelerator: str = ""
    instance: str = ""  # the agent process's random id (HostStatus.instance)
    memory_total_mib: int = 0
    memory_free_mib: int = 0
    disk_free_mib: int = 0
    run_free_mib: int = 0
    vcpus: int = 0
    vm_count: int = 0
    registered_at: datetime = Field(default_factory=utcnow, sa_column=time_column())
    heartbeat_at: datetime = Field(default_factory=utcnow, sa_column=time_column())


class OperationRow(SQLModel, table=True):
    """An intent: written before a multi-step change of a VM touches QEMU or the files, removed in the
    transaction that records its outcome. One left behind names a change a crash interrupted, and says
    what to look at to finish or undo it on the next start."""

    __tablename__ = "operations"

    id: str = Field(primary_key=True)
    vm_id: str = Field(index=True)
    kind: str  # create | restore | commit | sleep | wake | delete
    commit_id: str | None = None  # commit: the commit being made; restore: the commit restored from
    old_layer_id: str | None = None  # commit: the layer QEMU wrote to before the snapshot
    new_layer_id: str | None = None  # commit: the layer QEMU goes on writing to after it
    vm_ids: str = "[]"  # restore: every VM the restore makes (JSON)
    started_at: datetime = Field(default_factory=utcnow, sa_column=time_column())


class CommitDeletionRow(SQLModel, table=True):
    """A commit being deleted: from this row on it cannot be restored, branched or tagged."""

    __tablename__ = "commit_deletions"

    commit_id: str = Field(primary_key=True)
    org_id: str = Field(index=True)
    started_at: datetime = Field(default_factory=utcnow, sa_column=time_column())
    # Who asked, for the audit entry written when the deletion finishes (perhaps later, in the background):
    # the API key ("" for the platform's own), and why when it was not asked for by name (garbage collection).
    api_key_id: str = ""
    reason: str = ""


class ForkRequestRow(SQLModel, table=True):
    """A fork the registry's saga asked for, under the saga's id: what it made, so that a repeated call
    answers with the same VM and commit, and an abandoned saga's VM and commit are found and deleted."""

    __tablename__ = "fork_requests"

    saga_id: str = Field(primary_key=True)
    org_id: str = Field(index=True)
    vm_id: str | None = None
    commit_id: str | None = None
    state: str = "running"  # running | done | abandoned
    created_at: datetime = Field(default_factory=utcnow, sa_column=time_column())


class SshKeyRow(SQLModel, table=True):
    """A VM's SSH key pair, made on the first ask: the VM's SSH server accepts this key and no other."""

    __tablename__ = "ssh_keys"

    vm_id: str = Field(primary_key=True)
    private_key: str
    public_key: str
    created_at: datetime = Field(default_factory=utcnow, sa_column=time_column())


class DomainRow(SQLModel, table=True):
    """NAME.<VERS_DOMAIN_SUFFIX> -> a port of a VM. Names are unique across the platform (the constraint
    decides two creates at once); the row goes with its VM, in the transaction that marks the VM deleted."""

    __tablename__ = "domains"

    id: str = Field(primary_key=True)
    name: str = Field(unique=True)  # the full name, NAME.<suffix>
    org_id: str = Field(index=True)
    vm_id: str = Field(index=True)
    port: int = 80
    is_public: bool = False
    created_at: datetime = Field(default_factory=utcnow, sa_column=time_column())


class SecretScanRow(SQLModel, table=True):
    """A commit's secret scan under one version of the rules. Commits never change, so a result stays true
    for as long as the rules do. A publish that went ahead despite findings is noted on it (forced_at)."""

    __tablename__ = "secret_scans"

    commit_id: str = Field(primary_key=True)
    rules_version: str = Field(primary_key=True)
    findings: str = "[]"  # JSON: [{where, path, offset, rule, excerpt}]
    scanned_at: datetime = Field(default_factory=utcnow, sa_column=time_column())
    forced_by_key_id: str = ""
    forced_at: datetime | None = Field(default=None, sa_column=time_column(nullable=True))
    purpose: str = ""


class EnvVarRow(SQLModel, table=True):
    """One of an org's environment variables. The value is a Fernet token (services/orchestrator/envvars.py)
    of the org, the name and the value together, so a token copied to another row or org does not decrypt."""

    __tablename__ = "env_vars"

    org_id: str = Field(primary_key=True)
    name: str = Field(primary_key=True)
    token: str
    updated_at: datetime = Field(default_factory=utcnow, sa_column=time_column())


MODELS = (
    LayerRow, VmRow, CommitRow, OperationRow, CommitDeletionRow, ForkRequestRow, SshKeyRow, DomainRow, SecretScanRow,
    EnvVarRow, HostRow,
)  # fmt: skip
# SQLModel's metaclass adds __table__ to table models without declaring it.
TABLES = [model.__table__ for model in MODELS]  # type: ignore[union-attr]

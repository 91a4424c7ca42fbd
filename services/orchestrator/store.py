"""Orchestrator data: VMs, commits and the disk layers they stand on."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from sqlalchemy import JSON, case, cast, exists, func, literal
from sqlmodel import col, or_, select
from sqlmodel.ext.asyncio.session import AsyncSession

from services.common import audit
from services.common.auth import acting_key_id, principal_of
from services.common.db import Database, insert_unique, serialize
from services.common.errors import Conflict, FailedPrecondition, NotFound
from services.common.ids import is_uuid
from services.common.names import validate_vm_labels
from services.common.quotas import OrgLimits, check, exceeded
from services.common.timestamps import as_utc, utcnow
from services.orchestrator.models import (
    LIVE_STATES,
    CommitDeletionRow,
    CommitRow,
    DomainRow,
    ForkRequestRow,
    LayerRow,
    OperationRow,
    SecretScanRow,
    SshKeyRow,
    VmRow,
    VmState,
)  # fmt: skip

Row = TypeVar("Row", VmRow, CommitRow)
MIB = 1024 * 1024
# States of VMs that exist (and count against max_vms and max_disk_mib): all but dead.
EXISTING_STATES = (*LIVE_STATES, VmState.SLEEPING)
_DELETE_VMS = "delete VMs it no longer uses"
_SLEEP_HINT = f"{_DELETE_VMS}, or put them to sleep"


# What stands on a layer chain: ("vm", id), ("commit", id) or ("operation", id).
Holder = tuple[str, str]


@dataclass(frozen=True)
class LayerGraph:
    """Every layer, and what stands on which: VMs and commits whose rows are not deleted, and the layers an
    unsettled intent names. A layer is needed while anything's chain passes through it. The layer collection,
    a commit's bytes and what a commit collection frees all read it from here."""

    layers: dict[str, LayerRow]
    roots: dict[Holder, str]

    def chain(self, layer_id: str) -> list[str]:
        """The layer and those under it, top first."""
        chain: list[str] = []
        current: str | None = layer_id
        while current is not None and current in self.layers:
            chain.append(current)
            current = self.layers[current].parent_id
        return chain

    def users(self) -> dict[str, set[Holder]]:
        """Each needed layer, and all that stand on it."""
        users: dict[str, set[Holder]] = {}
        for holder, root in self.roots.items():
            for layer_id in self.chain(root):
                users.setdefault(layer_id, set()).add(holder)
        return users

    def reachable(self, without: Iterable[Holder] = ()) -> set[str]:
        """The layers needed by all but `without`."""
        gone = set(without)
        reachable: set[str] = set()
        for holder, root in self.roots.items():
            current: str | None = root
            while holder not in gone and current is not None and current in self.layers and current not in reachable:
                reachable.add(current)
                current = self.layers[current].parent_id
        return reachable


@dataclass(frozen=True)
class Collectable:
    """A commit a collection may delete, and why."""

    commit: CommitRow
    reason: str


class OrchestratorStore:
    def __init__(
        self, db: Database, max_vcpus: int, max_memory_mib: int, default_limits: OrgLimits | None = None, host_id: str = ""
    ) -> None:
        self.db = db
        # The host whose VMs this store's engine runs: it adds VMs for that host, and start-up reconciliation
        # (live_vms, all_vms, operations) sees only those ("" on a single-host platform, where all are).
        self.host_id = host_id
        self.max_vcpus = max_vcpus
        self.max_memory_mib = max_memory_mib
        if default_limits is None:
            from services.common.settings import get_settings

            default_limits = OrgLimits.defaults(get_settings())
        self.default_limits = default_limits.replace(max_vcpus=max_vcpus, max_memory_mib=max_memory_mib)

    def limits_for(self, org_id: str) -> tuple[OrgLimits, str]:
        """The org's limits as the registry gave them with the caller's identity (also a service acting for
        it), and how messages name the org; the defaults where no caller of that org is known (start-up)."""
        caller = principal_of(org_id)
        if caller is not None and caller.limits is not None:
            return caller.limits, caller.org_label
        return self.default_limits, caller.org_label if caller is not None else org_id

    # VMs

    async def add_vms(
        self,
        org_id: str,
        vms: Sequence[VmRow],
        layers: Sequence[LayerRow],
        operation: OperationRow,
        source: CommitRow | None = None,
    ) -> None:
        """Insert new VMs, their layers and the intent that starts them, within the org's vCPU and memory
        limits, in one transaction; from a commit only while it is not being deleted."""
        async with self.db.write() as session:
            if source is not None:
                await serialize(session, f"commit:{source.id}")
            if source is not None and not await self._commit_is_live(session, source.id):
                raise NotFound(f"commit {source.id} is being deleted")
            if source is not None and source.org_id != org_id and source.is_public:
                # another org's commit branched because it was public: unpublished since, it is not branched
                current = await session.get(CommitRow, source.id)
                if current is None or not current.is_public:
                    raise NotFound(f"commit {source.id!r} not found in your organization, nor among public commits")
            await self._check_capacity(session, org_id, vms)
            for layer in layers:
                session.add(layer)
            await session.flush()
            for vm in vms:
                vm.host_id = self.host_id
                session.add(vm)
            session.add(operation)

    async def _check_capacity(self, session: AsyncSession, org_id: str, vms: Sequence[VmRow], *, new: bool = True) -> None:
        """Within the org's limits with `vms` running too? Sleeping and dead VMs use no vCPUs or memory; new
        VMs also count against the VMs that exist (all but dead ones) and their disks."""
        await serialize(session, f"org:{org_id}")
        limits, org = self.limits_for(org_id)
        mine = (VmRow.org_id == org_id, col(VmRow.deleted_at).is_(None))
        used_vcpus, used_memory = (
            await session.exec(
                select(func.coalesce(func.sum(VmRow.vcpu_count), 0), func.coalesce(func.sum(VmRow.mem_size_mib), 0)).where(
                    *mine, col(VmRow.state).in_(LIVE_STATES)
                )
            )
        ).one()
        if new:
            existing, disk = await self._existing(session, org_id)
            check(limits, "max_vms", int(existing), len(vms), org, _DELETE_VMS)
            check(limits, "max_disk_mib", int(disk), sum(vm.fs_size_mib for vm in vms), org, _DELETE_VMS)
        check(limits, "max_vcpus", int(used_vcpus), sum(vm.vcpu_count for vm in vms), org, _SLEEP_HINT)
        check(limits, "max_memory_mib", int(used_memory), sum(vm.mem_size_mib for vm in vms), org, _SLEEP_HINT)

    @staticmethod
    async def _existing(session: AsyncSession, org_id: str) -> tuple[int, int]:
        """The org's VMs that exist, and the MiB of disk they hold: their disks, and a sleeping VM's memory."""
        held = VmRow.fs_size_mib + case((col(VmRow.state) == VmState.SLEEPING, VmRow.mem_size_mib), else_=0)
        mine = (VmRow.org_id == org_id, col(VmRow.deleted_at).is_(None), col(VmRow.state).in_(EXISTING_STATES))
        count, disk = (await session.exec(select(func.count(), func.coalesce(func.sum(held), 0)).where(*mine))).one()
        return int(count), int(disk)

    async def check_sleep(self, vm: VmRow) -> None:
        """A sleeping VM keeps its memory on disk: within the org's disk limit, or refused."""
        async with self.db.write() as session:
            await serialize(session, f"org:{vm.org_id}")
            limits, org = self.limits_for(vm.org_id)
            _, disk = await self._existing(session, vm.org_id)
            check(limits, "max_disk_mib", disk, vm.mem_size_mib, org, "delete VMs or commits it no longer uses")

    async def claim_wake(self, vm_id: str, operation: OperationRow) -> VmRow:
        """A sleeping VM becomes `booting` if its org has room for it, in one transaction with the wake's
        intent, so two wakes at once cannot both pass the limit; FailedPrecondition if it is not asleep."""
        async with self.db.write() as session:
            vm = await session.get(VmRow, vm_id)
            if vm is None or vm.state != VmState.SLEEPING:
                raise FailedPrecondition(f"VM {vm_id} is not sleeping")
            await self._check_capacity(session, vm.org_id, [vm], new=False)
            vm.state = VmState.BOOTING
            session.add(vm)
            session.add(operation)
            await session.flush()
            await session.refresh(vm)
            return vm

    async def get_vm(self, org_id: str, vm_id: str) -> VmRow:
        async with self.db.read() as session:
            vm = await session.get(VmRow, vm_id) if is_uuid(vm_id) else None
        if vm is None or vm.org_id != org_id or vm.deleted_at is not None:
            raise NotFound(f"VM {vm_id!r} not found in your organization")
        return vm

    async def find_vm(self, org_id: str, vm_id: str) -> VmRow | None:
        try:
            return await self.get_vm(org_id, vm_id)
        except NotFound:
            return None

    async def list_vms(
        self, org_id: str, offset: int = 0, limit: int | None = None, labels: Sequence[tuple[str, str | None]] = ()
    ) -> list[VmRow]:
        """The org's VMs, oldest first; with `labels`, only those that have every (key, value) pair (value None:
        the key with any value), filtered in the query so pages stay whole."""
        async with self.db.read() as session:
            mine = (VmRow.org_id == org_id, col(VmRow.deleted_at).is_(None))
            query = select(VmRow).where(*mine).order_by(col(VmRow.created_at), col(VmRow.id))
            for key, value in labels:
                query = query.where(self._has_label(key, value))
            return list(await session.exec(query.offset(offset).limit(limit)))

    def _has_label(self, key: str, value: str | None) -> Any:
        """The row's labels (a JSON object) hold `key` (with `value` unless None), as the database's own JSON
        functions read them: keys are bound as values, never spliced into a JSON path."""
        source = func.json_each(VmRow.labels) if self.db.is_sqlite else func.json_each_text(cast(VmRow.labels, JSON))
        pairs = source.table_valued("key", "value").alias("label")
        match = [pairs.c.key == key] + ([pairs.c.value == value] if value is not None else [])
        return exists(select(literal(1)).select_from(pairs).where(*match))

    async def change_labels(self, org_id: str, vm_id: str, change: Callable[[dict[str, str]], dict[str, str]]) -> dict[str, str]:
        """The VM's labels made `change(labels)` and checked (validate_vm_labels) in one transaction, so two
        changes at once never lose one another's keys; the labels it has now."""
        async with self.db.write() as session:
            vm = await session.get(VmRow, vm_id) if is_uuid(vm_id) else None
            if vm is None or vm.org_id != org_id or vm.deleted_at is not None:
                raise NotFound(f"VM {vm_id!r} not found in your organization")
            labels = validate_vm_labels(change(dict(json.loads(vm.labels))))
            await self._change_vm(session, vm_id, {"labels": json.dumps(labels, sort_keys=True)})
            return labels

    async def grow_disk(self, vm: VmRow, size_mib: int) -> VmRow:
        """Record the VM's disk at its new size, within its org's disk limit (counted with the other disks in
        the same transaction, so two resizes at once cannot both pass it)."""
        async with self.db.write() as session:
            await serialize(session, f"org:{vm.org_id}")
            current = await session.get(VmRow, vm.id)
            if current is None or current.deleted_at is not None:
                raise NotFound(f"VM {vm.id!r} not found in your organization")
            limits, org = self.limits_for(vm.org_id)
            _, disk = await self._existing(session, vm.org_id)
            check(limits, "max_disk_mib", disk, size_mib - current.fs_size_mib, org, "delete VMs it no longer uses")
            return await self._change_vm(session, vm.id, {"fs_size_mib": size_mib})

    async def live_vms(self) -> list[VmRow]:
        async with self.db.read() as session:
            query = select(VmRow).where(
                col(VmRow.state).in_(LIVE_STATES), col(VmRow.deleted_at).is_(None), col(VmRow.host_id) == self.host_id
            )
            return list(await session.exec(query))

    async def update_vm(self, vm_id: str, **changes: Any) -> VmRow:
        async with self.db.write() as session:
            return await self._change_vm(session, vm_id, changes)

    @staticmethod
    async def _change_vm(session: AsyncSession, vm_id: str, changes: dict[str, Any]) -> VmRow:
        """Every change of a VM row goes through here, so a VM marked deleted loses its domains and its SSH key
        in the same transaction, whichever path deleted it (a delete, its recovery, a discarded restore)."""
        vm = await session.get(VmRow, vm_id)
        if vm is None:
            raise NotFound(f"VM {vm_id!r} not found")
        for key, value in changes.items():
            setattr(vm, key, value)
        session.add(vm)
        if changes.get("deleted_at") is not None:
            for domain in await session.exec(select(DomainRow).where(DomainRow.vm_id == vm_id)):
                await session.delete(domain)
            if (ssh_key := await session.get(SshKeyRow, vm_id)) is not None:
                await session.delete(ssh_key)
        return vm

    @staticmethod
    async def _drop(session: AsyncSession, operation_id: str | None) -> None:
        """An intent, gone in the transaction that records its outcome."""
        if operation_id is not None and (operation := await session.get(OperationRow, operation_id)) is not None:
            await session.delete(operation)

    async def mark_vm_deleted(self, vm_id: str, operation_id: str | None = None) -> None:
        await self.finish(operation_id, vm_id, state=VmState.DEAD, deleted_at=utcnow(), pid=0)

    # Intents

    async def begin(self, operation: OperationRow) -> OperationRow:
        async with self.db.write() as session:
            session.add(operation)
            return operation

    async def finish(self, operation_id: str | None, vm_id: str | None = None, **changes: Any) -> VmRow | None:
        """Record an operation's outcome on its VM and drop its intent, in one transaction."""
        async with self.db.write() as session:
            vm = await self._change_vm(session, vm_id, changes) if vm_id is not None else None
            await self._drop(session, operation_id)
            return vm

    async def operations(self) -> list[OperationRow]:
        async with self.db.read() as session:
            query = (
                select(OperationRow)
                .join(VmRow, col(VmRow.id) == col(OperationRow.vm_id))
                .where(col(VmRow.host_id) == self.host_id)
                .order_by(col(OperationRow.started_at))
            )
            return list(await session.exec(query))

    async def commits_in_flight(self) -> set[str]:
        """The commits that operations in flight on any host are making, forks' copies among them (a shared commit
        store keeps their files: a copy's folder is there a moment before its row)."""
        async with self.db.read() as session:
            made = {commit_id for commit_id in await session.exec(select(OperationRow.commit_id)) if commit_id}
            forks = select(ForkRequestRow.commit_id).where(ForkRequestRow.state == "running")
            return made | {commit_id for commit_id in await session.exec(forks) if commit_id}

    async def vm(self, vm_id: str) -> VmRow | None:
        """Any VM row, of any org and state (start-up reconciliation)."""
        return await self._row(VmRow, vm_id)

    async def claim_vms(self, layer_ids: set[str]) -> list[str]:
        """The VMs not deleted whose writable layer is one of `layer_ids` (files on this store's host) become this
        host's; returns their ids."""
        async with self.db.write() as session:
            query = select(VmRow).where(col(VmRow.deleted_at).is_(None), col(VmRow.host_id) != self.host_id)
            claimed = [vm for vm in await session.exec(query) if vm.layer_id in layer_ids]
            for vm in claimed:
                vm.host_id = self.host_id
                session.add(vm)
            return [vm.id for vm in claimed]

    async def all_vms(self) -> list[VmRow]:
        """The VMs of this store's host that are not deleted."""
        async with self.db.read() as session:
            query = select(VmRow).where(col(VmRow.deleted_at).is_(None), col(VmRow.host_id) == self.host_id)
            return list(await session.exec(query))

    async def _row(self, model: type[Row], key: str) -> Row | None:
        async with self.db.read() as session:
            return await session.get(model, key)

    async def _undeleted(self, model: type[Row]) -> list[Row]:
        async with self.db.read() as session:
            return list(await session.exec(select(model).where(col(model.deleted_at).is_(None))))

    # Commits

    async def add_commit(self, commit: CommitRow | None, vm_id: str, new_layer: LayerRow, operation_id: str, **changes: Any) -> None:
        """Record a commit (None: a snapshot rolled back), move its VM onto the new layer it now writes to,
        and drop the commit's intent, together. A commit is recorded only within its org's limits."""
        async with self.db.write() as session:
            if commit is not None:
                await serialize(session, f"org:{commit.org_id}")
                await self._check_commit_room(session, commit.org_id, commit.size_bytes)
                session.add(commit)
            session.add(new_layer)
            await session.flush()
            await self._change_vm(session, vm_id, {**changes, "layer_id": new_layer.id})
            await self._drop(session, operation_id)

    async def add_commit_copy(self, copy: CommitRow, source_id: str) -> CommitRow:
        """Record a copy of a commit (a fork's: the source's files under another id, on the source's layer chain)
        within its org's commit limits, as a commit it took would count, and only while the source is not being
        deleted: from then on the layers under the copy stay for as long as its row does, whatever becomes of the
        source (the layer collection counts every org's commits)."""
        async with self.db.write() as session:
            await serialize(session, f"commit:{source_id}")
            if not await self._commit_is_live(session, source_id):
                raise NotFound("the public tag points at a commit that no longer exists")
            await serialize(session, f"org:{copy.org_id}")
            await self._check_commit_room(session, copy.org_id, copy.size_bytes)
            session.add(copy)
            return copy

    async def require_commit_room(self, org_id: str) -> None:
        """Before a commit is taken: the org has room for one more (its size is known only once it is taken;
        it is counted again, with its size, in the transaction that records it)."""
        async with self.db.read() as session:
            await self._check_commit_room(session, org_id, None)

    async def _check_commit_room(self, session: AsyncSession, org_id: str, size_bytes: int | None) -> None:
        """Commits of the org that are not deleted: their count and bytes, with one more (of `size_bytes`, or of
        a size not yet known: then the org must still be under its byte limit)."""
        limits, org = self.limits_for(org_id)
        count, used = (
            await session.exec(
                select(func.count(), func.coalesce(func.sum(CommitRow.size_bytes), 0)).where(
                    CommitRow.org_id == org_id, col(CommitRow.deleted_at).is_(None)
                )
            )
        ).one()
        hint = "delete commits it no longer needs: vers commit list, DELETE /api/v1/commits/{commit_id}"
        check(limits, "max_commits", int(count), 1, org, hint)
        used_mib = math.ceil(int(used) / MIB)
        if size_bytes is None:
            if int(used) >= limits.max_commit_mib * MIB:
                raise exceeded("max_commit_mib", limits.max_commit_mib, used_mib, 1, org, hint)
        elif int(used) + size_bytes > limits.max_commit_mib * MIB:
            raise exceeded("max_commit_mib", limits.max_commit_mib, used_mib, math.ceil(size_bytes / MIB), org, hint)

    async def get_commit(self, org_id: str, commit_id: str) -> CommitRow:
        commit = await self._commit(commit_id)
        if commit is None or commit.org_id != org_id:
            raise NotFound(f"commit {commit_id!r} not found in your organization")
        return commit

    async def find_commit(self, org_id: str, commit_id: str) -> CommitRow | None:
        commit = await self._commit(commit_id)
        return commit if commit is not None and commit.org_id == org_id else None

    async def visible_commit(self, org_id: str, commit_id: str) -> CommitRow:
        """One of the org's commits, or any org's public one: what the org may branch, restore, or read the
        lineage of (and nothing more: GetCommit, tags, changes and deletion stay the owner's)."""
        commit = await self._commit(commit_id)
        if commit is None or (commit.org_id != org_id and not commit.is_public):
            raise NotFound(f"commit {commit_id!r} not found in your organization, nor among public commits")
        return commit

    async def update_commit(self, org_id: str, commit_id: str, name: str | None, description: str | None, is_public: bool) -> CommitRow:
        """Change one of the org's commits (None: unchanged), with its audit entries in the same transaction."""
        async with self.db.write() as session:
            await serialize(session, f"commit:{commit_id}")
            commit = await session.get(CommitRow, commit_id) if is_uuid(commit_id) else None
            if commit is None or commit.org_id != org_id or not await self._commit_is_live(session, commit_id):
                raise NotFound(f"commit {commit_id!r} not found in your organization")
            before = {"name": commit.name, "description": commit.description}
            commit.name = commit.name if name is None else name
            commit.description = commit.description if description is None else description
            after = {"name": commit.name, "description": commit.description}
            if after != before:
                audit.record(session, org_id, "commit.update", commit.id, before, after)
            if is_public != commit.is_public:
                audit.record(session, org_id, "commit.publish" if is_public else "commit.unpublish", commit.id, None, {"name": commit.name})
            commit.is_public = is_public
            session.add(commit)
            return commit

    async def list_public_commits(self, limit: int, offset: int) -> tuple[list[CommitRow], int]:
        """Every org's public commits, newest first, and how many there are."""
        being_deleted = select(CommitDeletionRow.commit_id)
        public = (col(CommitRow.is_public).is_(True), col(CommitRow.deleted_at).is_(None), col(CommitRow.id).not_in(being_deleted))
        async with self.db.read() as session:
            total = (await session.exec(select(func.count()).select_from(CommitRow).where(*public))).one()
            query = select(CommitRow).where(*public).order_by(col(CommitRow.created_at).desc(), col(CommitRow.id))
            return list(await session.exec(query.limit(limit).offset(offset))), int(total)

    async def visible_commit_ids(self, org_id: str, commit_ids: Iterable[str]) -> set[str]:
        """Those of the commits the org may see: its own, and public ones (not deleted)."""
        wanted = sorted({commit_id for commit_id in commit_ids if is_uuid(commit_id)})
        if not wanted:
            return set()
        async with self.db.read() as session:
            query = select(CommitRow.id).where(
                col(CommitRow.id).in_(wanted), col(CommitRow.deleted_at).is_(None),
                or_(CommitRow.org_id == org_id, col(CommitRow.is_public).is_(True)),
            )  # fmt: skip
            return set(await session.exec(query))

    async def published_commit(self, commit_id: str) -> CommitRow:
        """A commit of any org, for a fork: the caller has shown it is the tag of a public repository."""
        commit = await self._commit(commit_id)
        if commit is None:
            raise NotFound("the public tag points at a commit that no longer exists")
        return commit

    async def _commit(self, commit_id: str) -> CommitRow | None:
        if not is_uuid(commit_id):
            return None
        async with self.db.read() as session:
            commit = await session.get(CommitRow, commit_id)
            live = commit is not None and await self._commit_is_live(session, commit_id)
        return commit if live else None

    @staticmethod
    async def _commit_is_live(session: AsyncSession, commit_id: str) -> bool:
        commit = await session.get(CommitRow, commit_id)
        return commit is not None and commit.deleted_at is None and await session.get(CommitDeletionRow, commit_id) is None

    async def commit_row(self, commit_id: str) -> CommitRow | None:
        """Any commit row, deleted or not (start-up reconciliation)."""
        return await self._row(CommitRow, commit_id)

    async def live_commits(self) -> list[CommitRow]:
        return await self._undeleted(CommitRow)

    async def list_commits(self, org_id: str, limit: int, offset: int) -> tuple[list[CommitRow], int]:
        being_deleted = select(CommitDeletionRow.commit_id)
        mine = (CommitRow.org_id == org_id, col(CommitRow.deleted_at).is_(None), col(CommitRow.id).not_in(being_deleted))
        async with self.db.read() as session:
            total = (await session.exec(select(func.count()).select_from(CommitRow).where(*mine))).one()
            query = select(CommitRow).where(*mine).order_by(col(CommitRow.created_at).desc()).limit(limit).offset(offset)
            return list(await session.exec(query)), int(total)

    async def lineage(self, org_id: str, commit_id: str) -> list[CommitRow]:
        """The commit (the org's own or a public one) and the commits it descends from, newest first, as far as
        the org may see them: its own and public ones. The first it may not see (another org's private commit,
        e.g. what a public commit was made from) ends the chain."""
        chain = [await self.visible_commit(org_id, commit_id)]
        async with self.db.read() as session:
            while (parent_id := chain[-1].grandparent_commit_id) is not None:
                parent = await session.get(CommitRow, parent_id)
                if parent is None or (parent.org_id != org_id and not parent.is_public):
                    break
                chain.append(parent)
            return [commit for commit in chain if await self._commit_is_live(session, commit.id)]

    async def begin_commit_deletion(self, org_id: str, commit_id: str, reason: str = "", key_id: str | None = None) -> CommitRow:
        """Mark the commit as being deleted unless a VM still stands on it: from here on it cannot be
        restored, branched or tagged (GetCommit answers NOT_FOUND). The mark keeps who asked and why, for
        the audit entry of its end."""
        async with self.db.write() as session:
            await serialize(session, f"commit:{commit_id}")
            commit = await session.get(CommitRow, commit_id) if is_uuid(commit_id) else None
            if commit is None or commit.org_id != org_id or not await self._commit_is_live(session, commit_id):
                raise NotFound(f"commit {commit_id!r} not found in your organization")
            users = list(
                await session.exec(
                    select(VmRow.id, VmRow.org_id).where(VmRow.parent_commit_id == commit_id, col(VmRow.deleted_at).is_(None))
                )
            )
            vm_ids = [vm_id for vm_id, owner in users if owner == org_id]  # another org's VM is never named
            if vm_ids:
                raise Conflict(f"commit {commit_id} is in use by VM {', '.join(vm_ids)}: delete the VM first")
            if users:  # VMs other orgs branched from it while it was public stand on its memory and disk
                raise Conflict(
                    f"commit {commit_id} is in use by {len(users)} VM(s) of other organizations, branched from it while it "
                    f"was public: it can be deleted once they are gone (unpublishing it stops new ones)"
                )
            session.add(
                CommitDeletionRow(
                    commit_id=commit_id, org_id=org_id, api_key_id=acting_key_id(org_id) if key_id is None else key_id, reason=reason
                )
            )
            return commit

    async def abandon_commit_deletion(self, commit_id: str) -> None:
        async with self.db.write() as session:
            if (row := await session.get(CommitDeletionRow, commit_id)) is not None:
                await session.delete(row)

    async def finish_commit_deletion(self, commit_id: str) -> None:
        """The commit is deleted, and the audit log says so in the same transaction, naming who asked."""
        async with self.db.write() as session:
            commit = await session.get(CommitRow, commit_id)
            row = await session.get(CommitDeletionRow, commit_id)
            if commit is not None and commit.deleted_at is None:
                commit.deleted_at = utcnow()
                session.add(commit)
                after = {"reason": row.reason} if row and row.reason else None
                audit.record(
                    session, commit.org_id, "commit.delete", commit.id, {"name": commit.name}, after, key_id=row.api_key_id if row else ""
                )
            if row is not None:
                await session.delete(row)

    async def commit_deletions(self) -> list[CommitDeletionRow]:
        async with self.db.read() as session:
            return list(await session.exec(select(CommitDeletionRow)))

    async def collectable(
        self, org_id: str, candidates: dict[str, tuple[str, int]], protected: set[str], untagged_older_than_days: int
    ) -> list[Collectable]:
        """What a collection deletes, oldest first: the candidates (commit id -> reason, minimum age in days)
        old enough, and with `untagged_older_than_days` every older commit, of the org only, none protected,
        none being deleted, none a VM was started from (its deletion would be refused, as DeleteCommit's is).
        A commit whose layers a VM's or another commit's chain passes through may go: its record and its
        memory go, the layers stay for as long as anything stands on them (the layer collection's rule)."""
        now = utcnow()
        being_deleted = select(CommitDeletionRow.commit_id)
        used = select(VmRow.parent_commit_id).where(col(VmRow.deleted_at).is_(None), col(VmRow.parent_commit_id).is_not(None))
        mine = (
            CommitRow.org_id == org_id, col(CommitRow.deleted_at).is_(None), col(CommitRow.id).not_in(being_deleted),
            col(CommitRow.id).not_in(used), col(CommitRow.id).not_in(sorted(protected)),
        )  # fmt: skip
        chosen: list[Collectable] = []
        async with self.db.read() as session:
            if untagged_older_than_days > 0:
                cutoff = now - timedelta(days=untagged_older_than_days)
                reason = f"no tag names it and it is older than {untagged_older_than_days} days"
                for commit in await session.exec(select(CommitRow).where(*mine, col(CommitRow.id).not_in(list(candidates)))):
                    if as_utc(commit.created_at) < cutoff:
                        chosen.append(Collectable(commit, reason))
            named = [commit_id for commit_id in candidates if is_uuid(commit_id)]
            for commit in await session.exec(select(CommitRow).where(*mine, col(CommitRow.id).in_(named))):
                reason, min_age_days = candidates[commit.id]
                if min_age_days <= 0 or as_utc(commit.created_at) <= now - timedelta(days=min_age_days):
                    chosen.append(Collectable(commit, reason))
        return sorted(chosen, key=lambda found: (as_utc(found.commit.created_at), found.commit.id))

    # Layers

    async def layer_chain(self, layer_id: str) -> list[LayerRow]:
        async with self.db.read() as session:
            chain = []
            current: str | None = layer_id
            while current is not None:
                layer = await session.get(LayerRow, current)
                assert layer is not None
                chain.append(layer)
                current = layer.parent_id
            return chain

    async def layer_ids(self) -> list[str]:
        async with self.db.read() as session:
            return list(await session.exec(select(LayerRow.id)))

    async def layer_graph(self) -> LayerGraph:
        async with self.db.read() as session:
            return await self._layer_graph(session)

    @staticmethod
    async def _layer_graph(session: AsyncSession) -> LayerGraph:
        layers = {layer.id: layer for layer in await session.exec(select(LayerRow))}
        roots: dict[Holder, str] = {}
        for vm_id, layer_id in await session.exec(select(VmRow.id, VmRow.layer_id).where(col(VmRow.deleted_at).is_(None))):
            roots[("vm", vm_id)] = layer_id
        commits = select(CommitRow.id, CommitRow.layer_id).where(col(CommitRow.deleted_at).is_(None))
        for commit_id, layer_id in await session.exec(commits):
            roots[("commit", commit_id)] = layer_id
        # Layers an unsettled intent names stay until it is settled (an operator may need them).
        for operation in await session.exec(select(OperationRow)):
            for end, held in (("old", operation.old_layer_id), ("new", operation.new_layer_id)):
                if held in layers:
                    roots[("operation", f"{operation.id}:{end}")] = held
        return LayerGraph(layers, roots)

    async def collect_garbage_layers(self) -> list[str]:
        """Delete the rows of layers no live VM or commit stands on; return their ids (files to remove)."""
        async with self.db.write() as session:
            graph = await self._layer_graph(session)
            layers = graph.layers
            reachable = graph.reachable()
            garbage = [layer_id for layer_id in layers if layer_id not in reachable]
            # children before parents (the longer chain first), for the foreign key
            for layer_id in sorted(garbage, key=lambda layer_id: len(graph.chain(layer_id)), reverse=True):
                await session.delete(layers[layer_id])
                await session.flush()
            return garbage

    # Secret scans

    async def secret_scan(self, commit_id: str, rules_version: str) -> SecretScanRow | None:
        async with self.db.read() as session:
            return await session.get(SecretScanRow, (commit_id, rules_version))

    async def save_secret_scan(self, scan: SecretScanRow) -> SecretScanRow:
        """The scan's result; when one is already kept for the commit and rules, that one stays the answer."""
        async with self.db.write() as session:
            found = await session.get(SecretScanRow, (scan.commit_id, scan.rules_version))
            if found is not None:
                return found
            session.add(scan)
            return scan

    async def force_secret_scan(self, commit_id: str, rules_version: str, key_id: str, purpose: str) -> SecretScanRow:
        """Its findings published anyway: by whom, when and for what (the latest such publish)."""
        async with self.db.write() as session:
            scan = await session.get(SecretScanRow, (commit_id, rules_version))
            if scan is None:
                raise NotFound(f"commit {commit_id} has not been scanned with rules {rules_version}")
            scan.forced_by_key_id, scan.forced_at, scan.purpose = key_id, utcnow(), purpose
            session.add(scan)
            return scan

    # SSH keys

    async def ssh_key(self, vm_id: str) -> SshKeyRow | None:
        async with self.db.read() as session:
            return await session.get(SshKeyRow, vm_id)

    async def save_ssh_key(self, key: SshKeyRow) -> SshKeyRow:
        """The VM's key; when two asks race, the first one saved is every caller's answer."""
        async with self.db.write() as session:
            found = await session.get(SshKeyRow, key.vm_id)
            if found is not None:
                return found
            session.add(key)
            return key

    # Domains

    async def add_domain(self, domain: DomainRow, limit: int | None = None) -> DomainRow:
        """A new domain on a live VM of its org, within the org's limit (the caller's, from the registry;
        `limit` or the default where no caller is known). The VM's row is locked (PostgreSQL; SQLite writes
        one transaction at a time anyway), so a delete of the VM at the same moment either comes after and
        takes the domain with it, or comes first and this answers NOT_FOUND."""
        async with self.db.write() as session:
            await serialize(session, f"org:{domain.org_id}")
            found = (await session.exec(select(VmRow).where(VmRow.id == domain.vm_id).with_for_update())).first()
            if found is None or found.org_id != domain.org_id or found.deleted_at is not None:
                raise NotFound(f"VM {domain.vm_id!r} not found in your organization")
            limits, org = self.limits_for(domain.org_id)
            if principal_of(domain.org_id) is None and limit is not None:
                limits = limits.replace(max_domains=limit)
            count = (await session.exec(select(func.count()).select_from(DomainRow).where(DomainRow.org_id == domain.org_id))).one()
            check(limits, "max_domains", int(count), 1, org, "delete domains it no longer uses: DELETE /api/v1/domains/{domain_id}")
            await insert_unique(session, domain, f"domain {domain.name!r} already exists: choose another name")
            return domain

    async def list_domains(self, org_id: str, vm_id: str = "", offset: int = 0, limit: int | None = None) -> list[DomainRow]:
        async with self.db.read() as session:
            query = select(DomainRow).where(DomainRow.org_id == org_id)
            if vm_id:
                query = query.where(DomainRow.vm_id == vm_id)
            query = query.order_by(col(DomainRow.created_at), col(DomainRow.name))
            return list(await session.exec(query.offset(offset).limit(limit)))

    async def get_domain(self, org_id: str, domain_id: str) -> DomainRow:
        async with self.db.read() as session:
            domain = await session.get(DomainRow, domain_id) if is_uuid(domain_id) else None
        if domain is None or domain.org_id != org_id:
            raise NotFound(f"domain {domain_id!r} not found in your organization")
        return domain

    async def delete_domain(self, org_id: str, domain_id: str) -> DomainRow:
        async with self.db.write() as session:
            domain = await session.get(DomainRow, domain_id) if is_uuid(domain_id) else None
            if domain is None or domain.org_id != org_id:
                raise NotFound(f"domain {domain_id!r} not found in your organization")
            await session.delete(domain)
            return domain

    async def domain_named(self, name: str) -> DomainRow | None:
        """The domain of any org by its full name (the gateway's requests: the caller is checked after)."""
        async with self.db.read() as session:
            return (await session.exec(select(DomainRow).where(DomainRow.name == name))).first()

    # Forks

    async def fork_request(self, saga_id: str) -> ForkRequestRow | None:
        """A saga's fork, of any org (the API of several hosts sends its calls to its VM's host)."""
        async with self.db.read() as session:
            return await session.get(ForkRequestRow, saga_id)

    async def claim_fork(self, saga_id: str, org_id: str) -> ForkRequestRow:
        """The fork of a saga, recorded as running on the saga's first call."""
        async with self.db.write() as session:
            row = await session.get(ForkRequestRow, saga_id)
            if row is None:
                row = ForkRequestRow(saga_id=saga_id, org_id=org_id)
                session.add(row)
            elif row.org_id != org_id:
                raise NotFound(f"fork {saga_id} not found in your organization")
            return row

    async def record_fork(self, saga_id: str, **changes: Any) -> ForkRequestRow:
        """Note what a fork made. An abandoned fork stays abandoned: what it made is noted all the same, so
        that it can be found and deleted."""
        async with self.db.write() as session:
            row = await session.get(ForkRequestRow, saga_id)
            if row is None:
                raise NotFound(f"fork {saga_id} not found")
            for key, value in changes.items():
                if key != "state" or row.state != "abandoned":
                    setattr(row, key, value)
            session.add(row)
            return row

    async def abandon_fork(self, saga_id: str, org_id: str) -> ForkRequestRow:
        """Mark a saga's fork abandoned; if its call never came, a row says so, and the call is refused."""
        async with self.db.write() as session:
            row = await session.get(ForkRequestRow, saga_id)
            if row is None:
                row = ForkRequestRow(saga_id=saga_id, org_id=org_id)
            elif row.org_id != org_id:
                raise NotFound(f"fork {saga_id} not found in your organization")
            row.state = "abandoned"
            session.add(row)
            return row

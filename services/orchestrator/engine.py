"""The VM engine of one host: QEMU processes, the layer store, commits and copy-on-write branches."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import resource
import shutil
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from stat import S_ISDIR
from typing import Any, TypeVar

from services.common.errors import (
    Conflict,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)  # fmt: skip
from services.common.faults import fault_point
from services.common.files import fsync_dir, fsync_path, fsync_tree, write_atomic
from services.common.settings import Settings
from services.orchestrator import secrets
from services.orchestrator.accel import choose_accelerator
from services.orchestrator.agent import ExecResult, OnOutput
from services.orchestrator.commitstore import PART, open_commit_store
from services.orchestrator.envvars import EnvVars
from services.orchestrator.execs import ExecRegistry
from services.orchestrator.images import DEFAULT_IMAGE, Image, find_image
from services.orchestrator.integrity import Verifier
from services.orchestrator.layout import Layout
from services.orchestrator.machine import LAYER_OPTIONS, LaunchSpec, Machine, QmpError, copy_sparse, find_processes, kill_process
from services.orchestrator.models import (
    LIVE_STATES,
    CommitRow,
    LayerRow,
    MachineShape,
    OperationRow,
    SecretScanRow,
    SshKeyRow,
    VmRow,
    VmState,
    require_not_paused,
)  # fmt: skip
from services.orchestrator.network import GuestNetwork, guest_resolvers, new_ssh_key, parse_ranges
from services.orchestrator.placement import HOST_FULL
from services.orchestrator.pool import WAITING_MIB, BranchPool, Pooled, RootPool
from services.orchestrator.store import Collectable, LayerGraph, OrchestratorStore
from services.orchestrator.supervisor import LiveVm, Supervisor
from services.orchestrator.vmconfig import MAX_DISK_MIB, VmConfig, check_branch_count, check_network, image_named
from vers.orchestrator.v1.hosts_pb2 import HostRoom

log = logging.getLogger(__name__)
T = TypeVar("T")

# Per VM: guest ports reached from outside, and connections to them open at once.
MAX_FORWARDED_PORTS = 32
MAX_TUNNELS_PER_VM = 256
SSH_PORT = 22
MIB = 1024 * 1024
# How often a host agent lets go of its copies of deleted commits, and how old a copy with no row must be.
CACHE_EVICTION_SECONDS = 300


# Deletes a commit's reservation in the tagging service: raises Conflict when a tag still names it.
ReserveDeletion = Callable[[str, str], Awaitable[None]]
SHUTDOWN_SLEEPS_AT_ONCE = 2
# Kills a console shell that runs already (every process reading the console), so vers-init starts it anew with
# /etc/environment as it is now: a VM from the pool may have started one before its organization's variables.
RESTART_CONSOLE = 'for f in /proc/[0-9]*/fd/0; do [ "$f" -ef /dev/hvc0 ] && p=${f#/proc/} && kill -KILL "${p%%/*}"; done 2>/dev/null; true'
# The states a VM can be asked to go to.
SETTABLE_STATES = (VmState.PAUSED, VmState.RUNNING, VmState.SLEEPING)


def _manifest(folder: Path) -> dict[str, str] | None:
    try:
        return dict(json.loads((folder / "manifest.json").read_text()))
    except (OSError, ValueError):
        return None


class Engine:
    def __init__(self, settings: Settings, store: OrchestratorStore) -> None:
        self.settings = settings
        self.store = store
        self.layout = Layout.of(settings)
        self.network = GuestNetwork(
            self.layout.run,
            allow=parse_ranges(settings.guest_allow, "VERS_GUEST_ALLOW"),
            dns=guest_resolvers(settings.guest_dns),
        )
        self.accel = "tcg"
        # The VMs running here, and those being changed or connected to: one record each.
        self.supervisor = Supervisor()
        self.verifier = Verifier(self.layout)
        # Where commits are kept for every host (VERS_COMMIT_STORE): the data folder itself, or a shared folder.
        self.commit_store = open_commit_store(self.layout)
        # Streamed execs and the VMs' exec logs.
        self.execs = ExecRegistry(self)
        self.env_vars = EnvVars(settings, store.db)
        self.reserve_deletion: ReserveDeletion | None = None
        # The image a name means to the caller: the app gives each organization its own and the public ones
        # (services.orchestrator.images_api); the built images alone until then.
        self.image_lookup: Callable[[str], Awaitable[Image]] = self._builtin_image
        self._tasks: set[asyncio.Task[None]] = set()
        self._changes: set[asyncio.Future[Any]] = set()
        self._finishing_deletions: asyncio.Task[None] | None = None
        # Secret scans under way, by commit: a second ask of the same commit waits for the first.
        self._scans: dict[str, asyncio.Task[SecretScanRow]] = {}
        # ...and one at a time on this host: each takes every scan thread and reads disks at full speed
        self._scan_turn = asyncio.Semaphore(1)
        self._closing = False
        self._evicted_at = time.monotonic()
        # Host room promised to changes under way (VMs starting, commits, sleeps), not yet used.
        self._reserved: Counter[str] = Counter()
        # Booted root VMs kept ready for new root VMs (VERS_ROOT_POOL_SIZE): each boots the engine's own way.
        self.pool = RootPool(
            settings.root_pool_size, [name.strip() for name in settings.root_pool_images.split(",") if name.strip()],
            lookup=self._builtin_image, checked=lambda config, image: config.checked(image, self.network),
            boot=self._launch_root, room=self._pool_room,
            ready=lambda machine: machine.agent.wait_ready(self.settings.boot_timeout_seconds),
            run_folder=self.layout.run_folder, layer_file=lambda layer_id: self.layout.layer_file(layer_id),
        )  # fmt: skip
        # QEMU processes waiting for a branch of the commits branched last (VERS_BRANCH_POOL_SIZE, _COMMITS).
        self.branch_pool = BranchPool(
            settings.branch_pool_size, settings.branch_pool_commits, launch=self._launch_waiting, room=self._branch_pool_room,
            run_folder=self.layout.run_folder, layer_file=lambda layer_id: self.layout.layer_file(layer_id),
        )  # fmt: skip

    async def _builtin_image(self, name: str) -> Image:
        return image_named(self.layout.images, name)

    # Start-up and shutdown

    async def start(self) -> None:
        for folder in self.layout.private_folders:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            _check_private(folder)
        await asyncio.to_thread(self.commit_store.prepare)
        image = find_image(self.layout.images, DEFAULT_IMAGE)
        if image is None:
            log.warning("no images in %s: run `make images`", self.layout.images)
        else:
            # the probe result is a fact about this host, kept beside the images every data folder shares
            self.accel = await choose_accelerator(self.settings.accel, image, self.layout.images / "accel.json")
        log.info("VMs run with %s", self.accel.upper())
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:  # every connection into a VM is two descriptors here
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        await asyncio.to_thread(self.network.setup)
        await self._claim_local_vms()
        await self._recover()
        await self._wake_after_shutdown()
        if await self.store.commit_deletions():
            self._finish_deletions_later()
        if image is not None:
            self.pool.start()

    async def close(self) -> None:
        """Stop managing the VMs: put them to sleep (memory to disk), so nothing runs unmanaged and the next
        start wakes them where they were; with VERS_KEEP_VMS_RUNNING they go on running, to be adopted."""
        self._closing = True
        await self.execs.close()
        while self._changes:
            await asyncio.gather(*self._changes, return_exceptions=True)
        await self.pool.close()  # after the changes under way, which may take from them or give back
        await self.branch_pool.close()
        for task in [*self._tasks, *self._scans.values()]:  # watchers, boot waits (a booting VM sleeps as it is), scans
            task.cancel()
        await asyncio.gather(*self._tasks, *self._scans.values(), return_exceptions=True)
        if not self.settings.keep_vms_running:
            await self._sleep_for_shutdown()
        await self.supervisor.close()
        if not find_processes(self.layout.run):
            if self.network.available:
                await asyncio.to_thread(self.network.teardown)  # made again on the next start
            with contextlib.suppress(OSError):
                self.layout.run.rmdir()  # in tmpfs, named after the data folder: no VM left, nothing to keep

    async def _sleep_for_shutdown(self) -> None:
        running = self.supervisor.running()
        limit = asyncio.Semaphore(SHUTDOWN_SLEEPS_AT_ONCE)

        async def sleep_one(vm_id: str, org_id: str) -> None:
            with self.supervisor.hold(vm_id, org_id) as record:
                async with limit, record.lock:
                    vm = await self.store.vm(vm_id)
                    if vm is None or vm.deleted_at is not None or vm.state not in LIVE_STATES or record.machine is None:
                        return
                    try:
                        await self._sleep(vm, by_shutdown=True)
                        log.info("VM %s is asleep until the next start", vm_id)
                    except Exception as error:
                        log.warning("VM %s could not go to sleep on shutdown: %s; it keeps running", vm_id, error)

        if running:
            log.info("putting %d VMs to sleep", len(running))
        await asyncio.gather(*(sleep_one(record.vm_id, record.org_id) for record in running))

    async def _wake_after_shutdown(self) -> None:
        for vm in await self.store.all_vms():
            manifest = _manifest(self.layout.sleep_folder(vm.id))
            if vm.state != VmState.SLEEPING or not manifest or not manifest.get("by_shutdown"):
                continue
            try:
                with self.supervisor.hold(vm.id, vm.org_id) as record:
                    async with record.lock:
                        await self._wake(vm, manifest.get("state", VmState.RUNNING))
                log.info("woke VM %s, asleep since the last shutdown", vm.id)
            except Exception as error:
                log.warning("VM %s could not wake after the restart: %s", vm.id, error)

    # Recovery: what a crash left half-done is finished or undone, before any request is served

    async def _claim_local_vms(self) -> None:
        """A VM whose writable layer is in this host's folder is this host's, whatever host its row names: one made
        before the platform had several hosts (host ""), or before this orchestrator's role changed. Claimed
        before the start-up's reconciliation, which would otherwise stop its QEMU and remove its saved memory."""
        claimed = await self.store.claim_vms({path.stem for path in self.layout.layers.glob("*.qcow2")})
        if claimed:
            log.warning(
                "VMs %s have their disks on this host: they are this host's (%r) from now on", ", ".join(claimed), self.store.host_id
            )

    async def _recover(self) -> None:
        processes = find_processes(self.layout.run)
        for operation in await self.store.operations():
            try:
                await self._recover_operation(operation, processes)
            except Exception as error:
                log.error("could not finish or undo the %s of VM %s: %s", operation.kind, operation.vm_id, error)
        for vm in await self.store.live_vms():
            try:
                await self._adopt(vm, processes.get(vm.id))
            except Exception as error:
                log.error("VM %s could not be adopted: %s; it is marked dead", vm.id, error)
                if vm.id in processes:
                    kill_process(processes[vm.id], vm.id)
                await self._mark_dead(vm.id)
        live = {vm.id for vm in await self.store.live_vms()}
        for vm_id, pid in find_processes(self.layout.run).items():
            if vm_id not in live:
                log.warning("stopping QEMU %d of VM %s, which no live VM owns", pid, vm_id)
                kill_process(pid, vm_id)
        await self._remove_orphans()
        await self.collect_garbage()

    async def _recover_operation(self, op: OperationRow, processes: dict[str, int]) -> None:
        vm = await self.store.vm(op.vm_id)
        pid = processes.get(op.vm_id)
        log.warning("finishing or undoing the %s of VM %s that a crash interrupted", op.kind, op.vm_id)
        if op.kind == "restore":
            # The caller never learned of these VMs: they go.
            for vm_id in json.loads(op.vm_ids):
                if vm_id in processes:
                    kill_process(processes.pop(vm_id), vm_id)
                await self.store.mark_vm_deleted(vm_id)
                shutil.rmtree(self.layout.run_folder(vm_id), ignore_errors=True)
            await self.store.finish(op.id)
        elif op.kind == "delete":
            if pid is not None:
                kill_process(processes.pop(op.vm_id), op.vm_id)
            await self.store.mark_vm_deleted(op.vm_id, op.id)
            shutil.rmtree(self.layout.run_folder(op.vm_id), ignore_errors=True)
            shutil.rmtree(self.layout.sleep_folder(op.vm_id), ignore_errors=True)
        elif op.kind == "commit":
            await self._recover_commit(op, vm, pid)
        elif op.kind == "sleep":
            await self._recover_sleep(op, vm, pid, processes)
        elif op.kind == "wake":
            await self._recover_wake(op, vm, pid, processes)
        else:  # create: the VM is adopted (and boots on) if its QEMU runs, and is dead if not
            await self.store.finish(op.id)

    async def _recover_commit(self, op: OperationRow, vm: VmRow | None, pid: int | None) -> None:
        """A commit is recorded together with the drop of its intent, so an intent left means no commit:
        its files go. Whether QEMU already writes to the new layer is asked of QEMU itself."""
        assert op.commit_id and op.old_layer_id and op.new_layer_id
        new_layer = self.layout.layer_file(op.new_layer_id)
        if pid is not None and vm is not None:
            machine = await Machine.control(op.vm_id, self.layout.run_folder(op.vm_id), pid)
            try:
                switched = str(new_layer) in await machine.disk_chain()
                await machine.cancel_migration()
                if vm.state == VmState.RUNNING and not await machine.is_running():
                    await machine.resume()
            finally:
                await machine.qmp.close()
        else:
            # No QEMU to ask: an overlay it never wrote to reads as the layer under it, so keeping one is safe.
            switched = new_layer.exists()
        if await self.store.commit_row(op.commit_id) is None:
            await asyncio.to_thread(self.commit_store.delete_commit, op.commit_id)  # and its copy in a shared store
        (self.layout.run_folder(op.vm_id) / f"ram-{op.commit_id}").unlink(missing_ok=True)
        if not switched:
            new_layer.unlink(missing_ok=True)
            await self.store.finish(op.id)
        elif vm is not None and vm.layer_id == op.old_layer_id:
            await self.store.add_commit(None, op.vm_id, LayerRow(id=op.new_layer_id, parent_id=op.old_layer_id), op.id)
        else:
            raise RuntimeError(
                f"QEMU writes to layer {op.new_layer_id}, but the VM's row names layer {vm.layer_id if vm else '?'}: "
                f"left for an operator (vers admin fsck)"
            )

    async def _recover_sleep(self, op: OperationRow, vm: VmRow | None, pid: int | None, processes: dict[str, int]) -> None:
        folder = self.layout.sleep_folder(op.vm_id)
        manifest = _manifest(folder)
        if pid is not None and vm is not None:
            # QEMU still runs: the sleep is undone, the VM goes on as it was.
            machine = await Machine.control(op.vm_id, self.layout.run_folder(op.vm_id), pid)
            try:
                await machine.cancel_migration()
                if vm.state == VmState.RUNNING and not await machine.is_running():
                    await machine.resume()
            finally:
                await machine.qmp.close()
            shutil.rmtree(folder, ignore_errors=True)
            await self.store.finish(op.id)
        elif manifest is not None:
            # Saved whole, and QEMU ended: the sleep is finished.
            shutil.rmtree(self.layout.run_folder(op.vm_id), ignore_errors=True)
            await self.store.finish(op.id, op.vm_id, state=VmState.SLEEPING, pid=0, ram_mode=manifest["ram_mode"], ram_source="")
        else:
            shutil.rmtree(folder, ignore_errors=True)
            await self.store.finish(op.id)  # QEMU gone, nothing saved: adoption finds it dead

    async def _recover_wake(self, op: OperationRow, vm: VmRow | None, pid: int | None, processes: dict[str, int]) -> None:
        if pid is not None:
            machine = await Machine.control(op.vm_id, self.layout.run_folder(op.vm_id), pid)
            try:
                running = await machine.is_running()
            finally:
                await machine.qmp.close()
            if running:  # it had woken: the wake is finished, adoption attaches it
                await self.store.finish(op.id, op.vm_id, state=VmState.RUNNING, pid=pid)
                shutil.rmtree(self.layout.sleep_folder(op.vm_id), ignore_errors=True)
                return
            kill_process(processes.pop(op.vm_id), op.vm_id)
        shutil.rmtree(self.layout.run_folder(op.vm_id), ignore_errors=True)
        log.warning("VM %s was waking when the orchestrator stopped: it is asleep again", op.vm_id)
        await self.store.finish(op.id, op.vm_id, state=VmState.SLEEPING, pid=0)

    async def _adopt(self, vm: VmRow, pid: int | None) -> None:
        machine = await Machine.adopt(vm.id, self.layout.run_folder(vm.id), pid, self.settings.serial_log_max_bytes) if pid else None
        if machine is None and (self.layout.sleep_folder(vm.id) / "state").exists():
            log.warning("VM %s was waking when the orchestrator stopped: it is asleep again", vm.id)
            await self.store.update_vm(vm.id, state=VmState.SLEEPING, pid=0)
            return
        if machine is None:
            log.warning("VM %s is gone (its QEMU is not running): marked dead", vm.id)
            await self._mark_dead(vm.id)
            return
        booted = vm.state != VmState.BOOTING
        state = VmState.PAUSED if booted and not await machine.is_running() else vm.state
        await self.store.update_vm(vm.id, state=state, pid=machine.pid)
        self._attach(vm, machine, booted=booted)
        log.info("adopted VM %s (%s)", vm.id, state)
        await self._finish_disk_growth(vm, machine, running=state == VmState.RUNNING)

    async def _remove_orphans(self) -> None:
        """Files no row owns: commit folders of no commit, layers of no layer row, saved states of VMs
        that are not asleep, run folders of VMs that do not run, RAM copies of interrupted commits. With a
        shared commit store, this host's copies of deleted commits go too, and the store's files that no row
        of any host names (listed before the rows are read: what another host publishes meanwhile is named by
        its operation in flight)."""
        listed = await asyncio.to_thread(self.commit_store.stored)
        vms = {vm.id: vm for vm in await self.store.all_vms()}
        commits = {commit.id for commit in await self.store.live_commits()}
        commits |= {row.commit_id for row in await self.store.commit_deletions()}
        layers = set(await self.store.layer_ids())
        # What an intent recovery could not settle names is kept for an operator, whatever its rows say.
        unsettled = await self.store.operations()
        busy_vms = {vm_id for op in unsettled for vm_id in (op.vm_id, *json.loads(op.vm_ids))}
        commits |= {op.commit_id for op in unsettled if op.commit_id}
        layers |= {layer for op in unsettled for layer in (op.old_layer_id, op.new_layer_id) if layer}
        if self.commit_store.shared:
            in_flight = await self.store.commits_in_flight()  # of every host
            for removed in await asyncio.to_thread(self.commit_store.remove_orphans, listed, commits | in_flight, layers):
                log.warning("removed %s from the commit store: no commit or layer row names it", removed)
        orphans: list[Path] = []
        orphans += [p for p in self.layout.commits.iterdir() if p.name not in commits]
        orphans += [p for p in self.layout.layers.glob("*.qcow2") if p.stem not in layers]
        orphans += list(self.layout.layers.glob(f"{secrets.WORKSPACE_PREFIX}*"))  # a scan a crash cut short
        orphans += list(self.layout.layers.glob(f"*{PART}*"))  # a copy from the commit store a crash cut short
        orphans += [
            p
            for p in self.layout.sleeping.iterdir()
            if p.name not in busy_vms and (p.name not in vms or vms[p.name].state != VmState.SLEEPING)
        ]
        orphans += [
            p for p in self.layout.run.iterdir() if p.name not in busy_vms and (p.name not in vms or vms[p.name].state not in LIVE_STATES)
        ]
        orphans += [p for p in self.layout.run.glob("*/ram-*") if p.parent.name not in busy_vms]
        orphans += [p for p in self.layout.exec_logs.iterdir() if p.name not in vms and p.name not in busy_vms]
        for path in orphans:
            log.warning("removing %s, which nothing owns", path)
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    # Watching

    @asynccontextmanager
    async def _exclusive(self, vm: VmRow) -> AsyncIterator[VmRow]:
        """One change of a VM at a time, made on its row as it is once the change's turn comes; a change
        that waits longer than half a call's deadline for its turn is refused rather than made late. A VM of
        another host is changed there (a dead one anywhere: only its records are left)."""
        if vm.host_id != self.store.host_id and vm.state != VmState.DEAD:
            raise FailedPrecondition(f"VM {vm.id} runs on host {vm.host_id!r}, not on this one: send its calls to the orchestrator API")
        with self.supervisor.hold(vm.id, vm.org_id) as record:
            try:
                async with asyncio.timeout(self.settings.rpc_timeout_seconds / 2):
                    await record.lock.acquire()
            except TimeoutError:
                raise Unavailable(f"VM {vm.id} is busy with another change (a commit, branch, sleep or wake): try again") from None
            try:
                yield await self.store.get_vm(vm.org_id, vm.id)
            finally:
                record.lock.release()

    async def _whole(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run a change to its end even when its caller goes away (a cancelled call, a stop's grace running
        out): a change stopped halfway is for crash recovery, not for a cancellation. A stop waits for it,
        and refuses new ones."""
        if self._closing:
            coroutine.close()
            raise Unavailable("the orchestrator is stopping: try again once it has started again")
        task = asyncio.ensure_future(coroutine)
        self._changes.add(task)
        task.add_done_callback(self._changes.discard)
        task.add_done_callback(lambda done: done.cancelled() or done.exception())  # its caller may be gone
        return await asyncio.shield(task)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _attach(self, vm: VmRow, machine: Machine, booted: bool) -> None:
        record = self.supervisor.attach(vm, machine, booted)
        if not booted:
            self._spawn(self._wait_boot(vm.id, machine, record.booted))
        self._spawn(self._watch(record, machine))

    async def _wait_boot(self, vm_id: str, machine: Machine, booted: asyncio.Event) -> None:
        try:
            await machine.agent.wait_ready(self.settings.boot_timeout_seconds)
        except Exception as error:
            log.warning("VM %s did not boot: %s; %s", vm_id, error, Machine.read_log(machine.run_folder))
            await machine.kill()
            return
        vm = await self.store.vm(vm_id)
        if vm is not None:  # a new VM's /etc/environment, before anyone can exec in it or open its console
            await self.env_vars.install(machine.agent, vm.org_id, vm_id)
        await self.store.update_vm(vm_id, state=VmState.RUNNING)
        booted.set()

    async def _watch(self, record: LiveVm, machine: Machine) -> None:
        await machine.wait_exit()
        if record.machine is machine:
            self.supervisor.detach(record)
            if not record.ending:
                log.warning("VM %s stopped: %s", record.vm_id, Machine.read_log(machine.run_folder) or "its QEMU exited")
                await self._mark_dead(record.vm_id)
        await machine.agent.close(f"VM {record.vm_id} stopped while the command ran")

    async def _mark_dead(self, vm_id: str) -> None:
        """A dead VM cannot run again: its run folder (its RAM file is in tmpfs, as large as its memory)
        goes at once; its QEMU log was logged when it stopped."""
        shutil.rmtree(self.layout.run_folder(vm_id), ignore_errors=True)
        await self.store.update_vm(vm_id, state=VmState.DEAD, pid=0)

    def _running(self, vm: VmRow) -> tuple[LiveVm, Machine]:
        """The VM's record and its QEMU; FailedPrecondition saying what to do when it does not run here."""
        record = self.supervisor.get(vm.id)
        machine = record.machine if record is not None else None
        if machine is None and vm.state == VmState.SLEEPING:
            raise FailedPrecondition(
                f'VM {vm.id} is sleeping: wake it first (PATCH /vm/{vm.id}/state {{"state": "Running"}}, or vers resume)'
            )
        if record is None or machine is None:
            raise FailedPrecondition(f"VM {vm.id} is {vm.state}, not running: start a new VM from one of its commits")
        return record, machine

    def machine(self, vm: VmRow) -> Machine:
        return self._running(vm)[1]

    async def wait_booted(self, vm: VmRow, skip_wait: bool = False) -> Machine:
        record, machine = self._running(vm)
        event = record.booted
        if not event.is_set():
            if skip_wait:
                raise FailedPrecondition(f"VM {vm.id} is still booting")
            waiter = asyncio.ensure_future(event.wait())
            exited = asyncio.ensure_future(machine.wait_exit())
            await asyncio.wait({waiter, exited}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            exited.cancel()
            if not event.is_set():
                raise FailedPrecondition(f"VM {vm.id} stopped while booting")
        return machine

    # Room on this host

    def _admit(self, what: str, memory_mib: int = 0, run_mib: int = 0, disk_mib: int = 0) -> None:
        """Refuse `what` unless this host keeps its reserves free after it: memory, the run folder's tmpfs
        (RAM files) and the data folder's disk. What is free now is not enough to go by (a VM's memory is
        used as its guest touches it): the VMs running here count with all of their memory, and changes
        under way with what they were promised. The pool's booted VMs are let go when their room is needed."""
        try:
            self._check_room(what, memory_mib, run_mib, disk_mib)
        except ResourceExhausted:
            # the pools' QEMU processes go only when that makes the room (a request too big anyway leaves them)
            self._check_room(what, memory_mib, run_mib, disk_mib, pools=False)
            self.pool.release()
            self.branch_pool.release()

    def _pool_room(self, config: VmConfig) -> None:
        """Room for one more VM of `config` for the pool, and for one like it beside it (the pool never takes
        the last room a request could have)."""
        need = 2 * config.mem_size_mib
        self._check_room(f"a booted VM of {config.mem_size_mib} MiB for the pool", need, need, 0)

    def _branch_pool_room(self, commit: CommitRow) -> None:
        """Room for one more QEMU waiting for a branch, and for a VM of the commit's beside it."""
        self._check_room("a QEMU waiting for a branch", WAITING_MIB + commit.mem_size_mib, commit.mem_size_mib, 0)

    def _check_room(self, what: str, memory_mib: int = 0, run_mib: int = 0, disk_mib: int = 0, pools: bool = True) -> None:
        needs = {"memory": memory_mib, "run": run_mib, "disk": disk_mib}
        for kind, (resource_name, room, reserve, setting) in self._rooms(pools).items():
            need = needs[kind]
            if room is not None and room - need < reserve:
                raise ResourceExhausted(
                    f"this host has {max(room, 0)} MiB of {resource_name} left for new work and keeps {reserve} MiB of it "
                    f"free ({setting}): {what} needs {need} MiB. Delete VMs or commits, put VMs to sleep, try again "
                    f"later, or ask the operator to make room or lower {setting}",
                    details=[HOST_FULL],
                )

    def _rooms(self, pools: bool = True) -> dict[str, tuple[str, int | None, int, str]]:
        """Each resource new work takes on this host: its name for messages, the MiB left for new work (None
        where the system does not say), the reserve kept free and the setting that sets it."""
        settings = self.settings
        running = self.supervisor.running()
        # the pool's VMs count as any VM does (they are let go when a request needs their room: _admit)
        pooled_run = self.pool.memory_mib if pools else 0  # booted VMs' RAM files (waiting QEMUs map their commit's)
        pooled = pooled_run + (self.branch_pool.memory_mib if pools else 0)
        running_memory = sum(r.memory_mib for r in running) + self._reserved["memory"] + pooled
        running_run = sum(r.run_mib for r in running) + self._reserved["run"] + pooled_run
        memory_total, memory_free = self._memory()
        run_total, run_free = _space(self.layout.run)
        _disk_total, disk_free = _space(self.layout.data)
        if disk_free is not None:
            disk_free -= self._reserved["disk"]

        def room(free: int | None, total: int | None, promised: int) -> int | None:
            return free if free is None or total is None else min(free, total - promised)

        return {
            "memory": ("memory", room(memory_free, memory_total, running_memory), settings.host_reserve_memory_mib,
                       "VERS_HOST_RESERVE_MEMORY_MIB"),
            "run": (f"tmpfs at {self.layout.run}", room(run_free, run_total, running_run), settings.host_reserve_run_mib,
                    "VERS_HOST_RESERVE_RUN_MIB"),
            "disk": (f"disk at {self.layout.data}", disk_free, settings.host_reserve_disk_mib, "VERS_HOST_RESERVE_DISK_MIB"),
        }  # fmt: skip

    def _memory(self) -> tuple[int | None, int | None]:
        """This host's memory for VMs (VERS_HOST_MEMORY_MIB when it offers less than the machine has) and what of
        the machine's is available now, in MiB."""
        total, free = _memory()
        if self.settings.host_memory_mib:
            total = min(total or self.settings.host_memory_mib, self.settings.host_memory_mib)
        return total, free

    def room(self) -> HostRoom:
        """What this host offers VMs and has left for new ones, its reserves taken off (a host agent's heartbeat)."""
        rooms = self._rooms()
        memory_total, _free = self._memory()

        def left(kind: str) -> int:
            _name, room, reserve, _setting = rooms[kind]
            return max(room - reserve, 0) if room is not None else 0

        return HostRoom(
            memory_total_mib=memory_total or 0,
            memory_free_mib=left("memory"),
            disk_free_mib=left("disk"),
            run_free_mib=left("run"),
            vcpus=os.cpu_count() or 1,
            vm_count=len(self.supervisor.running()),
        )

    @contextmanager
    def _room(self, what: str, memory_mib: int = 0, run_mib: int = 0, disk_mib: int = 0) -> Iterator[None]:
        """Admitted, and the room held for the change until it ends (a VM it starts counts by itself then)."""
        self._admit(what, memory_mib, run_mib, disk_mib)
        with self._hold(memory_mib, run_mib, disk_mib):
            yield

    @contextmanager
    def _hold(self, memory_mib: int = 0, run_mib: int = 0, disk_mib: int = 0) -> Iterator[None]:
        held = Counter(memory=memory_mib, run=run_mib, disk=disk_mib)
        self._reserved.update(held)
        try:
            yield
        finally:
            self._reserved.subtract(held)

    @asynccontextmanager
    async def _room_or_discard(self, vms: Sequence[VmRow], operation: OperationRow, what: str, **needs: int) -> AsyncIterator[None]:
        """Host room is asked after the org's limits (the answer a tenant can act on comes first): VMs
        just recorded are deleted again when the host has no room for them."""
        try:
            self._admit(what, **needs)
        except ResourceExhausted:
            for vm in vms:
                await self._discard(vm.id)
            await self.store.finish(operation.id)
            raise
        with self._hold(**needs):
            yield

    # Creating VMs

    async def create_root(self, org_id: str, config: VmConfig, wait_boot: bool) -> VmRow:
        vm = await self._whole(self._create_root(org_id, config))
        if wait_boot:
            await self.wait_booted(vm)
            return await self.store.get_vm(org_id, vm.id)
        return vm

    async def _create_root(self, org_id: str, config: VmConfig) -> VmRow:
        image = await self.image_lookup(config.image_name)
        config = config.checked(image, self.network)
        memory, disk = config.mem_size_mib, config.fs_size_mib
        # A booted VM of the pool when one of this image and shape is ready: its ids become the new VM's.
        pooled = self.pool.take(config, image)
        layer = LayerRow(id=pooled.layer_id if pooled else str(uuid.uuid4()), base_path=str(image.disk))
        vm = VmRow(
            id=pooled.vm_id if pooled else str(uuid.uuid4()), org_id=org_id, labels=json.dumps(dict(config.labels or {})),
            vcpu_count=config.vcpu_count, mem_size_mib=memory, fs_size_mib=disk, image_name=image.name,
            kernel_path=str(image.kernel), initramfs_path=str(image.initramfs), layer_id=layer.id, ram_mode="shared",
            network=config.network,
        )  # fmt: skip
        # The row (with the VM's id, which names its QEMU) exists before QEMU does, so a crash in between
        # leaves a process that the next start finds and adopts.
        operation = OperationRow(id=str(uuid.uuid4()), vm_id=vm.id, kind="create")
        try:
            await self.store.add_vms(org_id, [vm], [layer], operation)  # within the org's limits, or refused
        except BaseException:
            if pooled is not None:  # no org had it: it stays in the pool
                self.pool.give_back(pooled)
            raise
        try:
            async with self._room_or_discard([vm], operation, f"a VM of {memory} MiB", memory_mib=memory, run_mib=memory):
                if pooled is not None:
                    return await self._start_pooled(vm, pooled.machine, operation)
                return await self._start_root(vm, image, operation)
        except BaseException:
            if pooled is not None and self.supervisor.get(vm.id) is None:
                await pooled.machine.kill()
            raise

    async def _launch_root(self, vm: VmRow, image: Image) -> Machine:
        """A root VM's disk (a layer over its image's), its RAM file, and its QEMU started, booting."""
        folder = self.layout.run_folder(vm.id)
        layer = self.layout.layer_file(vm.layer_id)
        await _qemu_img("create", *LAYER_OPTIONS, "-b", image.disk, "-F", "qcow2", layer, f"{vm.fs_size_mib}M")
        folder.mkdir(mode=0o700, parents=True)
        with os.fdopen(os.open(folder / "ram", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as ram:
            ram.truncate(vm.mem_size_mib * MIB)
        return await Machine.launch(self._spec(vm, incoming=False, ram_file=folder / "ram"))

    async def _start_root(self, vm: VmRow, image: Image, operation: OperationRow) -> VmRow:
        try:
            machine = await self._launch_root(vm, image)
        except Exception as error:
            shutil.rmtree(self.layout.run_folder(vm.id), ignore_errors=True)
            await self.store.finish(operation.id, vm.id, state=VmState.DEAD)
            raise Internal(f"VM {vm.id} could not start: {error}") from error
        fault_point("create.after_launch")
        done = await self.store.finish(operation.id, vm.id, pid=machine.pid)
        assert done is not None
        self._attach(vm, machine, booted=False)
        return done

    async def _start_pooled(self, vm: VmRow, machine: Machine, operation: OperationRow) -> VmRow:
        """A booted VM of the pool made the org's: its variables written as a fresh VM's are once it has booted,
        and a console shell that started before them (vers-init waits 30 s for them) started again."""
        try:
            await self.env_vars.install(machine.agent, vm.org_id, vm.id)
            restarted = await machine.agent.exec(["sh", "-c", RESTART_CONSOLE], timeout_secs=30)
            if restarted.exit_code != 0:
                raise Internal(f"its console could not be started again (exit code {restarted.exit_code})")
        except Exception as error:
            await machine.kill()
            shutil.rmtree(self.layout.run_folder(vm.id), ignore_errors=True)
            await self.store.finish(operation.id, vm.id, state=VmState.DEAD)
            raise Internal(f"VM {vm.id} could not start: {error}") from error
        fault_point("create.after_launch")
        done = await self.store.finish(operation.id, vm.id, pid=machine.pid, state=VmState.RUNNING)
        assert done is not None
        self._attach(done, machine, booted=True)
        return done

    def _spec(self, vm: VmRow, incoming: bool, ram_file: Path | None) -> LaunchSpec:
        return LaunchSpec(
            vm_id=vm.id, run_folder=self.layout.run_folder(vm.id), accel=self.accel, vcpus=vm.vcpu_count,
            mem_mib=vm.mem_size_mib, kernel=Path(vm.kernel_path), initramfs=Path(vm.initramfs_path),
            disk=self.layout.layer_file(vm.layer_id), ram_mode=vm.ram_mode, ram_file=ram_file, incoming=incoming,
            network=vm.network, prefix=tuple(self.network.launch_prefix(vm.network)),
            qemu_user=self.settings.qemu_user, serial_log_max_bytes=self.settings.serial_log_max_bytes,
            tcg_code_cache_mib=self.settings.tcg_code_cache_mib,
        )  # fmt: skip

    async def restore(self, org_id: str, commit: CommitRow, count: int = 1, vm_ids: Sequence[str] = ()) -> list[VmRow]:
        return await self._whole(self._restore(org_id, commit, count, vm_ids))

    async def _restore(self, org_id: str, commit: CommitRow, count: int, vm_ids: Sequence[str]) -> list[VmRow]:
        """Start `count` VMs from a commit: each a new qcow2 overlay on the commit's frozen layer, its RAM
        the commit's memory file mapped copy-on-write, its devices loaded from the saved state. All start
        or none does. `vm_ids` are their ids when the caller noted them before (a fork's saga)."""
        check_branch_count(count)
        ids = list(vm_ids) or [str(uuid.uuid4()) for _ in range(count)]
        assert len(ids) == count
        if commit.network:
            check_network(commit.network, self.network)
        if not self.layout.commit_folder(commit.id).exists():
            # a copy from the shared commit store comes first: a host without room for the VMs or the copy says so
            # before it copies anything (and the orchestrator API tries another host)
            what = f"{count} VM(s) of {commit.mem_size_mib} MiB and this host's copy of commit {commit.id}"
            self._admit(what, memory_mib=count * commit.mem_size_mib, disk_mib=commit.size_bytes // MIB)
        await self._ready(commit)
        # QEMU processes started for this commit before, waiting for its state (a fork's VM has its id noted already)
        waiting: list[Pooled] = [] if vm_ids else self.branch_pool.take(commit, count)
        ids[: len(waiting)] = [pooled.vm_id for pooled in waiting]
        layers = [LayerRow(id=str(uuid.uuid4()), parent_id=commit.layer_id) for _ in range(count)]
        for layer, pooled in zip(layers, waiting, strict=False):
            layer.id = pooled.layer_id
        vms = [self._restored_row(org_id, commit, vm_id, layer.id) for vm_id, layer in zip(ids, layers, strict=True)]
        operation = OperationRow(
            id=str(uuid.uuid4()), vm_id=vms[0].id, kind="restore", commit_id=commit.id, vm_ids=json.dumps([vm.id for vm in vms])
        )
        try:
            await self.store.add_vms(org_id, vms, layers, operation, source=commit)
        except NotFound:  # the commit is being deleted (or no longer public): its QEMU processes go
            self.branch_pool.drop(commit.id)
            await asyncio.gather(*(self.branch_pool.discard(pooled) for pooled in waiting))
            raise
        except BaseException:
            for pooled in waiting:  # no org had them: they wait on
                self.branch_pool.give_back(pooled)
            raise
        machines: list[Machine | None] = [pooled.machine for pooled in waiting] + [None] * (count - len(waiting))
        try:
            async with self._room_or_discard(
                vms, operation, f"{count} VM(s) of {commit.mem_size_mib} MiB", memory_mib=count * commit.mem_size_mib
            ):
                results = await asyncio.gather(
                    *(self._start_restored(vm, commit, machine) for vm, machine in zip(vms, machines, strict=True)), return_exceptions=True
                )
        except BaseException:
            for pooled in waiting:
                if self.supervisor.get(pooled.vm_id) is None:
                    await pooled.machine.kill()
            raise
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            for vm in vms:
                await self._discard(vm.id)
            await self.store.finish(operation.id)
            await self.collect_garbage()
            raise failures[0]
        fault_point("restore.after_start")
        await self.store.finish(operation.id)
        self.branch_pool.branched(commit)
        return [r for r in results if isinstance(r, VmRow)]

    def _restored_row(self, org_id: str, commit: CommitRow, vm_id: str, layer_id: str) -> VmRow:
        """The row of a VM started from `commit`: its shape, a new layer over the commit's frozen one, its RAM the
        commit's memory file mapped copy-on-write (or loaded from the state, for a stream commit)."""
        # A fork keeps no link upstream: a VM started from another org's commit does not name it. A public
        # commit branched by id is named (it is public), so its owner cannot delete it under the VM; the
        # owner's VM it was made from is not (another org's VM is never shown).
        own = commit.org_id == org_id
        linked = own or commit.is_public
        return VmRow(
            id=vm_id,
            org_id=org_id,
            **commit.model_dump(include=set(MachineShape.model_fields)),
            layer_id=layer_id,
            ram_mode="private" if commit.ram_format == "file" else "anonymous",
            ram_source=str(self.layout.commit_folder(commit.id) / "ram") if commit.ram_format == "file" else "",
            parent_commit_id=commit.id if linked else None,
            grandparent_vm_id=commit.parent_vm_id if own else None,
        )

    async def _launch_waiting(self, commit: CommitRow, vm_id: str, layer_id: str) -> Machine:
        """A QEMU for a branch of `commit`, its disk layer made and its memory file mapped, waiting for the state."""
        vm = self._restored_row("", commit, vm_id, layer_id)
        await self._new_branch_layer(commit, vm)
        return await Machine.launch(self._spec(vm, incoming=True, ram_file=Path(vm.ram_source) if vm.ram_source else None))

    async def _new_branch_layer(self, commit: CommitRow, vm: VmRow) -> None:
        # named by its name alone: both are in the layers folder, and the chain works in any folder it is copied to
        frozen = self.layout.layer_file(commit.layer_id)
        await _qemu_img("create", *LAYER_OPTIONS, "-b", frozen.name, "-F", "qcow2", self.layout.layer_file(vm.layer_id))

    async def _ready(self, commit: CommitRow) -> None:
        """The commit's files on this host, as they were made: copied from a shared commit store when this host
        lacks them, then checked against the commit's checksums. A copy of this host's that does not match is
        dropped and copied again; when the store's own copy does not match, DataLoss says so."""
        chain = [layer.id for layer in await self.store.layer_chain(commit.layer_id)]
        for attempt in range(2):
            try:
                fetched = await asyncio.to_thread(self.commit_store.fetch, commit.id, chain)
            except OSError as error:
                if error.errno != errno.ENOSPC:
                    raise
                raise ResourceExhausted(
                    f"this host's disk filled up while it copied commit {commit.id} from the commit store: delete VMs or "
                    f"commits, or ask the operator to make room",
                    details=[HOST_FULL],
                ) from None
            try:
                await asyncio.to_thread(self.verifier.verify, commit.id, commit.checksums, commit.layer_id)
                return
            except DataLoss as error:
                if not self.commit_store.shared:
                    raise
                self.verifier.forget(commit.id)
                self.branch_pool.drop(commit.id)
                await asyncio.to_thread(self.commit_store.drop_cached, commit.id, commit.layer_id)
                if fetched or attempt:
                    raise DataLoss(
                        f"{error.message}, in the commit store {self.commit_store.describe()}: put the file back from a backup, "
                        f"or delete the commit"
                    ) from error
                log.warning("this host's copy of commit %s is damaged (%s): copying it again from the commit store", commit.id, error)

    async def _discard(self, vm_id: str) -> None:
        """A VM that never reached its caller: stopped and deleted."""
        record = self.supervisor.get(vm_id)
        if record is not None and (machine := record.machine) is not None:
            record.ending = True
            self.supervisor.detach(record)
            await machine.kill()
        await self.store.mark_vm_deleted(vm_id)
        shutil.rmtree(self.layout.run_folder(vm_id), ignore_errors=True)

    async def _start_restored(self, vm: VmRow, commit: CommitRow, machine: Machine | None = None) -> VmRow:
        """The VM's QEMU started (or `machine`, one of the pool's waiting for it), the commit's state loaded, resumed."""
        try:
            if machine is None:
                await self._new_branch_layer(commit, vm)
                ram_file = Path(vm.ram_source) if vm.ram_source else None
                machine = await Machine.launch(self._spec(vm, incoming=True, ram_file=ram_file))
            fault_point("restore.after_launch")
            await machine.restore(self.layout.commit_folder(commit.id) / "state")
            await machine.resume()
        except Exception as error:
            if machine is not None:
                await machine.kill()
            await self.store.update_vm(vm.id, state=VmState.DEAD)
            raise Internal(f"VM {vm.id} could not be restored from commit {commit.id}: {error}") from error
        vm = await self.store.update_vm(vm.id, state=VmState.RUNNING, pid=machine.pid)
        self._attach(vm, machine, booted=True)
        return vm

    # Commits

    async def commit(
        self, vm: VmRow, name: str, description: str, keep_paused: bool, commit_id: str | None = None
    ) -> tuple[CommitRow, float]:
        """Snapshot the VM's disk and memory as a new immutable commit; returns it and the pause in seconds.
        `commit_id` is its id when the caller noted it before (a fork's saga)."""
        await self.wait_booted(vm)  # not under the lock: a delete need not wait for a boot
        return await self._whole(self._commit_exclusive(vm, name, description, keep_paused, commit_id or str(uuid.uuid4())))

    async def _commit_exclusive(self, vm: VmRow, name: str, description: str, keep_paused: bool, commit_id: str) -> tuple[CommitRow, float]:
        async with self._exclusive(vm) as current:
            # Its memory goes to the commit (copied within tmpfs first while the VM is paused, when it has a RAM file).
            shared = current.ram_mode == "shared"
            room = self._room(
                f"a commit of {current.mem_size_mib} MiB of memory", run_mib=current.mem_size_mib if shared else 0,
                disk_mib=current.mem_size_mib,
            )  # fmt: skip
            with room:
                return await self._commit(current, name, description, keep_paused, commit_id)

    async def _commit(self, vm: VmRow, name: str, description: str, keep_paused: bool, commit_id: str) -> tuple[CommitRow, float]:
        machine = await self.wait_booted(vm)
        # A commit freezes the layer the row names: never one QEMU no longer writes to.
        chain = await machine.disk_chain()
        if chain[0] != str(self.layout.layer_file(vm.layer_id)):
            raise FailedPrecondition(
                f"VM {vm.id} writes its disk to {chain[0]}, not to the layer its record names: nothing is committed "
                f"until an operator has looked (vers admin fsck)"
            )
        folder = self.layout.commit_folder(commit_id)
        new_layer = LayerRow(id=str(uuid.uuid4()), parent_id=vm.layer_id)
        operation = await self.store.begin(
            OperationRow(
                id=str(uuid.uuid4()), vm_id=vm.id, kind="commit", commit_id=commit_id, old_layer_id=vm.layer_id,
                new_layer_id=new_layer.id,
            )
        )  # fmt: skip
        fault_point("commit.after_intent")
        # While the VM is paused its RAM is copied within tmpfs, which disk writeback cannot slow down;
        # it goes to the commit folder once the VM runs again.
        ram_copy = self.layout.run_folder(vm.id) / f"ram-{commit_id}" if vm.ram_mode == "shared" else None
        # Commands running in the guest are part of the snapshot (a branch goes on with them); only the
        # sending of one is waited for, so the snapshot never holds half a command.
        try:
            async with machine.agent.sending():
                try:
                    folder.mkdir(mode=0o700, parents=True)
                    paused = await machine.snapshot(self.layout.layer_file(new_layer.id), folder / "state", ram_copy, keep_paused)
                    fault_point("commit.after_state")
                    if ram_copy is not None:
                        await asyncio.to_thread(copy_sparse, ram_copy, folder / "ram")
                except Exception as error:
                    await self._undo_commit(machine, vm, new_layer, operation.id, folder)
                    raise Internal(f"commit of VM {vm.id} failed: {error}") from error
                finally:
                    if ram_copy is not None:
                        ram_copy.unlink(missing_ok=True)
        except DeadlineExceeded:  # the guest holds its port: no turn to send, nothing done yet
            await self.store.finish(operation.id)
            raise
        frozen = self.layout.layer_file(vm.layer_id)
        try:
            for path in (*folder.iterdir(), frozen):
                path.chmod(0o400)  # immutable from here on
            checksums = await asyncio.to_thread(self.verifier.checksums, commit_id, vm.layer_id)
            size = sum(_allocated(path) for path in (*folder.iterdir(), frozen))
            # On disk, with the folder entries that name them, before any row says the commit exists.
            await asyncio.to_thread(self._flush_commit, folder, frozen)
            # In a shared store, whole and flushed, before any row says the commit exists (or its call answers).
            chain = [layer.id for layer in await self.store.layer_chain(vm.layer_id)]
            await asyncio.to_thread(self.commit_store.publish, commit_id, chain, json.dumps(checksums))
            fault_point("commit.before_record")
            commit = CommitRow(
                id=commit_id, org_id=vm.org_id, name=name or f"commit of {vm.id}", description=description,
                parent_vm_id=vm.id, grandparent_commit_id=vm.parent_commit_id, layer_id=vm.layer_id,
                ram_format="file" if ram_copy else "stream", checksums=json.dumps(checksums), size_bytes=size,
                **vm.model_dump(include=set(MachineShape.model_fields)),
            )  # fmt: skip
            await self.store.add_commit(commit, vm.id, new_layer, operation.id, **({"state": VmState.PAUSED} if keep_paused else {}))
        except ResourceExhausted:  # the org's commit quota, checked again with the commit's own size
            await self._undo_commit(machine, vm, new_layer, operation.id, folder)
            raise
        except Exception as error:
            await self._undo_commit(machine, vm, new_layer, operation.id, folder)
            raise Internal(f"commit of VM {vm.id} failed: {error}") from error
        return commit, paused

    def _flush_commit(self, folder: Path, frozen: Path) -> None:
        fsync_tree(folder)
        fsync_path(frozen)
        fsync_dir(self.layout.commits)
        fsync_dir(self.layout.layers)

    async def _undo_commit(self, machine: Machine, vm: VmRow, new_layer: LayerRow, operation_id: str, folder: Path) -> None:
        """A commit that failed leaves no commit; if QEMU already writes to the new layer, the VM's row moves
        there with it, so what the VM writes from now on is never lost to a stale row."""
        if await self.store.commit_row(folder.name) is None:
            await asyncio.to_thread(self.commit_store.delete_commit, folder.name)  # and its copy in a shared store
        if await self._writes_to(machine, self.layout.layer_file(new_layer.id)):
            await self.store.add_commit(None, vm.id, new_layer, operation_id)
        else:
            self.layout.layer_file(new_layer.id).unlink(missing_ok=True)
            await self.store.finish(operation_id)

    @staticmethod
    async def _writes_to(machine: Machine, layer: Path) -> bool:
        """Is `layer` in the disk chain QEMU uses now? Asked of QEMU; when it cannot say, the file's existence:
        an overlay QEMU never wrote to reads as the layer under it, so keeping it is always safe."""
        try:
            return str(layer) in await machine.disk_chain()
        except Exception:
            return layer.exists()

    async def copy_commit(self, org_id: str, source: CommitRow, commit_id: str, name: str, description: str) -> CommitRow:
        """A new commit of the org that is `source` as it stands, made without running anything (a fork's: a VM
        restored from either is the same). Its memory and device state are hard links of the source's files, in
        a shared commit store and on this host (when it has them); its disk is the source's frozen layer chain;
        its checksums and size are the source's, its size counted against the org's commit quota. Either commit
        can be deleted and the other stays whole. `commit_id` is its id, noted by the caller before (a fork's
        saga); the files of a copy whose row was not recorded go again."""

        async def copy() -> CommitRow:
            if self.layout.commit_folder(source.id).exists() or not self.commit_store.shared:
                await self._ready(source)  # checked under its own name first: the copy's check then costs nothing

            def link() -> None:
                if self.commit_store.link(source.id, commit_id):
                    self.verifier.linked(commit_id)

            try:
                await asyncio.to_thread(link)
                # Another org's VM is never named; its commit only as a VM started from it would name it.
                upstream = source.id if source.org_id == org_id or source.is_public else None
                row = CommitRow(
                    id=commit_id, org_id=org_id, name=name, description=description, grandparent_commit_id=upstream,
                    layer_id=source.layer_id, ram_format=source.ram_format, checksums=source.checksums, size_bytes=source.size_bytes,
                    **source.model_dump(include=set(MachineShape.model_fields)),
                )  # fmt: skip
                return await self.store.add_commit_copy(row, source.id)
            except BaseException:
                if await self.store.commit_row(commit_id) is None:
                    self.verifier.forget(commit_id)
                    await asyncio.to_thread(self.commit_store.delete_commit, commit_id)
                raise

        return await self._whole(copy())

    async def delete_commit(self, org_id: str, commit_id: str, reason: str = "", key_id: str | None = None) -> None:
        """Marked as being deleted first (from then on it cannot be restored or tagged), then the tagging
        service confirms no tag names it and refuses new ones, then its files go. `reason`: why, when it is
        not its owner's own ask (a collection's rule); `key_id`: who asked, when the caller acts for them."""
        await self._whole(self._delete_commit(org_id, commit_id, reason, key_id))

    async def _delete_commit(self, org_id: str, commit_id: str, reason: str = "", key_id: str | None = None) -> None:
        assert self.reserve_deletion is not None
        commit = await self.store.begin_commit_deletion(org_id, commit_id, reason, key_id)
        fault_point("commit_delete.after_mark")
        try:
            await self.reserve_deletion(org_id, commit.id)
        except Conflict:
            await self.store.abandon_commit_deletion(commit.id)
            raise
        except Exception as error:
            # The tagging service may have recorded it before the answer was lost: asked again later.
            self._finish_deletions_later()
            raise Unavailable(
                f"commit {commit.id} is being deleted, but the tagging service did not answer ({error}); the deletion finishes when it does"
            ) from error
        try:
            await self._finish_commit_deletion(commit.id)
        except Exception:
            self._finish_deletions_later()  # marked and reserved: it is finished in the background
            raise

    async def _finish_commit_deletion(self, commit_id: str) -> None:
        fault_point("commit_delete.after_reserve")
        self.branch_pool.drop(commit_id)
        gone = self.verifier.forget(commit_id)
        await asyncio.to_thread(self.commit_store.delete_commit, commit_id)  # other hosts' copies go at their next start
        self.verifier.unlinked(gone)  # a fork's copy and its source share files: the other stays verified
        await self.store.finish_commit_deletion(commit_id)
        await self.collect_garbage()

    def _finish_deletions_later(self) -> None:
        if self._finishing_deletions is None or self._finishing_deletions.done():
            self._finishing_deletions = self._spawn(self._finish_commit_deletions())

    async def _finish_commit_deletions(self) -> None:
        """Deletions a crash interrupted: asked of the tagging service again until it answers."""
        assert self.reserve_deletion is not None
        delay = 0.5
        while pending := await self.store.commit_deletions():
            waiting = False
            for row in pending:
                try:
                    await self.reserve_deletion(row.org_id, row.commit_id)
                    await self._finish_commit_deletion(row.commit_id)
                    log.info("finished deleting commit %s", row.commit_id)
                except Conflict as error:
                    log.warning("commit %s stays: %s", row.commit_id, error.message)
                    await self.store.abandon_commit_deletion(row.commit_id)
                except Exception as error:
                    log.warning("deletion of commit %s is not finished yet: %s", row.commit_id, error)
                    waiting = True
            if waiting:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30)

    async def collect_garbage(self) -> None:
        for layer_id in await self.store.collect_garbage_layers():
            await asyncio.to_thread(self.commit_store.delete_layer, layer_id)

    # Bytes a commit holds

    def _commit_folder_bytes(self, commit_id: str) -> int:
        return self.commit_store.folder_bytes(commit_id)

    def _layer_bytes(self, graph: LayerGraph, commits: Sequence[CommitRow]) -> dict[str, int]:
        """Allocated bytes of the layers of these commits' chains in the store (an image's root disk under them counts not)."""
        return {layer_id: self.commit_store.layer_bytes(layer_id) for c in commits for layer_id in graph.chain(c.layer_id)}

    async def commit_bytes(self, commits: Sequence[CommitRow]) -> dict[str, tuple[int, int]]:
        """Each commit's bytes held alone (its memory and device state, and the layers of its chain nothing
        else stands on: what its deletion frees) and shared (its chain's layers other VMs or commits need)."""
        graph = await self.store.layer_graph()
        return await asyncio.to_thread(self._commit_bytes, graph, commits)

    def _commit_bytes(self, graph: LayerGraph, commits: Sequence[CommitRow]) -> dict[str, tuple[int, int]]:
        users = graph.users()
        sizes = self._layer_bytes(graph, commits)
        answer = {}
        for commit in commits:
            alone, shared = self._commit_folder_bytes(commit.id), 0
            for layer_id in graph.chain(commit.layer_id):
                if users.get(layer_id, set()) - {("commit", commit.id)}:
                    shared += sizes[layer_id]
                else:
                    alone += sizes[layer_id]
            answer[commit.id] = (alone, shared)
        return answer

    # Collecting commits

    async def collect_commits(
        self, org_id: str, chosen: Sequence[Collectable], dry_run: bool, key_id: str = ""
    ) -> list[tuple[Collectable, int]]:
        """Delete the chosen commits, oldest first, each through DeleteCommit's path (a tag made meanwhile keeps
        its commit: that one is left out), or with `dry_run` only say which. Each with the bytes its deletion
        frees, given all of them go: its memory and state, and the layers nothing needs once they are all gone,
        each such layer counted with one of them (the one that froze it, or else the oldest that stands on it)."""
        graph = await self.store.layer_graph()
        commits = [found.commit for found in chosen]
        layer_bytes = await asyncio.to_thread(self._layer_bytes, graph, commits)
        folder_bytes = {c.id: await asyncio.to_thread(self._commit_folder_bytes, c.id) for c in commits}
        deleted = list(chosen)
        # Any other failure (the tagging service not answering) ends the run: what it deleted so far stays deleted.
        if not dry_run:
            deleted = []
            for found in chosen:
                try:
                    await self.delete_commit(org_id, found.commit.id, found.reason, key_id)
                except (Conflict, NotFound) as error:  # tagged (or deleted) since it was chosen: it stays
                    log.info("collection keeps commit %s: %s", found.commit.id, error.message)
                    continue
                deleted.append(found)
        freed = _freed_bytes(graph, [found.commit for found in deleted], layer_bytes, folder_bytes)
        return [(found, freed[found.commit.id]) for found in deleted]

    # Secret scans

    async def scan(self, commit: CommitRow) -> SecretScanRow:
        """The commit's scan under the current rules and its owner's current environment variables (every new
        root VM and exec of the org holds their values in plain text): the one kept, or made now. Commits never
        change, so each is scanned once per rule set and set of values; two asks at once share one scan."""
        variables = await self.env_vars.get(commit.org_id)
        literals = secrets.org_literals(variables)
        rules_version = secrets.scan_version(literals, self.env_vars.digest_key() if literals else b"")
        kept = await self.store.secret_scan(commit.id, rules_version)
        if kept is not None:
            return kept
        key = f"{commit.id} {rules_version}"
        task = self._scans.get(key)
        if task is None:
            task = asyncio.create_task(self._scan(commit, rules_version, literals))
            self._scans[key] = task
            task.add_done_callback(lambda _: self._scans.pop(key, None))
        return await asyncio.shield(task)

    async def _scan(self, commit: CommitRow, rules_version: str, literals: list[bytes]) -> SecretScanRow:
        kept = await self.store.secret_scan(commit.id, rules_version)
        if kept is not None:
            return kept
        chain = await self.store.layer_chain(commit.layer_id)
        await asyncio.to_thread(self.commit_store.fetch, commit.id, [layer.id for layer in chain])  # a shared store's, to this host
        folder = self.layout.commit_folder(commit.id)
        memory = [folder / name for name in ("ram", "state") if (folder / name).exists()]
        base = Path(chain[-1].base_path) if chain and chain[-1].base_path else None
        allow = [pattern.strip() for pattern in self.settings.secret_scan_allow_paths.split(",") if pattern.strip()]
        async with self._scan_turn:
            findings = await secrets.scan_commit(memory, [self.layout.layer_file(layer.id) for layer in chain], base, allow, literals)
        found = [
            {"where": f.where, "path": f.path, "offset": f.offset, "rule": f.rule, "excerpt": f.excerpt} for f in findings
        ]  # fmt: skip
        return await self.store.save_secret_scan(
            SecretScanRow(commit_id=commit.id, rules_version=rules_version, findings=json.dumps(found))
        )

    # Running VMs

    @asynccontextmanager
    async def console(self, vm: VmRow) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
        """The VM's console; one person at a time, as on a physical terminal."""
        with self.supervisor.hold(vm.id, vm.org_id) as record:
            if record.console.locked():
                raise FailedPrecondition(f"someone is already connected to the console of VM {vm.id}")
            async with record.console:
                reader, writer = await asyncio.open_unix_connection(str(self.layout.run_folder(vm.id) / "console.sock"))
                try:
                    yield reader, writer
                finally:
                    writer.close()

    @asynccontextmanager
    async def connect_port(self, vm: VmRow, port: int) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
        """A TCP connection to the guest's `port`, through a host forward of the VM's user-mode stack (made
        on first use, kept while its QEMU runs), closed when the block ends. When nothing listens in the
        guest, the connection is closed at once (the stream reads its end)."""
        if not 1 <= port <= 65535:
            raise InvalidArgument(f"port must be between 1 and 65535, not {port}")
        if not vm.network:
            raise FailedPrecondition(f"VM {vm.id} was made before VMs had a network card: start a new VM to reach its ports")
        require_not_paused(vm)
        with self.supervisor.hold(vm.id, vm.org_id) as record:
            # Counted before any wait, so a burst of connections cannot pass the limits together.
            self._admit_tunnel(vm, record)
            record.tunnels += 1
            try:
                machine = await self.wait_booted(vm)
                if port == SSH_PORT:
                    await self.ssh_key(vm)  # the VM's own key, not its source's, before anyone logs in
                address = self.network.forward_address()
                async with record.forwarding:
                    host_port = machine.forwards.get(port)
                    if host_port is None:
                        if len(machine.forwards) >= MAX_FORWARDED_PORTS:
                            raise ResourceExhausted(f"VM {vm.id} already has {MAX_FORWARDED_PORTS} ports reached from outside")
                        host_port = await self._forward(machine, address, port)
                try:
                    reader, writer = await asyncio.open_connection(address, host_port)
                except OSError as error:
                    raise Unavailable(f"port {port} of VM {vm.id} cannot be reached: {error}") from error
                try:
                    yield reader, writer
                finally:
                    writer.close()
            finally:
                record.tunnels -= 1

    def _admit_tunnel(self, vm: VmRow, record: LiveVm) -> None:
        """Another connection into the VM within the limits: the VM's, this host's and its org's."""
        if record.tunnels >= MAX_TUNNELS_PER_VM:
            raise ResourceExhausted(f"VM {vm.id} already has {MAX_TUNNELS_PER_VM} open connections from outside: close some first")
        if self.supervisor.tunnels() >= self.settings.max_tunnels:
            raise ResourceExhausted(
                f"this host already carries {self.settings.max_tunnels} connections into VMs: try again later, or raise VERS_MAX_TUNNELS"
            )
        if self.supervisor.tunnels(vm.org_id) >= self.settings.org_max_tunnels:
            raise ResourceExhausted(
                f"your organization's VMs already have {self.settings.org_max_tunnels} open connections from outside "
                f"(VERS_ORG_MAX_TUNNELS): close some first"
            )

    async def exec(
        self, vm: VmRow, command: Sequence[str], env: Mapping[str, str] | None = None, stdin: bytes | None = None,
        working_dir: str = "", timeout_secs: int = 0, exec_id: str = "", on_output: OnOutput | None = None,
    ) -> ExecResult:  # fmt: skip
        """Run a command in the guest; several run at once, and none holds up a commit, branch or sleep. Its
        output goes to the VM's exec log under `exec_id`; with `on_output` it also goes there as it comes
        (streamed), and the result holds none of it."""
        self.check_exec(timeout_secs, stdin)
        machine = await self.wait_booted(vm)
        exec_log = self.execs.log(vm.id)
        exec_id = exec_id or str(uuid.uuid4())

        def streamed(stream: str, data: bytes) -> None:
            exec_log.append(exec_id, stream, data)
            assert on_output is not None
            on_output(stream, data)

        result = await machine.agent.exec(
            command, env=env, stdin=stdin, working_dir=working_dir,
            timeout_secs=timeout_secs or self.settings.exec_default_timeout_seconds,
            max_output=self.settings.exec_max_output_bytes, max_running=self.settings.vm_max_execs,
            on_output=streamed if on_output is not None else None,
        )  # fmt: skip
        if on_output is None:
            exec_log.append(exec_id, "stdout", result.stdout)
            exec_log.append(exec_id, "stderr", result.stderr)
        return result

    def check_exec(self, timeout_secs: int, stdin: bytes | None) -> None:
        """An exec's timeout and stdin within the limits."""
        limit = self.settings.exec_max_timeout_seconds
        if timeout_secs < 0 or timeout_secs > limit:
            raise InvalidArgument(
                f"timeout_secs must be between 1 and {limit} seconds (VERS_EXEC_MAX_TIMEOUT_SECONDS), or 0 for the default "
                f"of {self.settings.exec_default_timeout_seconds}; not {timeout_secs}"
            )
        if stdin and len(stdin) > self.settings.http_max_body_bytes:
            raise InvalidArgument(
                f"stdin is {len(stdin)} bytes, more than an exec takes ({self.settings.http_max_body_bytes}, "
                f"VERS_HTTP_MAX_BODY_BYTES): copy large input into the VM another way"
            )

    async def ssh_key(self, vm: VmRow) -> SshKeyRow:
        """The VM's SSH key (made on the first ask), installed in the guest as the one key root accepts: a
        branch asks for its own, which replaces what its source's disk held."""
        key = await self.store.ssh_key(vm.id)
        if key is None:
            private, public = new_ssh_key(f"vers-{vm.id}")
            key = await self.store.save_ssh_key(SshKeyRow(vm_id=vm.id, private_key=private, public_key=public))
        machine = await self.wait_booted(vm)
        if machine.ssh_key != key.public_key:
            script = (
                "umask 077 && mkdir -p /root/.ssh && printf '%s\\n' \"$1\" > /root/.ssh/authorized_keys.new && "
                "mv /root/.ssh/authorized_keys.new /root/.ssh/authorized_keys"
            )
            result = await machine.agent.exec(["sh", "-c", script, "sh", key.public_key], wait=30.0)
            if result.exit_code != 0:
                raise FailedPrecondition(f"VM {vm.id} did not take its SSH key: {result.stderr.decode(errors='replace').strip()}")
            machine.ssh_key = key.public_key
        return key

    async def _forward(self, machine: Machine, address: str, port: int) -> int:
        for _ in range(50):
            host_port = self.network.next_port()
            try:
                await machine.forward(address, host_port, port)
            except QmpError as error:
                log.debug("host port %d is taken (%s); trying another", host_port, error)
                continue
            machine.forwards[port] = host_port
            return host_port
        raise Unavailable("no free host port for the VM's forward: try again")

    async def set_state(self, vm: VmRow, state: str, skip_wait_boot: bool = False) -> VmRow:
        if state.lower() not in SETTABLE_STATES:
            raise InvalidArgument(f'state must be "Paused", "Sleeping" or "Running", not {state!r}')
        if vm.state == VmState.BOOTING and not skip_wait_boot:
            await self.wait_booted(vm)  # not under the lock: a delete need not wait for a boot
        return await self._whole(self._set_state(vm, VmState(state.lower()), skip_wait_boot))

    async def _set_state(self, vm: VmRow, wanted: VmState, skip_wait_boot: bool) -> VmRow:
        async with self._exclusive(vm) as vm:
            if vm.state == VmState.SLEEPING and wanted != VmState.SLEEPING:
                return await self._wake(vm, wanted)
            if wanted == VmState.SLEEPING:
                return vm if vm.state == VmState.SLEEPING else await self._sleep(vm)
            machine = await self.wait_booted(vm, skip_wait_boot)
            if wanted == VmState.PAUSED:
                await machine.pause()
            else:
                await machine.resume()
            return await self.store.update_vm(vm.id, state=wanted)

    async def _sleep(self, vm: VmRow, by_shutdown: bool = False) -> VmRow:
        """Save the VM's devices and memory to disk and end its QEMU: it uses no memory until it wakes,
        where it was. Its disk layer stays as it is. A failed save leaves the VM as it was."""
        if not by_shutdown:  # a stop puts every VM to sleep, whatever the limits: it must not fail on them
            await self.store.check_sleep(vm)
            with self._room(f"sleeping a VM of {vm.mem_size_mib} MiB", disk_mib=vm.mem_size_mib):
                return await self._save_to_sleep(vm, by_shutdown)
        return await self._save_to_sleep(vm, by_shutdown)

    async def _save_to_sleep(self, vm: VmRow, by_shutdown: bool) -> VmRow:
        machine = self.machine(vm) if by_shutdown else await self.wait_booted(vm)
        record, _ = self._running(vm)
        folder = self.layout.sleep_folder(vm.id)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(mode=0o700, parents=True)
        shared = vm.ram_mode == "shared"
        operation = await self.store.begin(OperationRow(id=str(uuid.uuid4()), vm_id=vm.id, kind="sleep"))
        fault_point("sleep.after_intent")
        # Memory that was not a shared file is saved inside the state: it wakes with anonymous memory.
        ram_mode = "shared" if shared else "anonymous"
        try:
            async with machine.agent.sending():  # never in the middle of sending a command
                record.ending = True
                try:
                    await machine.save(folder / "state", folder / "ram" if shared else None)
                    manifest = {"ram_mode": ram_mode, "state": vm.state, "by_shutdown": by_shutdown}
                    await asyncio.to_thread(write_atomic, folder / "manifest.json", json.dumps(manifest))
                    await asyncio.to_thread(fsync_tree, folder)
                    await asyncio.to_thread(fsync_dir, self.layout.sleeping)
                    fault_point("sleep.after_save")
                    machine.agent.closing(
                        f"VM {vm.id} was put to sleep while the command ran: it goes on when the VM wakes, but its output "
                        f"does not come back to this call"
                    )
                    await machine.quit()
                except Exception as error:
                    record.ending = False
                    machine.agent.closing("")
                    shutil.rmtree(folder, ignore_errors=True)
                    with contextlib.suppress(Exception):
                        await machine.cancel_migration()  # a save still running would stop the VM again when it ends
                        if vm.state == VmState.RUNNING and not await machine.is_running():
                            await machine.resume()
                    await self.store.finish(operation.id)
                    raise Internal(f"VM {vm.id} could not go to sleep: {error}; it goes on as it was") from error
        except DeadlineExceeded:  # the guest holds its port: no turn to send, nothing done yet
            shutil.rmtree(folder, ignore_errors=True)
            await self.store.finish(operation.id)
            raise
        fault_point("sleep.after_quit")
        self.supervisor.detach(record)
        shutil.rmtree(self.layout.run_folder(vm.id), ignore_errors=True)
        done = await self.store.finish(operation.id, vm.id, state=VmState.SLEEPING, pid=0, ram_mode=ram_mode, ram_source="")
        assert done is not None
        return done

    async def _wake(self, vm: VmRow, wanted: str = VmState.RUNNING) -> VmRow:
        """A sleeping VM running again where it was (or paused, or booting on, as it was put to sleep),
        within its org's limits. If it cannot start, it stays asleep with its saved state kept."""
        folder = self.layout.sleep_folder(vm.id)
        if not (folder / "state").exists():
            raise DataLoss(f"VM {vm.id} is sleeping but its saved state is missing from {folder}")
        room = self._room(
            f"waking a VM of {vm.mem_size_mib} MiB", memory_mib=vm.mem_size_mib,
            run_mib=vm.mem_size_mib if vm.ram_mode == "shared" else 0,
        )  # fmt: skip
        with room:
            return await self._start_waking(vm, wanted, folder)

    async def _start_waking(self, vm: VmRow, wanted: str, folder: Path) -> VmRow:
        operation = OperationRow(id=str(uuid.uuid4()), vm_id=vm.id, kind="wake")
        vm = await self.store.claim_wake(vm.id, operation)
        run = self.layout.run_folder(vm.id)
        run.mkdir(mode=0o700, parents=True, exist_ok=True)
        machine = None
        try:
            ram_file = None
            if vm.ram_mode == "shared":
                ram_file = run / "ram"
                await asyncio.to_thread(copy_sparse, folder / "ram", ram_file)
            machine = await Machine.launch(self._spec(vm, incoming=True, ram_file=ram_file))
            fault_point("wake.after_launch")
            await machine.restore(folder / "state")
            if wanted != VmState.PAUSED:
                await machine.resume()
        except Exception as error:
            if machine is not None:
                await machine.kill()
            shutil.rmtree(run, ignore_errors=True)
            await self.store.finish(operation.id, vm.id, state=VmState.SLEEPING, pid=0)
            raise Internal(f"VM {vm.id} could not wake: {error}; it is still asleep, its saved state kept") from error
        done = await self.store.finish(operation.id, vm.id, state=wanted if wanted in LIVE_STATES else VmState.RUNNING, pid=machine.pid)
        assert done is not None
        self._attach(vm, machine, booted=wanted != VmState.BOOTING)
        fault_point("wake.after_record")
        shutil.rmtree(folder, ignore_errors=True)
        return done

    # Disk size

    async def resize_disk(self, vm: VmRow, size_mib: int, skip_wait_boot: bool = False) -> VmRow:
        """Grow a running VM's disk and its root filesystem without a reboot; the VM's row, and with it every
        commit and branch made of it from then on, keeps the new size."""
        if vm.state == VmState.BOOTING and not skip_wait_boot:
            await self.wait_booted(vm)  # not under the lock: a delete need not wait for a boot
        return await self._whole(self._resize_disk(vm, size_mib, skip_wait_boot))

    async def _resize_disk(self, vm: VmRow, size_mib: int, skip_wait_boot: bool) -> VmRow:
        async with self._exclusive(vm) as vm:  # never during a commit: it would freeze half a resize
            if vm.state == VmState.PAUSED:
                raise FailedPrecondition(
                    f'VM {vm.id} is paused: resume it first (PATCH /vm/{vm.id}/state {{"state": "Running"}}, or vers resume), '
                    f"then resize its disk"
                )
            machine = await self.wait_booted(vm, skip_wait_boot)  # a sleeping or dead VM is refused here
            # The disk QEMU has is the truth when it is larger than the row (it never is but by an operator's hand).
            current = max(vm.fs_size_mib, -(-await machine.disk_size() // MIB))
            if size_mib <= current:
                raise InvalidArgument(f"fs_size_mib {size_mib} must be more than the current {current} MiB: a disk only grows")
            if size_mib > MAX_DISK_MIB:
                raise InvalidArgument(f"fs_size_mib must be at most {MAX_DISK_MIB} MiB, not {size_mib}")
            growth = size_mib - current
            # The new space is sparse, but the guest may fill it: the host must have it to give.
            self._admit(f"growing the disk of VM {vm.id} by {growth} MiB", disk_mib=growth)
            # The row first (within the org's disk limit): after a crash between the two steps the row names the
            # size the disk was meant to have, and adoption grows the disk to it (see _finish_disk_growth).
            grown = await self.store.grow_disk(vm, size_mib)
            fault_point("resize.after_record")
            try:
                await machine.grow_disk(size_mib * MIB)
            except Exception as error:
                await self.store.update_vm(vm.id, fs_size_mib=vm.fs_size_mib)
                raise Internal(f"the disk of VM {vm.id} could not grow: {error}; it keeps its {vm.fs_size_mib} MiB") from error
            await self._grow_filesystem(machine, vm.id, size_mib)
            return grown

    async def _grow_filesystem(self, machine: Machine, vm_id: str, size_mib: int) -> None:
        """The guest's root filesystem grown to its disk, online. The guest learns the new capacity from an
        interrupt, so the script waits (a few seconds at most) until its kernel sees it before resize2fs asks."""
        sectors = size_mib * MIB // 512
        script = (
            f'i=0; while [ "$(cat /sys/block/vda/size)" -lt {sectors} ] && [ $i -lt 100 ]; do '
            f"sleep 0.1 2>/dev/null || usleep 100000; i=$((i+1)); done; "
            f"command -v resize2fs >/dev/null || {{ echo 'resize2fs is not installed in the guest' >&2; exit 127; }}; "
            f"resize2fs /dev/vda"
        )
        result = await machine.agent.exec(["sh", "-c", script], timeout_secs=120, max_running=self.settings.vm_max_execs)
        if result.exit_code != 0:
            why = (result.stderr or result.stdout).decode(errors="replace").strip()[-500:]
            raise Internal(
                f"the disk of VM {vm_id} is now {size_mib} MiB, but its filesystem did not grow ({why}): it grows at the "
                f"VM's next boot, or run `resize2fs /dev/vda` in the VM"
            )

    async def _finish_disk_growth(self, vm: VmRow, machine: Machine, running: bool) -> None:
        """A resize a crash cut between recording the size and growing the disk is finished: the disk grows to
        the size its row names, and the guest's filesystem with it (a booting guest grows it as it boots; a
        paused one when it is resized again or boots). A failure here is logged: the VM itself is fine."""
        try:
            if await machine.disk_size() >= vm.fs_size_mib * MIB:
                return
            log.warning("VM %s: growing its disk to the %d MiB its record names (a resize a crash interrupted)", vm.id, vm.fs_size_mib)
            await machine.grow_disk(vm.fs_size_mib * MIB)
        except Exception as error:
            log.error("VM %s: its disk could not grow to the %d MiB its record names: %s", vm.id, vm.fs_size_mib, error)
            return
        if running:
            self._spawn(self._grow_filesystem_quietly(machine, vm.id, vm.fs_size_mib))

    async def _grow_filesystem_quietly(self, machine: Machine, vm_id: str, size_mib: int) -> None:
        try:
            await self._grow_filesystem(machine, vm_id, size_mib)
        except Exception as error:
            log.warning("VM %s: %s", vm_id, error)

    async def reconcile_host(self) -> None:
        """A host agent's, after each heartbeat: stop the VMs marked dead, and now and then let go of the copies
        of deleted commits and layers that other hosts deleted (each host caches what it reads from the store)."""
        await self.stop_vms_marked_dead()
        now = time.monotonic()
        if now - self._evicted_at >= CACHE_EVICTION_SECONDS:
            self._evicted_at = now
            await self.evict_cache()

    async def evict_cache(self) -> None:
        """This host's copies of what is gone from the shared commit store: the folders of commits no row keeps
        (deleted, not being made or deleted), and layer files no row names, untouched for CACHE_EVICTION_SECONDS
        (a layer's row comes before its file; a commit being made is in flight)."""
        if not self.commit_store.shared:
            return
        listed = await asyncio.to_thread(lambda: ([p for p in self.layout.commits.iterdir()], list(self.layout.layers.glob("*.qcow2"))))
        commits = {commit.id for commit in await self.store.live_commits()} | await self.store.commits_in_flight()
        commits |= {row.commit_id for row in await self.store.commit_deletions()}
        layers = set(await self.store.layer_ids())
        unsettled = await self.store.operations()
        layers |= {layer for op in unsettled for layer in (op.old_layer_id, op.new_layer_id) if layer}
        stale = time.time() - CACHE_EVICTION_SECONDS
        folders, files = listed
        gone = [p for p in folders if p.name not in commits and _untouched_since(p, stale)]
        layers |= self.pool.layer_ids() | self.branch_pool.layer_ids()  # a pooled VM's layer has no row until taken
        gone += [p for p in files if p.stem not in layers and _untouched_since(p, stale)]
        for path in gone:
            log.info("removing %s, this host's copy of what the commit store no longer has", path)
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    async def stop_vms_marked_dead(self) -> None:
        """A host agent the API heard nothing from for VERS_HOST_DEAD_SECONDS has had its live VMs marked dead
        (its machine was cut off, say, not down): any of them still running here is stopped once it is heard
        again, for nothing may use them any more (their commits branch on other hosts)."""
        running = self.supervisor.running()  # before the rows: a VM started in between has its row already
        kept = {vm.id: vm for vm in await self.store.all_vms()}
        for record in running:
            vm = kept.get(record.vm_id)
            if (machine := record.machine) is None or (vm is not None and vm.state != VmState.DEAD):
                continue
            log.warning("stopping VM %s: its record says it is dead (this host was declared dead)", record.vm_id)
            machine.agent.closing(f"VM {record.vm_id} was declared dead while the command ran")
            await machine.kill()

    async def delete_vm(self, vm: VmRow) -> None:
        await self._whole(self._delete_vm(vm))

    async def _delete_vm(self, vm: VmRow) -> None:
        async with self._exclusive(vm) as vm:
            record = self.supervisor.get(vm.id)
            assert record is not None  # _exclusive holds it
            record.ending = True
            operation = await self.store.begin(OperationRow(id=str(uuid.uuid4()), vm_id=vm.id, kind="delete"))
            fault_point("delete.after_intent")
            if (machine := record.machine) is not None:
                machine.agent.closing(f"VM {vm.id} was deleted while the command ran")
                await machine.kill()
                self.supervisor.detach(record)  # it goes when _exclusive lets go of it
            elif (pid := find_processes(self.layout.run).get(vm.id)) is not None:
                kill_process(pid, vm.id)
            fault_point("delete.after_kill")
            await self.store.mark_vm_deleted(vm.id, operation.id)
            shutil.rmtree(self.layout.run_folder(vm.id), ignore_errors=True)
            shutil.rmtree(self.layout.sleep_folder(vm.id), ignore_errors=True)
            self.execs.drop_vm(vm.id)
        await self.collect_garbage()


def _check_private(folder: Path) -> None:
    """VM files (RAM, disks, sockets) live here: the folder must be this process's alone. One that someone
    else made (a run folder in /dev/shm, made in advance by another user) is refused."""
    stat = folder.lstat()
    if not S_ISDIR(stat.st_mode) or stat.st_uid != os.geteuid():
        raise RuntimeError(
            f"{folder} is not a folder of this process's own (uid {stat.st_uid}, this process {os.geteuid()}; a symbolic "
            f"link is refused too): remove it or choose another folder"
        )
    if stat.st_mode & 0o077:
        os.chmod(folder, 0o700, follow_symlinks=False)


def _untouched_since(path: Path, moment: float) -> bool:
    try:
        return path.stat().st_mtime < moment
    except OSError:  # gone meanwhile
        return False


def _memory() -> tuple[int | None, int | None]:
    """This host's memory and what of it is available now, in MiB (None where /proc does not say)."""
    found: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in ("MemTotal", "MemAvailable"):
                found[name] = int(rest.split()[0]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return found.get("MemTotal"), found.get("MemAvailable")


def _space(folder: Path) -> tuple[int | None, int | None]:
    """A file system's size and its free space for this process, in MiB."""
    try:
        stat = os.statvfs(folder)
    except OSError:
        return None, None
    return stat.f_blocks * stat.f_frsize // MIB, stat.f_bavail * stat.f_frsize // MIB


def _allocated(path: Path) -> int:
    """Bytes a file takes on disk (a RAM file's untouched pages take none)."""
    return path.stat().st_blocks * 512


def _freed_bytes(
    graph: LayerGraph, commits: Sequence[CommitRow], layer_bytes: dict[str, int], folder_bytes: dict[str, int]
) -> dict[str, int]:
    """What deleting all of `commits` frees, per commit: its folder, and each layer that nothing needs once
    they are gone, counted once, with the commit that froze it or else the oldest of them standing on it."""
    freed = {commit.id: folder_bytes.get(commit.id, 0) for commit in commits}
    gone = {("commit", commit.id) for commit in commits}
    oldest_first = sorted(commits, key=lambda c: (c.created_at, c.id))
    chains = {c.id: set(graph.chain(c.layer_id)) for c in oldest_first}  # each walked once, not once per layer
    for layer_id in graph.reachable() - graph.reachable(without=gone):
        froze = [c for c in oldest_first if c.layer_id == layer_id]
        holders = froze or [c for c in oldest_first if layer_id in chains[c.id]]
        freed[holders[0].id] += layer_bytes.get(layer_id, 0)
    return freed


async def _qemu_img(*args: str | Path) -> None:
    process = await asyncio.create_subprocess_exec("qemu-img", *map(str, args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, stderr = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"qemu-img {args[0]} failed: {stderr.decode(errors='replace').strip()}")

"""QEMU processes started ahead of the requests that need them, so those requests skip the wait.

RootPool: booted root VMs, so a new root VM is one that has already booted (VERS_ROOT_POOL_SIZE of them per
image of VERS_ROOT_POOL_IMAGES, each in the shape a request that leaves vCPUs, memory, disk and network out gets).

A pooled VM belongs to no organization. It has booted its image and nothing else has run in it: no row names it,
nobody can reach it, and no organization's variables are in it. A request for a new root VM of its image and
shape takes it, once: its row is written then, in the requester's organization and within its limits, and it
never returns to the pool. So no VM is ever shared between organizations, and one taken from the pool is
the VM a fresh boot would have made, but for when it booted. The pool refills in the background, one boot at
a time, and only while this host keeps room for another VM beside it; when a request needs the room pooled
VMs hold, they are let go first. Nothing of a pooled VM outlives its orchestrator: its QEMU and files have no
row, so the next start's reconciliation removes them (and a clean stop does at once).

BranchPool: for the commits branched last (VERS_BRANCH_POOL_COMMITS of them), VERS_BRANCH_POOL_SIZE QEMU processes
each, started with the commit's memory file mapped and a new disk layer over its frozen one, waiting for device state
(`-incoming defer`): nothing of any guest has run in them, so a branch of that commit by any organization allowed
to branch it takes one, loads the commit's state into it and resumes it, as it would a QEMU it had just started.
They are refilled a moment after a branch (not while its VM runs its first commands), let go when their commit
is deleted or falls out of the last branched, and when a request needs their room."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from services.common.errors import ResourceExhausted
from services.orchestrator.images import Image
from services.orchestrator.machine import Machine
from services.orchestrator.models import CommitRow, VmRow
from services.orchestrator.vmconfig import VmConfig

log = logging.getLogger(__name__)
# How long a refill waits before it tries again after a start failed or the host had no room.
RETRY_SECONDS = 30.0
# How long after a branch its commit's QEMU processes are started again: the new VM's first commands go first.
BRANCH_REFILL_DELAY = 1.0
# What one QEMU waiting for a branch's state counts for in this host's memory (it has touched none of the
# guest's memory yet: its own heap and code, measured at 16 MiB private and 24 MiB PSS).
WAITING_MIB = 48
# How long a taken VM's layer still counts as the pool's for the cleanups that remove files no row names: its row
# is written a moment after it is taken, and a cleanup may have read the rows before that.
TAKEN_KEPT_SECONDS = 600.0


@dataclass
class Pooled:
    """A QEMU of a pool: its VM id and disk layer (named before it started, and its row's when taken), what
    it is for (an image's disk, a commit's id), the memory it counts for here, its QEMU, and, for a booted
    root, the checked config it was made with."""

    vm_id: str
    layer_id: str
    key: str
    memory_mib: int
    machine: Machine
    config: VmConfig | None = None
    image_disk: str = ""

    @property
    def alive(self) -> bool:
        return self.machine.process is not None and self.machine.process.returncode is None


class _Pool:
    """What both pools share: their QEMU processes, the room they count for, the refill in the background,
    and letting them go. A subclass says what is short (`_next`) and how one more is made (`_add`)."""

    what = ""

    def __init__(self, size: int, run_folder: Callable[[str], Path], layer_file: Callable[[str], Path]) -> None:
        self.size = size
        self._run_folder, self._layer_file = run_folder, layer_file
        self._pooled: list[Pooled] = []
        # What a QEMU being started for the pool counts for, from its start.
        self._starting_mib = 0
        self._wanted = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        # Layers of VMs taken lately, by when (see TAKEN_KEPT_SECONDS); keys whose last start failed, until when
        # they are tried again (the others are started meanwhile).
        self._taken: dict[str, float] = {}
        self._failed: dict[str, float] = {}

    def start(self) -> None:
        if self.size > 0 and self._task is None and not self._closed:
            self._task = asyncio.create_task(self._refill())
            self._wanted.set()

    def resize(self, size: int) -> None:
        """Keep `size` QEMU processes per image or commit from now on (0: none; those beyond it are let go)."""
        self.size = size
        keys = {pooled.key for pooled in self._pooled}
        extra = [pooled for key in keys for pooled in [each for each in self._pooled if each.key == key][size:]]
        self._let_go(lambda pooled: pooled in extra)
        self.start()
        self._wanted.set()

    @property
    def memory_mib(self) -> int:
        """The memory the pool's QEMU processes and the one being started may take."""
        self._prune()
        return sum(pooled.memory_mib for pooled in self._pooled) + self._starting_mib

    @property
    def ready(self) -> int:
        return len(self._pooled)

    def layer_ids(self) -> set[str]:
        """The layers of the pool's VMs, and of those taken lately: files no row may name yet, which nothing
        may remove."""
        now = time.monotonic()
        self._taken = {layer: when for layer, when in self._taken.items() if now - when < TAKEN_KEPT_SECONDS}
        return {pooled.layer_id for pooled in self._pooled} | set(self._taken)

    def _prune(self) -> None:
        """A pooled QEMU that died (a guest panic, the OOM killer) leaves the pool, and its files go."""
        self._let_go(lambda pooled: not pooled.alive, refill=True)

    def _count(self, key: str) -> int:
        return sum(1 for pooled in self._pooled if pooled.key == key)

    def _take(self, key: str, wanted: Callable[[Pooled], bool] = lambda _: True) -> Pooled | None:
        self._prune()
        for pooled in self._pooled:
            if pooled.key == key and wanted(pooled):
                self._pooled.remove(pooled)
                self._taken[pooled.layer_id] = time.monotonic()
                return pooled
        return None

    def give_back(self, pooled: Pooled) -> None:
        """A QEMU taken for a request that was refused before its row was written (an org's limit): no
        organization had it, so it is as it was (or goes, once the pool is closed)."""
        self._taken.pop(pooled.layer_id, None)
        self._pooled.append(pooled)
        if self._closed or not pooled.alive:
            self._let_go(lambda each: each is pooled)

    async def discard(self, pooled: Pooled) -> None:
        """A QEMU taken for a request that failed before its row was written, which must not wait on (its
        commit is being deleted, say): killed, its files removed."""
        await self._remove(pooled)

    def release(self) -> bool:
        """Let every QEMU of the pool go now, for a request that needs their room; whether there were any. They
        are killed here and now, their files removed once they have exited; the pool fills again later, as room
        allows."""
        return self._let_go(lambda _: True, refill=True)

    def _let_go(self, which: Callable[[Pooled], bool], refill: bool = False) -> bool:
        going = [pooled for pooled in self._pooled if which(pooled)]
        self._pooled = [pooled for pooled in self._pooled if pooled not in going]
        for pooled in going:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pooled.machine.pid, signal.SIGKILL)
            task = asyncio.create_task(self._remove(pooled))
            task.add_done_callback(lambda done: done.cancelled() or done.exception())
        if going and refill and not self._closed:
            self._retry_later()
        return bool(going)

    async def _remove(self, pooled: Pooled) -> None:
        await pooled.machine.kill()
        shutil.rmtree(self._run_folder(pooled.vm_id), ignore_errors=True)
        self._layer_file(pooled.layer_id).unlink(missing_ok=True)

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        pooled, self._pooled = self._pooled, []
        await asyncio.gather(*(self._remove(each) for each in pooled), return_exceptions=True)

    async def _refill(self) -> None:
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            while (key := self._next()) is not None:
                try:
                    await self._add(key)
                except asyncio.CancelledError:
                    raise
                except Exception as error:
                    if isinstance(error, ResourceExhausted):
                        log.info("the pool of %s waits for room: %s", self.what, error.message)
                    else:
                        log.warning("a QEMU for the pool of %s could not start: %s", self.what, error)
                    # this key waits, the others are tried meanwhile
                    self._failed[key] = time.monotonic() + RETRY_SECONDS
                    self._retry_later()

    def _retry_later(self, delay: float = RETRY_SECONDS) -> None:
        asyncio.get_running_loop().call_later(delay, self._wanted.set)

    def _next(self) -> str | None:
        """The first of the keys the pool keeps QEMU processes for with fewer than its size, whose last start
        did not fail lately."""
        self._prune()
        now = time.monotonic()
        self._failed = {key: until for key, until in self._failed.items() if until > now}
        return next((key for key in self._keys() if self._count(key) < self.size and key not in self._failed), None)

    def _keys(self) -> list[str]:
        raise NotImplementedError

    async def _add(self, key: str) -> None:
        raise NotImplementedError

    async def _started(self, vm_id: str, layer_id: str, memory_mib: int, start: Callable[[], Awaitable[Machine]]) -> Machine:
        """`start()` run as the pool's next QEMU, counted in the room from its start; its files go if it fails."""
        self._starting_mib = memory_mib
        machine = None
        try:
            machine = await start()
            return machine
        except BaseException:
            if machine is not None:
                await machine.kill()
            shutil.rmtree(self._run_folder(vm_id), ignore_errors=True)
            self._layer_file(layer_id).unlink(missing_ok=True)
            raise
        finally:
            self._starting_mib = 0

    def _keep(self, pooled: Pooled, wanted: bool) -> None:
        if wanted and not self._closed:
            self._pooled.append(pooled)
            log.info("QEMU of VM %s started for the pool of %s (%d ready)", pooled.vm_id, self.what, len(self._pooled))
        else:  # resized or let go meanwhile
            task = asyncio.create_task(self._remove(pooled))
            task.add_done_callback(lambda done: done.cancelled() or done.exception())


class RootPool(_Pool):
    """`boot(vm, image)` makes a root VM's disk and starts its QEMU (the engine's own way, without a row);
    `room(config)` says whether this host has room for one more of that config beyond the pool's own (a
    ResourceExhausted when not); `ready(machine)` waits until the guest answers."""

    what = "booted VMs"

    def __init__(
        self,
        size: int,
        images: Sequence[str],
        lookup: Callable[[str], Awaitable[Image]],
        checked: Callable[[VmConfig, Image], VmConfig],
        boot: Callable[[VmRow, Image], Awaitable[Machine]],
        room: Callable[[VmConfig], None],
        ready: Callable[[Machine], Awaitable[None]],
        run_folder: Callable[[str], Path],
        layer_file: Callable[[str], Path],
    ) -> None:
        super().__init__(size, run_folder, layer_file)
        self.images = tuple(images)
        self._lookup, self._checked, self._boot, self._room, self._ready = lookup, checked, boot, room, ready

    def start(self) -> None:
        if self.images:
            super().start()

    def take(self, config: VmConfig, image: Image) -> Pooled | None:
        """A booted VM of exactly this checked config (labels aside: they are its row's) and image (the image
        itself, not one of the same name), taken out of the pool for good; None when there is none. The pool
        refills behind it."""
        wanted = replace(config, labels=None)
        pooled = self._take(image.name, lambda pooled: pooled.config == wanted and pooled.image_disk == str(image.disk))
        if pooled is not None:
            self._wanted.set()
        return pooled

    def _keys(self) -> list[str]:
        return list(self.images)

    async def _add(self, name: str) -> None:
        image = await self._lookup(name)
        config = self._checked(VmConfig(image_name=name), image)
        self._room(config)
        vm = VmRow(
            id=str(uuid.uuid4()), org_id="", vcpu_count=config.vcpu_count, mem_size_mib=config.mem_size_mib,
            fs_size_mib=config.fs_size_mib, image_name=image.name, kernel_path=str(image.kernel),
            initramfs_path=str(image.initramfs), layer_id=str(uuid.uuid4()), ram_mode="shared", network=config.network,
        )  # fmt: skip

        async def boot() -> Machine:
            machine = await self._boot(vm, image)
            try:
                await self._ready(machine)
            except BaseException:
                await machine.kill()
                raise
            return machine

        machine = await self._started(vm.id, vm.layer_id, config.mem_size_mib, boot)
        self._keep(Pooled(vm.id, vm.layer_id, name, config.mem_size_mib, machine, config, str(image.disk)), self._count(name) < self.size)


class BranchPool(_Pool):
    """`launch(commit, vm_id, layer_id)` starts a QEMU for a branch of the commit, waiting for its state (the
    engine's own way, without a row); `room(commit)` raises ResourceExhausted when this host has no
    room for one more beside the VMs it runs."""

    what = "QEMU processes waiting for a branch"

    def __init__(
        self,
        size: int,
        commits: int,
        launch: Callable[[CommitRow, str, str], Awaitable[Machine]],
        room: Callable[[CommitRow], None],
        run_folder: Callable[[str], Path],
        layer_file: Callable[[str], Path],
    ) -> None:
        super().__init__(size, run_folder, layer_file)
        self.commits = commits
        self._launch, self._room = launch, room
        # The commits branched last, the last at the end.
        self._recent: OrderedDict[str, CommitRow] = OrderedDict()

    def take(self, commit: CommitRow, count: int) -> list[Pooled]:
        """Up to `count` QEMU processes waiting for a branch of `commit`, taken for good."""
        return [pooled for _ in range(count) if (pooled := self._take(commit.id)) is not None]

    def branched(self, commit: CommitRow) -> None:
        """A branch of `commit` started (its org's limits passed): the commit counts as branched last, and its
        QEMU processes are started again a moment later."""
        if self.size and self.commits and not self._closed:
            self._recent[commit.id] = commit
            self._recent.move_to_end(commit.id)
            old = set(list(self._recent)[: -self.commits])
            for commit_id in old:
                del self._recent[commit_id]
            self._let_go(lambda pooled: pooled.key in old)
            self.start()
            self._retry_later(BRANCH_REFILL_DELAY)

    def drop(self, commit_id: str) -> None:
        """The commit is deleted (or its files on this host were found damaged): its QEMU processes go."""
        self._recent.pop(commit_id, None)
        self._let_go(lambda pooled: pooled.key == commit_id)

    def _keys(self) -> list[str]:
        return list(reversed(self._recent))

    async def _add(self, commit_id: str) -> None:
        commit = self._recent[commit_id]
        self._room(commit)
        vm_id, layer_id = str(uuid.uuid4()), str(uuid.uuid4())
        machine = await self._started(vm_id, layer_id, WAITING_MIB, lambda: self._launch(commit, vm_id, layer_id))
        wanted = commit_id in self._recent and self._count(commit_id) < self.size
        self._keep(Pooled(vm_id, layer_id, commit_id, WAITING_MIB, machine), wanted)

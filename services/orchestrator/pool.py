"""Booted root VMs kept ready, so a new root VM is one that has already booted (VERS_ROOT_POOL_SIZE of them per
image of VERS_ROOT_POOL_IMAGES, each in the shape a request that leaves vCPUs, memory, disk and network out gets).

A pooled VM belongs to no organization. It has booted its image and nothing else has run in it: no row names it,
nobody can reach it, and no organization's variables are in it. A request for a new root VM of its image and
shape takes it, once: its row is written then, in the requester's organization and within its limits, and it
never returns to the pool. So no VM is ever shared between organizations, and one taken from the pool is
the VM a fresh boot would have made, but for when it booted. The pool refills in the background, one boot at
a time, and only while this host keeps room for another VM beside it; when a request needs the room pooled
VMs hold, they are let go first. Nothing of a pooled VM outlives its orchestrator: its QEMU and files have no
row, so the next start's reconciliation removes them (and a clean stop does at once)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from services.common.errors import ResourceExhausted
from services.orchestrator.images import Image
from services.orchestrator.machine import Machine
from services.orchestrator.models import VmRow
from services.orchestrator.vmconfig import VmConfig

log = logging.getLogger(__name__)
# How long the refill waits before it tries again after a boot failed or the host had no room.
RETRY_SECONDS = 30.0


@dataclass
class Pooled:
    """A booted VM of the pool: its id and layer (named before it booted, and its row's when taken), the
    checked config it was made with, the disk of its image, and its QEMU."""

    vm_id: str
    layer_id: str
    config: VmConfig
    image_disk: Path
    machine: Machine


class RootPool:
    """`boot(image, config, vm)` makes a root VM's disk and starts its QEMU (the engine's own way, without a row);
    `room(config)` says whether this host has room for one more of that config beyond the pool's own (a
    ResourceExhausted when not)."""

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
        self.size = size
        self.images = tuple(images)
        self._lookup, self._checked, self._boot, self._room, self._ready = lookup, checked, boot, room, ready
        self._run_folder, self._layer_file = run_folder, layer_file
        self._pooled: list[Pooled] = []
        # A VM booting for the pool counts for its room from its start (its config).
        self._booting: VmConfig | None = None
        self._wanted = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.size > 0 and self.images and self._task is None:
            self._task = asyncio.create_task(self._refill())
            self._wanted.set()

    def resize(self, size: int) -> None:
        """Keep `size` VMs per image from now on (0: none; those kept beyond it are let go)."""
        self.size = size
        for image in self.images:
            extra = [pooled for pooled in self._pooled if pooled.config.image_name == image][size:]
            for pooled in extra:
                self._pooled.remove(pooled)
                self._let_go(pooled)
        self.start()
        self._wanted.set()

    @property
    def memory_mib(self) -> int:
        """The memory (and tmpfs, for their RAM files) the pool's VMs and its boot under way may take."""
        configs = [pooled.config for pooled in self._pooled] + ([self._booting] if self._booting else [])
        return sum(config.mem_size_mib for config in configs)

    @property
    def ready(self) -> int:
        return len(self._pooled)

    def layer_ids(self) -> set[str]:
        """The layers of pooled VMs: files no row names yet, which nothing may remove."""
        return {pooled.layer_id for pooled in self._pooled}

    def take(self, config: VmConfig, image: Image) -> Pooled | None:
        """A pooled VM of exactly this checked config (labels aside: they are its row's) and image (the image itself,
        not one of the same name), taken out of the pool for good; None when there is none. The pool refills
        behind it."""
        wanted = replace(config, labels=None)
        for pooled in self._pooled:
            alive = pooled.machine.process is not None and pooled.machine.process.returncode is None
            if pooled.config == wanted and pooled.image_disk == image.disk and alive:
                self._pooled.remove(pooled)
                self._wanted.set()
                return pooled
        return None

    def give_back(self, pooled: Pooled) -> None:
        """A VM taken for a request that was refused before its row was written (an org's limit): no
        organization had it, so it is as it was."""
        self._pooled.append(pooled)

    def release(self) -> bool:
        """Let every pooled VM go now, for a request that needs their room; whether there were any. Their QEMU
        is killed here and now, their files removed once it has exited."""
        pooled, self._pooled = self._pooled, []
        for each in pooled:
            self._let_go(each)
        return bool(pooled)

    def _let_go(self, pooled: Pooled) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pooled.machine.pid, signal.SIGKILL)
        task = asyncio.create_task(self._remove(pooled))
        task.add_done_callback(lambda done: done.cancelled() or done.exception())

    async def _remove(self, pooled: Pooled) -> None:
        await pooled.machine.kill()
        shutil.rmtree(self._run_folder(pooled.vm_id), ignore_errors=True)
        self._layer_file(pooled.layer_id).unlink(missing_ok=True)

    async def close(self) -> None:
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
            try:
                while (image := self._short()) is not None:
                    await self._add(image)
            except asyncio.CancelledError:
                raise
            except ResourceExhausted as error:
                log.info("the pool of booted VMs waits for room: %s", error.message)
                self._retry_later()
            except Exception as error:
                log.warning("a VM for the pool of booted VMs could not boot: %s", error)
                self._retry_later()

    def _retry_later(self) -> None:
        asyncio.get_running_loop().call_later(RETRY_SECONDS, self._wanted.set)

    def _short(self) -> str | None:
        """An image with fewer pooled VMs than the pool's size."""
        for image in self.images:
            if sum(1 for pooled in self._pooled if pooled.config.image_name == image) < self.size:
                return image
        return None

    async def _add(self, name: str) -> None:
        image = await self._lookup(name)
        config = self._checked(VmConfig(image_name=name), image)
        self._room(config)
        vm = VmRow(
            id=str(uuid.uuid4()), org_id="", vcpu_count=config.vcpu_count, mem_size_mib=config.mem_size_mib,
            fs_size_mib=config.fs_size_mib, image_name=image.name, kernel_path=str(image.kernel),
            initramfs_path=str(image.initramfs), layer_id=str(uuid.uuid4()), ram_mode="shared", network=config.network,
        )  # fmt: skip
        self._booting = config
        machine = None
        try:
            machine = await self._boot(vm, image)
            await self._ready(machine)
        except BaseException:
            if machine is not None:
                await machine.kill()
            shutil.rmtree(self._run_folder(vm.id), ignore_errors=True)
            self._layer_file(vm.layer_id).unlink(missing_ok=True)
            raise
        finally:
            self._booting = None
        if self.size and sum(1 for pooled in self._pooled if pooled.config.image_name == name) < self.size:
            self._pooled.append(Pooled(vm.id, vm.layer_id, config, image.disk, machine))
            log.info("VM %s of image %s booted for the pool (%d ready)", vm.id, name, len(self._pooled))
        else:  # resized meanwhile
            await self._remove(Pooled(vm.id, vm.layer_id, config, image.disk, machine))

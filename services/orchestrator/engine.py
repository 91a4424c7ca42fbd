"""The VM engine of one host: QEMU processes, the layer store, commits and copy-on-write branches."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from services.common.errors import DataLoss, FailedPrecondition, Internal, InvalidArgument
from services.common.settings import Settings
from services.orchestrator.accel import choose_accelerator
from services.orchestrator.images import DEFAULT_IMAGE, KERNEL_NAME, Image, find_image, list_images
from services.orchestrator.machine import LaunchSpec, Machine, copy_sparse, process_is_vm
from services.orchestrator.models import CommitRow, LayerRow, MachineShape, VmRow
from services.orchestrator.store import OrchestratorStore

log = logging.getLogger(__name__)

MAX_VCPUS = 16
MEMORY_RANGE_MIB = (128, 65536)
MAX_DISK_MIB = 1024 * 1024
MAX_BRANCH_COUNT = 16
HEAD_BYTES = 1 << 20


@dataclass(frozen=True)
class VmConfig:
    vcpu_count: int = 0
    mem_size_mib: int = 0
    fs_size_mib: int = 0
    image_name: str = ""
    kernel_name: str = ""
    labels: Mapping[str, str] | None = None


def _file_digest(path: Path, limit: int | None = None) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        remaining = limit
        while chunk := source.read(min(8 << 20, remaining) if remaining is not None else 8 << 20):
            digest.update(chunk)
            if remaining is not None:
                remaining -= len(chunk)
                if remaining <= 0:
                    break
    return digest.hexdigest()


def _stat_key(path: Path) -> tuple[int, int, int, int]:
    stat = path.stat()
    return (stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


class Engine:
    def __init__(self, settings: Settings, store: OrchestratorStore) -> None:
        data = settings.data_dir.resolve()
        self.settings = settings
        self.store = store
        self.images_root = settings.image_root
        self.layers_dir = data / "layers"
        self.commits_dir = data / "commits"
        self.sleep_dir = data / "sleeping"
        self.run_dir = settings.vm_run_dir
        self.accel = "tcg"
        self.machines: dict[str, Machine] = {}
        self._booted: dict[str, asyncio.Event] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._deleting: set[str] = set()
        self._asleep: set[str] = set()  # VMs whose QEMU ends because they go to sleep, not because they died
        self._verified: dict[Path, tuple[int, int, int, int]] = {}
        self._consoles: dict[str, asyncio.Lock] = {}
        self._transitions: dict[str, asyncio.Lock] = {}

    # Start-up and shutdown

    async def start(self) -> None:
        for folder in (self.layers_dir, self.commits_dir, self.sleep_dir, self.run_dir):
            folder.mkdir(parents=True, exist_ok=True)
        image = find_image(self.images_root, DEFAULT_IMAGE)
        if image is None:
            log.warning("no images in %s: run `make images`", self.images_root)
        else:
            # the probe result is a fact about this host, kept beside the images every data folder shares
            self.accel = await choose_accelerator(self.settings.accel, image, self.images_root / "accel.json")
        log.info("VMs run with %s", self.accel.upper())
        await self._adopt_all()

    async def close(self) -> None:
        """Stop watching; the VMs keep running and a new orchestrator adopts them."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for machine in self.machines.values():
            await machine.agent.close()
            await machine.qmp.close()
        self.machines.clear()

    async def _adopt_all(self) -> None:
        for vm in await self.store.live_vms():
            machine = await Machine.adopt(vm.id, self.run_folder(vm.id), vm.pid)
            if machine is None and (self.sleep_folder(vm.id) / "state").exists():
                log.warning("VM %s was waking when the orchestrator stopped: it is asleep again", vm.id)
                await self.store.update_vm(vm.id, state="sleeping", pid=0)
                continue
            if machine is None:
                log.warning("VM %s is gone (its QEMU is not running): marked dead", vm.id)
                await self._mark_dead(vm.id)
                continue
            status = await machine.status()
            booted = vm.state != "booting"
            state = "paused" if status != "running" and booted else vm.state
            await self.store.update_vm(vm.id, state=state)
            self._attach(vm.id, machine, booted=booted)
            log.info("adopted VM %s (%s)", vm.id, state)

    # Paths

    def run_folder(self, vm_id: str) -> Path:
        return self.run_dir / vm_id

    def layer_path(self, layer_id: str) -> Path:
        return self.layers_dir / f"{layer_id}.qcow2"

    def commit_folder(self, commit_id: str) -> Path:
        return self.commits_dir / commit_id

    # Watching

    def _spawn(self, coroutine) -> asyncio.Task[None]:  # type: ignore[no-untyped-def]
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _attach(self, vm_id: str, machine: Machine, booted: bool) -> None:
        self.machines[vm_id] = machine
        event = self._booted.setdefault(vm_id, asyncio.Event())
        if booted:
            event.set()
        else:
            self._spawn(self._wait_boot(vm_id, machine))
        self._spawn(self._watch(vm_id, machine))

    async def _wait_boot(self, vm_id: str, machine: Machine) -> None:
        try:
            await machine.agent.wait_ready(self.settings.boot_timeout_seconds)
        except Exception as error:  # noqa: BLE001 - a VM that does not boot is dead, said in the log
            log.warning("VM %s did not boot: %s; %s", vm_id, error, Machine.read_log(machine.run_folder))
            await machine.kill()
            return
        await self.store.update_vm(vm_id, state="running")
        self._booted[vm_id].set()

    async def _watch(self, vm_id: str, machine: Machine) -> None:
        await machine.wait_exit()
        if self.machines.get(vm_id) is machine:
            del self.machines[vm_id]
        if vm_id not in self._deleting and vm_id not in self._asleep:
            log.warning("VM %s stopped: %s", vm_id, Machine.read_log(machine.run_folder) or "its QEMU exited")
            await self._mark_dead(vm_id)
        self._booted.pop(vm_id, None)
        await machine.agent.close()

    async def _mark_dead(self, vm_id: str) -> None:
        """A dead VM cannot run again: its RAM file (in tmpfs, as large as its memory) goes at once."""
        (self.run_folder(vm_id) / "ram").unlink(missing_ok=True)
        await self.store.update_vm(vm_id, state="dead", pid=0)

    def machine(self, vm: VmRow) -> Machine:
        machine = self.machines.get(vm.id)
        if machine is None and vm.state == "sleeping":
            raise FailedPrecondition(f'VM {vm.id} is sleeping: wake it first (PATCH /vm/{vm.id}/state {{"state": "Running"}}, or vers resume)')
        if machine is None:
            raise FailedPrecondition(f"VM {vm.id} is {vm.state}, not running: start a new VM from one of its commits")
        return machine

    async def wait_booted(self, vm: VmRow, skip_wait: bool = False) -> Machine:
        machine = self.machine(vm)
        event = self._booted.get(vm.id)
        if event is not None and not event.is_set():
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

    # Creating VMs

    def _image(self, name: str) -> Image:
        image = find_image(self.images_root, name or DEFAULT_IMAGE)
        if image is None:
            known = ", ".join(list_images(self.images_root)) or "none: run `make images`"
            raise InvalidArgument(f"image {name!r} does not exist; images: {known}")
        return image

    def _validate(self, config: VmConfig, image: Image) -> tuple[int, int, int]:
        if config.kernel_name not in ("", KERNEL_NAME):
            raise InvalidArgument(f"kernel_name must be {KERNEL_NAME!r} (or left out)")
        vcpus = config.vcpu_count or 1
        memory = config.mem_size_mib or 256
        disk = config.fs_size_mib or max(image.disk_mib, 1024)
        if not 1 <= vcpus <= MAX_VCPUS:
            raise InvalidArgument(f"vcpu_count must be between 1 and {MAX_VCPUS}, not {vcpus}")
        if not MEMORY_RANGE_MIB[0] <= memory <= MEMORY_RANGE_MIB[1]:
            raise InvalidArgument(f"mem_size_mib must be between {MEMORY_RANGE_MIB[0]} and {MEMORY_RANGE_MIB[1]}, not {memory}")
        if not image.disk_mib <= disk <= MAX_DISK_MIB:
            raise InvalidArgument(
                f"fs_size_mib must be between {image.disk_mib} (the size of image {image.name!r}) and {MAX_DISK_MIB}, not {disk}"
            )
        for key, value in (config.labels or {}).items():
            if not key or len(key) > 63 or len(value) > 255:
                raise InvalidArgument("labels: keys are 1-63 characters, values at most 255")
        return vcpus, memory, disk

    async def create_root(self, org_id: str, config: VmConfig, wait_boot: bool) -> VmRow:
        image = self._image(config.image_name)
        vcpus, memory, disk = self._validate(config, image)
        layer = LayerRow(id=str(uuid.uuid4()), base_path=str(image.disk))
        vm = VmRow(
            id=str(uuid.uuid4()), org_id=org_id, labels=json.dumps(dict(config.labels or {})),
            vcpu_count=vcpus, mem_size_mib=memory, fs_size_mib=disk, image_name=image.name,
            kernel_path=str(image.kernel), initramfs_path=str(image.initramfs), layer_id=layer.id, ram_mode="shared",
        )  # fmt: skip
        await self.store.add_vms(org_id, [vm], [layer])
        folder = self.run_folder(vm.id)
        try:
            await _qemu_img("create", "-f", "qcow2", "-b", image.disk, "-F", "qcow2", self.layer_path(layer.id), f"{disk}M")
            folder.mkdir(parents=True)
            with (folder / "ram").open("wb") as ram:
                ram.truncate(memory * 1024 * 1024)
            machine = await Machine.launch(self._spec(vm, incoming=False, ram_file=folder / "ram"))
        except Exception as error:
            await self.store.update_vm(vm.id, state="dead")
            raise Internal(f"VM {vm.id} could not start: {error}") from error
        vm = await self.store.update_vm(vm.id, pid=machine.pid)
        self._attach(vm.id, machine, booted=False)
        if wait_boot:
            await self.wait_booted(vm)
            vm = await self.store.get_vm(org_id, vm.id)
        return vm

    def _spec(self, vm: VmRow, incoming: bool, ram_file: Path | None) -> LaunchSpec:
        return LaunchSpec(
            vm_id=vm.id, run_folder=self.run_folder(vm.id), accel=self.accel, vcpus=vm.vcpu_count,
            mem_mib=vm.mem_size_mib, kernel=Path(vm.kernel_path), initramfs=Path(vm.initramfs_path),
            disk=self.layer_path(vm.layer_id), ram_mode=vm.ram_mode, ram_file=ram_file, incoming=incoming,
        )  # fmt: skip

    async def restore(self, org_id: str, commit: CommitRow, count: int = 1) -> list[VmRow]:
        """Start `count` VMs from a commit: each a new qcow2 overlay on the commit's frozen layer, its RAM
        the commit's memory file mapped copy-on-write, its devices loaded from the saved state."""
        if not 1 <= count <= MAX_BRANCH_COUNT:
            raise InvalidArgument(f"count must be between 1 and {MAX_BRANCH_COUNT}, not {count}")
        await asyncio.to_thread(self.verify_commit, commit)
        layers = [LayerRow(id=str(uuid.uuid4()), parent_id=commit.layer_id) for _ in range(count)]
        shape = commit.model_dump(include=set(MachineShape.model_fields))
        # A fork keeps no link upstream: a VM started from another org's commit does not name it.
        own = commit.org_id == org_id
        vms = [
            VmRow(
                id=str(uuid.uuid4()), org_id=org_id, **shape, layer_id=layer.id,
                ram_mode="private" if commit.ram_format == "file" else "anonymous",
                ram_source=str(self.commit_folder(commit.id) / "ram") if commit.ram_format == "file" else "",
                parent_commit_id=commit.id if own else None, grandparent_vm_id=commit.parent_vm_id if own else None,
            )  # fmt: skip
            for layer in layers
        ]
        await self.store.add_vms(org_id, vms, layers)
        results = await asyncio.gather(*(self._start_restored(vm, commit) for vm in vms), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            raise failures[0]
        return [r for r in results if isinstance(r, VmRow)]

    async def _start_restored(self, vm: VmRow, commit: CommitRow) -> VmRow:
        frozen = self.layer_path(commit.layer_id)
        machine = None
        try:
            await _qemu_img("create", "-f", "qcow2", "-b", frozen, "-F", "qcow2", self.layer_path(vm.layer_id))
            ram_file = Path(vm.ram_source) if vm.ram_source else None
            machine = await Machine.launch(self._spec(vm, incoming=True, ram_file=ram_file))
            await machine.restore(self.commit_folder(commit.id) / "state")
            await machine.resume()
        except Exception as error:
            if machine is not None:
                await machine.kill()
            await self.store.update_vm(vm.id, state="dead")
            raise Internal(f"VM {vm.id} could not be restored from commit {commit.id}: {error}") from error
        vm = await self.store.update_vm(vm.id, state="running", pid=machine.pid)
        self._attach(vm.id, machine, booted=True)
        return vm

    # Commits

    async def commit(self, vm: VmRow, name: str, description: str, keep_paused: bool) -> tuple[CommitRow, float]:
        """Snapshot the VM's disk and memory as a new immutable commit; returns it and the pause in seconds."""
        machine = await self.wait_booted(vm)
        commit_id = str(uuid.uuid4())
        folder = self.commit_folder(commit_id)
        folder.mkdir(parents=True)
        new_layer = LayerRow(id=str(uuid.uuid4()), parent_id=vm.layer_id)
        # While the VM is paused its RAM is copied within tmpfs, which disk writeback cannot slow down;
        # it goes to the commit folder once the VM runs again.
        ram_copy = self.run_folder(vm.id) / f"ram-{commit_id}" if vm.ram_mode == "shared" else None
        async with machine.agent.lock:  # never snapshot in the middle of an exec
            try:
                paused = await machine.snapshot(self.layer_path(new_layer.id), folder / "state", ram_copy, keep_paused)
                if ram_copy is not None:
                    await asyncio.to_thread(copy_sparse, ram_copy, folder / "ram")
            except Exception as error:
                if self.layer_path(new_layer.id).exists():
                    await self.store.move_vm_to_layer(vm.id, new_layer)
                shutil.rmtree(folder, ignore_errors=True)
                raise Internal(f"commit of VM {vm.id} failed: {error}") from error
            finally:
                if ram_copy is not None:
                    ram_copy.unlink(missing_ok=True)
        for path in (*folder.iterdir(), self.layer_path(vm.layer_id)):
            path.chmod(0o444)  # immutable from here on
        checksums = await asyncio.to_thread(self._checksums, folder, self.layer_path(vm.layer_id))
        commit = CommitRow(
            id=commit_id, org_id=vm.org_id, name=name or f"commit of {vm.id}", description=description,
            parent_vm_id=vm.id, grandparent_commit_id=vm.parent_commit_id, layer_id=vm.layer_id,
            ram_format="file" if ram_copy else "stream", checksums=json.dumps(checksums),
            **vm.model_dump(include=set(MachineShape.model_fields)),
        )  # fmt: skip
        await self.store.add_commit(commit, vm.id, new_layer)
        if keep_paused:
            await self.store.update_vm(vm.id, state="paused")
        return commit, paused

    def _checksums(self, folder: Path, layer: Path) -> dict[str, object]:
        files = {path.name: {"size": path.stat().st_size, "sha256": _file_digest(path)} for path in folder.iterdir()}
        for path in folder.iterdir():
            self._verified[path] = _stat_key(path)
        head = {"size": layer.stat().st_size, "head_sha256": _file_digest(layer, HEAD_BYTES)}
        return {"files": files, "layer": head}

    def verify_commit(self, commit: CommitRow) -> None:
        """Refuse to restore from damaged or missing files. Whole files are hashed the first time, and
        again only when their inode, size or times change; the frozen layer is checked by size and head."""
        recorded = json.loads(commit.checksums)
        folder = self.commit_folder(commit.id)
        for name, expected in recorded["files"].items():
            path = folder / name
            if not path.exists():
                raise DataLoss(f"commit {commit.id} is damaged: its {name} file is missing")
            key = _stat_key(path)
            if self._verified.get(path) == key:
                continue
            if path.stat().st_size != expected["size"] or _file_digest(path) != expected["sha256"]:
                raise DataLoss(f"commit {commit.id} is damaged: its {name} file does not match its checksum")
            self._verified[path] = key
        layer = self.layer_path(commit.layer_id)
        if not layer.exists():
            raise DataLoss(f"commit {commit.id} is damaged: its disk layer is missing")
        expected_layer = recorded["layer"]
        if layer.stat().st_size != expected_layer["size"] or _file_digest(layer, HEAD_BYTES) != expected_layer["head_sha256"]:
            raise DataLoss(f"commit {commit.id} is damaged: its disk layer does not match its checksum")

    async def delete_commit(self, org_id: str, commit_id: str) -> None:
        commit = await self.store.delete_commit(org_id, commit_id)
        folder = self.commit_folder(commit.id)
        for path in list(folder.glob("*")):
            self._verified.pop(path, None)
        shutil.rmtree(folder, ignore_errors=True)
        await self.collect_garbage()

    async def collect_garbage(self) -> None:
        for layer_id in await self.store.collect_garbage_layers():
            self.layer_path(layer_id).unlink(missing_ok=True)

    # Running VMs

    @asynccontextmanager
    async def console(self, vm: VmRow) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
        """The VM's console; one person at a time, as on a physical terminal."""
        lock = self._consoles.setdefault(vm.id, asyncio.Lock())
        if lock.locked():
            raise FailedPrecondition(f"someone is already connected to the console of VM {vm.id}")
        async with lock:
            reader, writer = await asyncio.open_unix_connection(str(self.run_folder(vm.id) / "console.sock"))
            try:
                yield reader, writer
            finally:
                writer.close()

    async def set_state(self, vm: VmRow, state: str, skip_wait_boot: bool = False) -> VmRow:
        wanted = state.lower()
        if wanted not in ("paused", "running", "sleeping"):
            raise InvalidArgument(f"state must be \"Paused\", \"Sleeping\" or \"Running\", not {state!r}")
        async with self._transitions.setdefault(vm.id, asyncio.Lock()):  # one change of state at a time
            vm = await self.store.get_vm(vm.org_id, vm.id)
            if vm.state == "sleeping" and wanted != "sleeping":
                vm = await self.wake(vm)
            elif wanted == "sleeping":
                return vm if vm.state == "sleeping" else await self.sleep(vm)
            machine = await self.wait_booted(vm, skip_wait_boot)
            if wanted == "paused":
                await machine.pause()
            else:
                await machine.resume()
            return await self.store.update_vm(vm.id, state=wanted)

    def sleep_folder(self, vm_id: str) -> Path:
        return self.sleep_dir / vm_id

    async def sleep(self, vm: VmRow) -> VmRow:
        """Save the VM's devices and memory to disk and end its QEMU: it uses no memory until it wakes,
        where it was. Its disk layer stays as it is. A failed save leaves the VM as it was."""
        machine = await self.wait_booted(vm)
        folder = self.sleep_folder(vm.id)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        shared = vm.ram_mode == "shared"
        async with machine.agent.lock:  # never in the middle of an exec
            self._asleep.add(vm.id)
            try:
                await machine.save_and_quit(folder / "state", folder / "ram" if shared else None)
            except Exception as error:
                self._asleep.discard(vm.id)
                shutil.rmtree(folder, ignore_errors=True)
                if vm.state == "running" and await machine.status() != "running":
                    await machine.resume()
                raise Internal(f"VM {vm.id} could not go to sleep: {error}; it goes on as it was") from error
        self.machines.pop(vm.id, None)
        self._booted.pop(vm.id, None)
        (self.run_folder(vm.id) / "ram").unlink(missing_ok=True)
        # Memory that was not a shared file was saved inside the state: it wakes with anonymous memory.
        return await self.store.update_vm(vm.id, state="sleeping", pid=0, ram_mode="shared" if shared else "anonymous", ram_source="")

    async def wake(self, vm: VmRow) -> VmRow:
        """A sleeping VM running again where it was, within its org's limits. If it cannot start, it stays
        asleep with its saved state kept, so nothing is lost."""
        folder = self.sleep_folder(vm.id)
        if not (folder / "state").exists():
            raise DataLoss(f"VM {vm.id} is sleeping but its saved state is missing from {folder}")
        vm = await self.store.claim_wake(vm.id)
        run = self.run_folder(vm.id)
        run.mkdir(parents=True, exist_ok=True)
        machine = None
        try:
            ram_file = None
            if vm.ram_mode == "shared":
                ram_file = run / "ram"
                await asyncio.to_thread(copy_sparse, folder / "ram", ram_file)
            machine = await Machine.launch(self._spec(vm, incoming=True, ram_file=ram_file))
            await machine.restore(folder / "state")
            await machine.resume()
        except Exception as error:
            if machine is not None:
                await machine.kill()
            (run / "ram").unlink(missing_ok=True)
            await self.store.update_vm(vm.id, state="sleeping", pid=0)
            raise Internal(f"VM {vm.id} could not wake: {error}; it is still asleep, its saved state kept") from error
        self._asleep.discard(vm.id)
        vm = await self.store.update_vm(vm.id, state="running", pid=machine.pid)
        self._attach(vm.id, machine, booted=True)
        shutil.rmtree(folder, ignore_errors=True)
        return vm

    async def delete_vm(self, vm: VmRow) -> None:
        self._deleting.add(vm.id)
        try:
            machine = self.machines.pop(vm.id, None)
            if machine is not None:
                await machine.kill()
            elif vm.pid and process_is_vm(vm.pid, vm.id):
                os.kill(vm.pid, signal.SIGKILL)
            await self.store.mark_vm_deleted(vm.id)
            shutil.rmtree(self.run_folder(vm.id), ignore_errors=True)
            shutil.rmtree(self.sleep_folder(vm.id), ignore_errors=True)
            self._asleep.discard(vm.id)
            await self.collect_garbage()
        finally:
            self._deleting.discard(vm.id)


async def _qemu_img(*args: str | Path) -> None:
    process = await asyncio.create_subprocess_exec(
        "qemu-img", *map(str, args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _, stderr = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"qemu-img {args[0]} failed: {stderr.decode(errors='replace').strip()}")

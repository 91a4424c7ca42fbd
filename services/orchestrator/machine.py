"""One QEMU process: how it is started, restored, snapshotted, watched and stopped."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import pwd
import signal
import struct
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.errors import FailedPrecondition
from services.common.faults import fault_point
from services.common.settings import Settings
from services.orchestrator.accel import cpu_args
from services.orchestrator.agent import Agent
from services.orchestrator.network import CAP_SETPCAP, has_capabilities, netdev_args
from services.orchestrator.qmp import Qmp, QmpClosed, QmpError

log = logging.getLogger(__name__)

# How the VM's RAM is backed. "shared": its own file, mapped shared, so a commit copies the file and
# migrates only device state (shortest pause). "private": a commit's RAM file mapped copy-on-write, so
# branches of one commit share its pages. "anonymous": loaded from a migration stream.
RAM_MODES = ("shared", "private", "anonymous")
MIGRATION_BANDWIDTH = 100 * 1024**3
# The fdset the VM's disk layer is passed in at launch (one descriptor to write, one to read).
DISK_FDSET = 1
# A VM's disk layers are qcow2 files of 4 KiB clusters, the guest file system's block: a block the guest
# deletes is discarded from the layer whole (with 64 KiB clusters a partial discard is dropped and the
# deleted data stays readable on the disk), and a small write takes 4 KiB of the layer, not 64.
LAYER_OPTIONS = ("-f", "qcow2", "-o", "cluster_size=4096")
SERIAL_LOG_CHECK_SECONDS = 1.0


@dataclass(frozen=True)
class LaunchSpec:
    vm_id: str
    run_folder: Path
    accel: str
    vcpus: int
    mem_mib: int
    kernel: Path
    initramfs: Path
    disk: Path
    ram_mode: str
    ram_file: Path | None
    incoming: bool
    network: str = ""  # "nat", "none", or "" for a VM whose saved devices have no NIC
    prefix: tuple[str, ...] = ()  # what QEMU is started under (`ip netns exec …` for "nat")
    # The user QEMU drops to once it has opened its files, when this process is root ("": none).
    qemu_user: str = Settings.model_fields["qemu_user"].default
    # serial.log (the guest's ttyS0) is cut to its last half past this size.
    serial_log_max_bytes: int = Settings.model_fields["serial_log_max_bytes"].default
    # Under TCG, the cache of translated guest code QEMU may grow to (MiB).
    tcg_code_cache_mib: int = Settings.model_fields["tcg_code_cache_mib"].default


def sockets(run_folder: Path) -> dict[str, Path]:
    return {name: run_folder / f"{name}.sock" for name in ("qmp", "agent", "console")}


@functools.cache
def drop_user(name: str) -> str:
    """The user QEMU runs as after start-up: `name` when this process is root, else "" (QEMU keeps this
    process's user). A root platform never runs a guest as root: a missing user is an error to fix."""
    if not name or os.geteuid() != 0:
        return ""
    try:
        pwd.getpwnam(name)
    except KeyError:
        raise FailedPrecondition(
            f"the user QEMU runs as, {name!r} (VERS_QEMU_USER), does not exist on this host: run scripts/bootstrap.sh "
            f"as root (or useradd --system {name}), or set VERS_QEMU_USER to another unprivileged user"
        ) from None
    return name


def privilege_drop(user: str) -> list[str]:
    """setpriv before QEMU: no inheritable or ambient capabilities, and a bounding set of what start-up
    needs: CAP_DAC_OVERRIDE (a branch maps its commit's read-only memory file copy-on-write, which QEMU 7.2
    opens for writing all the same; 8.2's rom=off would not), and CAP_SETUID/CAP_SETGID for `-runas`, after
    which QEMU holds no capability at all."""
    drop = ["setpriv", "--inh-caps=-all", "--ambient-caps=-all"]
    if has_capabilities(CAP_SETPCAP):
        drop.append("--bounding-set=-all,+dac_override" + (",+setuid,+setgid" if user else ""))
    return [*drop, "--"]


def _option(value: object) -> str:
    return str(value).replace(",", ",,")


def qcow2_backing(path: Path) -> str | None:
    """The backing file a qcow2 header names (None: none); ValueError if it is not a qcow2 file."""
    with path.open("rb") as disk:
        header = disk.read(20)
        if len(header) < 20 or header[:4] != b"QFI\xfb":
            raise ValueError("not a qcow2 file")
        offset, size = struct.unpack(">QI", header[8:20])
        if not offset:
            return None
        disk.seek(offset)
        return disk.read(size).decode(errors="replace")


def relative_backing(disk: Path) -> Path | None:
    """The file under a layer whose header names it relative to the layer's folder (as layers name the layer
    under them, so a chain works in any folder): QEMU resolves such a name beside the name it opened the layer
    by, and a layer passed as a descriptor is opened as /dev/fdset/N, so the file is named to it in full.
    None when the header names none, or an absolute path (an image's root disk, a layer made before)."""
    named = qcow2_backing(disk)
    if not named or os.path.isabs(named) or named.startswith("json:"):
        return None
    return disk.parent / named


def qemu_args(spec: LaunchSpec, user: str = "", disk_fds: tuple[int, int] | None = None, backing: Path | None = None) -> list[str]:
    """QEMU's command line. `user`: what it drops to once its files are open (`-runas`); `disk_fds`: the
    disk layer opened for writing and for reading, passed as fdset DISK_FDSET, so QEMU never opens a layer
    by its path after start-up; `backing`: the file under that layer when its header names it by a relative
    name (relative_backing)."""
    paths = sockets(spec.run_folder)
    if spec.ram_mode == "anonymous":
        memory = f"memory-backend-ram,id=ram0,size={spec.mem_mib}M"
    else:
        share = "on" if spec.ram_mode == "shared" else "off"
        memory = f"memory-backend-file,id=ram0,size={spec.mem_mib}M,mem-path={_option(spec.ram_file)},share={share}"
    # seccomp: no obsolete syscalls, no scheduler games, no new processes (states go through descriptors
    # this process opens), and no uid/gid changes, but for the one `-runas` makes (seccomp is on before
    # it; after it QEMU has no capability left to change them with).
    sandbox = "on,obsolete=deny,resourcecontrol=deny,spawn=deny" + ("" if user else ",elevateprivileges=deny")
    if disk_fds is None:
        disk, locking = _option(spec.disk), ""
        add_fds = []
    else:
        # No image locks on layers passed as descriptors: the fdset keeps the writable descriptor open after
        # QEMU reopens a frozen layer read-only, so its write lock would outlive it and refuse the next
        # activation (after every state save). The engine gives each layer one QEMU.
        disk, locking = f"/dev/fdset/{DISK_FDSET}", "file.locking=off,"
        add_fds = [
            item for mode, fd in zip(("rw", "ro"), disk_fds, strict=True)
            for item in ("-add-fd", f"fd={fd},set={DISK_FDSET},opaque={_option(f'{mode}:{spec.disk}')}")
        ]  # fmt: skip
    under = f"backing.driver=qcow2,backing.file.driver=file,backing.file.filename={_option(backing)}," if backing else ""
    args = [
        *spec.prefix, *privilege_drop(user), "qemu-system-x86_64", "-name", f"vers-{spec.vm_id}",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-sandbox", sandbox,
        *(["-runas", user] if user else []),
        "-machine", "pc,memory-backend=ram0", *cpu_args(spec.accel, spec.tcg_code_cache_mib),
        "-smp", str(spec.vcpus), "-m", f"{spec.mem_mib}M", "-object", memory,
        "-kernel", str(spec.kernel), "-initrd", str(spec.initramfs),
        # init_on_free: memory a guest frees (a removed file's page cache, an ended process) is zeroed, so
        # a later commit's memory image does not hold it
        "-append", "console=ttyS0 quiet panic=-1 init_on_free=1",
        *add_fds, "-drive", f"file={disk},{locking}{under}if=virtio,format=qcow2,discard=unmap",
        "-device", "virtio-serial-pci",
        "-chardev", f"socket,id=agent,path={paths['agent']},server=on,wait=off",
        "-device", "virtserialport,chardev=agent,name=agent",
        "-chardev", f"socket,id=console,path={paths['console']},server=on,wait=off",
        "-device", "virtconsole,chardev=console",
        "-device", "virtio-rng-pci",
        # appended to, so the file can be cut from outside (see Machine._bound_serial_log)
        "-chardev", f"file,id=serial0,path={spec.run_folder / 'serial.log'},append=on",
        "-serial", "chardev:serial0",
        "-qmp", f"unix:{paths['qmp']},server=on,wait=off",
        "-pidfile", str(spec.run_folder / "qemu.pid"),
        *netdev_args(spec.network),
    ]  # fmt: skip
    # Nothing of the guest runs before QEMU has dropped its privileges: a new VM starts stopped (launch
    # continues it), a restored one waits for its state.
    args += ["-incoming", "defer"] if spec.incoming else ["-S"]
    return args


def process_is_vm(pid: int, vm_id: str) -> bool:
    try:
        return f"vers-{vm_id}".encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def find_processes(run_dir: Path) -> dict[str, int]:
    """The QEMU processes of this platform by VM id: named `vers-<id>`, their sockets under `run_dir`.
    The name and folder are known before QEMU runs, so a process started just before a crash is found too."""
    found: dict[str, int] = {}
    marker = str(run_dir) + "/"
    for cmdline_file in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline_file.read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if not args or not args[0].endswith("qemu-system-x86_64") or "-name" not in args:
            continue
        name = args[args.index("-name") + 1] if args.index("-name") + 1 < len(args) else ""
        if name.startswith("vers-") and any(marker in arg for arg in args):
            found[name.removeprefix("vers-")] = int(cmdline_file.parent.name)
    return found


def kill_process(pid: int, vm_id: str) -> None:
    if process_is_vm(pid, vm_id):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class Machine:
    def __init__(self, vm_id: str, run_folder: Path, pid: int, qmp: Qmp, process: asyncio.subprocess.Process | None) -> None:
        self.vm_id = vm_id
        self.run_folder = run_folder
        self.pid = pid
        self.qmp = qmp
        self.process = process
        self.agent = Agent(sockets(run_folder)["agent"])
        self.forwards: dict[int, int] = {}  # guest port -> host port of its forward
        self.ssh_key = ""  # the public key this process installed in the guest

    @classmethod
    async def launch(cls, spec: LaunchSpec) -> Machine:
        spec.run_folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        spec.run_folder.chmod(0o700)
        for path in sockets(spec.run_folder).values():
            path.unlink(missing_ok=True)
        if spec.ram_file is not None and spec.ram_file.parent == spec.run_folder:
            spec.ram_file.chmod(0o600)
        os.close(os.open(spec.run_folder / "serial.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
        user = drop_user(spec.qemu_user)
        log_fd = os.open(spec.run_folder / "qemu.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        backing = relative_backing(spec.disk)
        disk_fds = (os.open(spec.disk, os.O_RDWR), os.open(spec.disk, os.O_RDONLY))
        try:
            process = await asyncio.create_subprocess_exec(
                *qemu_args(spec, user, disk_fds, backing), stdin=asyncio.subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
                pass_fds=disk_fds, umask=0o077,
                start_new_session=True,  # a VM outlives an orchestrator restart and is adopted again
            )  # fmt: skip
        finally:
            for fd in (log_fd, *disk_fds):
                os.close(fd)
        try:
            qmp = await Qmp.connect(sockets(spec.run_folder)["qmp"])
        except BaseException as error:
            process.kill()
            await asyncio.shield(process.wait())
            if not isinstance(error, Exception):
                raise
            raise RuntimeError(f"QEMU did not start: {cls.read_log(spec.run_folder)}") from None
        machine = cls(spec.vm_id, spec.run_folder, process.pid, qmp, process)
        machine.bound_serial_log(spec.serial_log_max_bytes)
        try:
            # Connected before the guest runs: the guest learns the host side is open before it can read
            # a command, so its answer is never written to a port it believes closed.
            await machine.agent.connect()
            await qmp.execute("migrate-set-capabilities", {"capabilities": [{"capability": "x-ignore-shared", "state": True}]})
            await qmp.execute("migrate-set-parameters", {"max-bandwidth": MIGRATION_BANDWIDTH})
            if not spec.incoming:
                await qmp.execute("cont")
        except BaseException:  # a cancelled start too: no QEMU is left running that nothing knows of
            await asyncio.shield(machine.kill())
            raise
        return machine

    @classmethod
    async def adopt(
        cls, vm_id: str, run_folder: Path, pid: int, serial_log_max_bytes: int = LaunchSpec.serial_log_max_bytes
    ) -> Machine | None:
        """Reconnect to a QEMU started before this orchestrator process; None when it is gone."""
        if not pid or not process_is_vm(pid, vm_id):
            return None
        try:
            qmp = await Qmp.connect(sockets(run_folder)["qmp"], timeout=5)
        except (QmpError, OSError):
            return None
        machine = cls(vm_id, run_folder, pid, qmp, None)
        with contextlib.suppress(OSError):
            # A QEMU started before serial logs were appended to writes at its own offset: never cut.
            if b"append=on" in Path(f"/proc/{pid}/cmdline").read_bytes():
                machine.bound_serial_log(serial_log_max_bytes)
        await machine.agent.connect(handshake=True)
        await machine.find_forwards()
        return machine

    @classmethod
    async def control(cls, vm_id: str, run_folder: Path, pid: int) -> Machine:
        """QMP only, for repairs at start-up (the guest agent is left alone)."""
        return cls(vm_id, run_folder, pid, await Qmp.connect(sockets(run_folder)["qmp"], timeout=5), None)

    def bound_serial_log(self, limit: int) -> None:
        """Keep serial.log (what the guest writes to ttyS0, which it may do without end) under `limit`
        bytes, until QEMU's monitor closes."""
        self._serial_task = asyncio.create_task(self._bound_serial_log(self.run_folder / "serial.log", limit))

    async def _bound_serial_log(self, path: Path, limit: int) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.qmp.closed.wait(), SERIAL_LOG_CHECK_SECONDS)
                return
            with contextlib.suppress(OSError):
                if path.stat().st_size > limit:
                    await asyncio.to_thread(keep_tail, path, limit // 2)

    async def _top_image(self) -> dict[str, Any]:
        for device in await self.qmp.execute("query-block"):
            if device.get("device") == "virtio0" and "inserted" in device:
                return dict(device["inserted"].get("image") or {"filename": device["inserted"]["file"]})
        raise QmpError("QEMU reports no virtio0 disk")

    async def _real_path(self, name: str) -> str:
        """A layer's path where QEMU names it by the fdset it was passed in (or JSON around that)."""
        if name.startswith("json:"):
            with contextlib.suppress(ValueError, KeyError, TypeError):
                name = str(json.loads(name.removeprefix("json:"))["file"]["filename"])
        if not name.startswith("/dev/fdset/"):
            return name
        for fdset in await self.qmp.execute("query-fdsets"):
            if f"/dev/fdset/{fdset['fdset-id']}" == name:
                for fd in fdset.get("fds", []):
                    if fd.get("opaque", "")[:3] in ("rw:", "ro:"):
                        return str(fd["opaque"][3:])
        return name

    async def disk_chain(self) -> list[str]:
        """The files of the VM's disk as QEMU uses them now: the one it writes to first, then its backing files."""
        chain: list[str] = []
        image: dict[str, Any] | None = await self._top_image()
        while image is not None:
            chain.append(await self._real_path(str(image["filename"])))
            image = image.get("backing-image")
        return chain

    async def disk_size(self) -> int:
        """The size in bytes of the disk the guest sees (its writable layer's virtual size)."""
        return int((await self._top_image())["virtual-size"])

    async def grow_disk(self, size_bytes: int) -> None:
        """Grow the disk the guest sees, while it runs: the layer it writes to gets the new virtual size (the
        frozen layers under it stay as they are: what lies past their end reads as zeros), and the guest's
        virtio-blk driver learns the new capacity at once. Never asked to shrink (the engine checks)."""
        await self.qmp.execute("block_resize", {"device": "virtio0", "size": size_bytes})

    async def forward(self, host_address: str, host_port: int, guest_port: int) -> None:
        """Make the VM's user-mode stack listen on host_address:host_port and carry each connection to the
        guest's guest_port (raises QmpError with QEMU's reason, e.g. the port is taken)."""
        answer = await self.qmp.execute(
            "human-monitor-command", {"command-line": f"hostfwd_add net0 tcp:{host_address}:{host_port}-:{guest_port}"}
        )
        if str(answer).strip():
            raise QmpError(str(answer).strip())

    async def find_forwards(self) -> None:
        """The host forwards an earlier orchestrator made (they live in QEMU), so they are used again, not
        made twice. A VM without a NIC has none."""
        try:
            listing = await self.qmp.execute("human-monitor-command", {"command-line": "info usernet"})
        except QmpError:
            return
        for line in str(listing).splitlines():
            fields = line.split()
            # TCP[HOST_FORWARD]  fd  host-address  host-port  guest-address  guest-port  recv-q  send-q
            if len(fields) >= 6 and fields[0] == "TCP[HOST_FORWARD]" and fields[3].isdigit() and fields[5].isdigit():
                self.forwards[int(fields[5])] = int(fields[3])

    async def cancel_migration(self) -> None:
        """Stop a state save a crash left running; the VM stays stopped."""
        if (await self.qmp.execute("query-migrate")).get("status") in ("setup", "active", "device", "pre-switchover"):
            await self.qmp.execute("migrate_cancel")
            deadline = time.monotonic() + 30
            while (await self.qmp.execute("query-migrate")).get("status") not in ("cancelled", "failed", "completed"):
                if time.monotonic() > deadline:
                    raise QmpError("the interrupted state save did not stop within 30 s")
                await asyncio.sleep(0.01)

    @staticmethod
    def read_log(run_folder: Path) -> str:
        try:
            return (run_folder / "qemu.log").read_text(errors="replace").strip()[-500:]
        except OSError:
            return ""

    async def restore(self, state_file: Path) -> float:
        """Load device state (and RAM, for stream commits) from a commit; the VM stays paused. Seconds taken."""
        started = time.perf_counter()
        # No announcements after the restore: they tell switches where a NIC moved, and a user-mode stack
        # has none; each would wake the guest's network stack while its first commands run.
        await self.qmp.execute("migrate-set-parameters", {"announce-rounds": 0})
        await self._pass_fd("incoming", os.open(state_file, os.O_RDONLY | os.O_CLOEXEC))
        await self.qmp.execute("migrate-incoming", {"uri": "fd:incoming"})
        await self._wait_migration("incoming")
        return time.perf_counter() - started

    async def _pass_fd(self, name: str, fd: int) -> None:
        """Hand QEMU a descriptor under `name` (for `fd:NAME`); this process's copy is closed."""
        try:
            await self.qmp.execute("getfd", {"fdname": name}, fds=[fd])
        finally:
            os.close(fd)

    async def _wait_migration(self, what: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if time.monotonic() > deadline:
                raise QmpError(f"{what} migration did not finish within {timeout:.0f} s")
            status = (await self.qmp.execute("query-migrate")).get("status")
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise QmpError(f"{what} migration {status}")
            if what == "incoming":
                state = (await self.qmp.execute("query-status"))["status"]
                if state not in ("inmigrate", "prelaunch"):
                    return
            await asyncio.sleep(0.003)

    async def status(self) -> str:
        return str((await self.qmp.execute("query-status"))["status"])

    async def is_running(self) -> bool:
        """Whether its vCPUs run (QEMU's own status, which a VM's row may not know yet)."""
        return await self.status() == "running"

    async def pause(self) -> None:
        await self.qmp.execute("stop")

    async def resume(self) -> None:
        await self.qmp.execute("cont")

    async def snapshot(self, new_disk: Path, state_file: Path, ram_copy: Path | None, keep_paused: bool) -> float:
        """Freeze the disk (the VM goes on in `new_disk`), save device state, and RAM: copied from the
        shared RAM file when `ram_copy` is given, else streamed. Returns the seconds the VM was paused."""
        node = await self._new_layer(new_disk)  # made while the VM runs: not part of the pause
        was_running = await self.is_running()
        await self._stop()
        paused_at = time.perf_counter()
        try:
            try:
                await self.qmp.execute("blockdev-snapshot", {"node": "virtio0", "overlay": node})
            except BaseException:
                with contextlib.suppress(Exception):
                    await self.qmp.execute("blockdev-del", {"node-name": node})
                raise
            fault_point("commit.after_snapshot")
            await self._save_state(state_file, ram_copy)
        except BaseException:
            with contextlib.suppress(Exception):
                await self.cancel_migration()  # a save still running would stop the VM again when it ends
            raise
        finally:
            if was_running and not keep_paused:
                await self.qmp.execute("cont")
        paused = time.perf_counter() - paused_at
        await self._close_frozen_layers(str(new_disk))
        return paused

    async def _new_layer(self, new_disk: Path) -> str:
        """The overlay the VM goes on in, on the layer it writes to now, passed to QEMU in a new fdset
        (opened for writing and for reading; QEMU itself never opens it by path); its block node's name. Its
        header names that layer by its name alone when both are in one folder (the layers folder), so the
        chain works wherever it is copied (a shared commit store, another host's data folder)."""
        top = await self._top_image()
        under = Path(await self._real_path(str(top["filename"])))
        process = await asyncio.create_subprocess_exec(
            "qemu-img", "create", "-q", *LAYER_OPTIONS, "-u", "-b", under.name if under.parent == new_disk.parent else str(under),
            "-F", "qcow2", str(new_disk), str(top["virtual-size"]),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, umask=0o077,
        )  # fmt: skip
        _, stderr = await process.communicate()
        if process.returncode != 0:
            raise QmpError(f"the new disk layer could not be made: {stderr.decode(errors='replace').strip()}")
        writable, readable = os.open(new_disk, os.O_RDWR | os.O_CLOEXEC), os.open(new_disk, os.O_RDONLY | os.O_CLOEXEC)
        try:
            added = await self.qmp.execute("add-fd", {"opaque": f"rw:{new_disk}"}, fds=[writable])
            await self.qmp.execute("add-fd", {"fdset-id": added["fdset-id"], "opaque": f"ro:{new_disk}"}, fds=[readable])
        finally:
            os.close(writable)
            os.close(readable)
        node = f"layer-{uuid.uuid4().hex[:24]}"
        try:
            await self.qmp.execute("blockdev-add", {
                "driver": "qcow2", "node-name": node, "backing": None,  # the layer it stands on is the VM's current one
                "discard": "unmap",
                "file": {"driver": "file", "filename": f"/dev/fdset/{added['fdset-id']}", "locking": "off"},
            })  # fmt: skip
        except BaseException:
            with contextlib.suppress(Exception):
                await self.qmp.execute("remove-fd", {"fdset-id": added["fdset-id"]})
            raise
        return node

    async def _close_frozen_layers(self, top: str) -> None:
        """QEMU reads frozen layers only: the descriptors it was given to write to them are closed."""
        with contextlib.suppress(QmpError):
            for fdset in await self.qmp.execute("query-fdsets"):
                for fd in fdset.get("fds", []):
                    if fd.get("opaque", "").startswith("rw:") and fd["opaque"][3:] != top:
                        await self.qmp.execute("remove-fd", {"fdset-id": fdset["fdset-id"], "fd": fd["fd"]})

    async def _save_state(self, state_file: Path, ram_copy: Path | None) -> None:
        await self._pass_fd("migration", os.open(state_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600))
        await self.qmp.execute("migrate", {"uri": "fd:migration"})
        await self._wait_migration("outgoing")
        if ram_copy is not None:
            await asyncio.to_thread(copy_sparse, self.ram_file, ram_copy)

    async def save(self, state_file: Path, ram_copy: Path | None) -> None:
        """Stop the VM and save its device state and RAM (as `snapshot` does, the disk left as it is).
        If saving fails the VM is left stopped."""
        await self._stop()
        await self._save_state(state_file, ram_copy)

    async def _stop(self) -> None:
        """Stop the guest for a save. One that an earlier save left stopped (a commit that kept it paused:
        QEMU's "postmigrate") must run again before QEMU saves it anew: it is resumed and stopped at once."""
        if await self.status() == "postmigrate":
            await self.qmp.execute("cont")
        await self.qmp.execute("stop")

    async def quit(self) -> None:
        """End QEMU cleanly, its disk flushed and closed."""
        with contextlib.suppress(QmpError, QmpClosed, ConnectionError, OSError):
            await self.qmp.execute("quit")  # QEMU may close the socket before it answers
        await self.wait_exit()
        await self.agent.close()
        await self.qmp.close()

    @property
    def ram_file(self) -> Path:
        return self.run_folder / "ram"

    async def wait_exit(self) -> None:
        if self.process is not None:
            await self.process.wait()
        else:
            await self.qmp.closed.wait()
            while process_is_vm(self.pid, self.vm_id):
                await asyncio.sleep(0.2)

    async def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        await self.wait_exit()
        await self.agent.close()
        await self.qmp.close()


def keep_tail(path: Path, keep: int) -> None:
    """Cut a file its writer appends to down to its last `keep` bytes (and what is appended meanwhile):
    the tail is copied to the start, then the file truncated after it; the writer's next append goes to
    the new end."""
    with path.open("r+b") as file:
        size = os.fstat(file.fileno()).st_size
        if size <= keep:
            return
        file.seek(size - keep)
        tail = file.read()
        os.pwrite(file.fileno(), tail, 0)
        file.truncate(len(tail))


def copy_sparse(source: Path, target: Path) -> None:
    """Copy only the allocated parts of `source` (RAM the guest never touched stays a hole)."""
    target_fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with source.open("rb") as src, os.fdopen(target_fd, "wb") as dst:
        size = os.fstat(src.fileno()).st_size
        dst.truncate(size)
        offset = 0
        while offset < size:
            try:
                data = os.lseek(src.fileno(), offset, os.SEEK_DATA)
            except OSError:
                break  # no data after offset
            hole = os.lseek(src.fileno(), data, os.SEEK_HOLE)
            position = data
            dst.seek(data)
            while position < hole:
                # sendfile works across filesystems (tmpfs to disk), where copy_file_range may not
                copied = os.sendfile(dst.fileno(), src.fileno(), position, hole - position)
                if copied == 0:
                    break
                position += copied
            offset = hole


__all__ = [
    "RAM_MODES", "LaunchSpec", "Machine", "QmpClosed", "QmpError", "copy_sparse", "drop_user", "find_processes",
    "keep_tail", "kill_process", "qcow2_backing", "qemu_args", "relative_backing",
]  # fmt: skip

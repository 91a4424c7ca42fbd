"""One QEMU process: how it is started, restored, snapshotted, watched and stopped."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from services.common.faults import fault_point
from services.orchestrator.accel import cpu_args
from services.orchestrator.agent import Agent
from services.orchestrator.network import netdev_args
from services.orchestrator.qmp import Qmp, QmpClosed, QmpError

log = logging.getLogger(__name__)

# How the VM's RAM is backed. "shared": its own file, mapped shared, so a commit copies the file and
# migrates only device state (shortest pause). "private": a commit's RAM file mapped copy-on-write, so
# branches of one commit share its pages. "anonymous": loaded from a migration stream.
RAM_MODES = ("shared", "private", "anonymous")
MIGRATION_BANDWIDTH = 100 * 1024**3


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


def sockets(run_folder: Path) -> dict[str, Path]:
    return {name: run_folder / f"{name}.sock" for name in ("qmp", "agent", "console")}


def qemu_args(spec: LaunchSpec) -> list[str]:
    paths = sockets(spec.run_folder)
    if spec.ram_mode == "anonymous":
        memory = f"memory-backend-ram,id=ram0,size={spec.mem_mib}M"
    else:
        share = "on" if spec.ram_mode == "shared" else "off"
        memory = f"memory-backend-file,id=ram0,size={spec.mem_mib}M,mem-path={spec.ram_file},share={share}"
    args = [
        *spec.prefix, "qemu-system-x86_64", "-name", f"vers-{spec.vm_id}",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        # seccomp: no obsolete syscalls, no uid/gid changes, no scheduler games (a commit's state save
        # spawns `cat`, so spawning stays allowed)
        "-sandbox", "on,obsolete=deny,elevateprivileges=deny,resourcecontrol=deny",
        "-machine", "pc,memory-backend=ram0", *cpu_args(spec.accel),
        "-smp", str(spec.vcpus), "-m", f"{spec.mem_mib}M", "-object", memory,
        "-kernel", str(spec.kernel), "-initrd", str(spec.initramfs),
        "-append", "console=ttyS0 quiet panic=-1",
        "-drive", f"file={spec.disk},if=virtio,format=qcow2",
        "-device", "virtio-serial-pci",
        "-chardev", f"socket,id=agent,path={paths['agent']},server=on,wait=off",
        "-device", "virtserialport,chardev=agent,name=agent",
        "-chardev", f"socket,id=console,path={paths['console']},server=on,wait=off",
        "-device", "virtconsole,chardev=console",
        "-device", "virtio-rng-pci",
        "-serial", f"file:{spec.run_folder / 'serial.log'}",
        "-qmp", f"unix:{paths['qmp']},server=on,wait=off",
        "-pidfile", str(spec.run_folder / "qemu.pid"),
        *netdev_args(spec.network),
    ]  # fmt: skip
    if spec.incoming:
        args += ["-incoming", "defer"]
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
        spec.run_folder.mkdir(parents=True, exist_ok=True)
        for path in sockets(spec.run_folder).values():
            path.unlink(missing_ok=True)
        with (spec.run_folder / "qemu.log").open("ab") as log_file:
            process = await asyncio.create_subprocess_exec(
                *qemu_args(spec), stdin=asyncio.subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                start_new_session=True,  # a VM outlives an orchestrator restart and is adopted again
            )  # fmt: skip
        try:
            qmp = await Qmp.connect(sockets(spec.run_folder)["qmp"])
        except Exception:
            process.kill()
            await process.wait()
            raise RuntimeError(f"QEMU did not start: {cls.read_log(spec.run_folder)}") from None
        machine = cls(spec.vm_id, spec.run_folder, process.pid, qmp, process)
        # Connected before the guest runs: the guest learns the host side is open before it can read
        # a command, so its answer is never written to a port it believes closed.
        await machine.agent.connect()
        await qmp.execute("migrate-set-capabilities", {"capabilities": [{"capability": "x-ignore-shared", "state": True}]})
        await qmp.execute("migrate-set-parameters", {"max-bandwidth": MIGRATION_BANDWIDTH})
        return machine

    @classmethod
    async def adopt(cls, vm_id: str, run_folder: Path, pid: int) -> Machine | None:
        """Reconnect to a QEMU started before this orchestrator process; None when it is gone."""
        if not pid or not process_is_vm(pid, vm_id):
            return None
        try:
            qmp = await Qmp.connect(sockets(run_folder)["qmp"], timeout=5)
        except (QmpError, OSError):
            return None
        machine = cls(vm_id, run_folder, pid, qmp, None)
        await machine.agent.connect(handshake=True)
        await machine.find_forwards()
        return machine

    @classmethod
    async def control(cls, vm_id: str, run_folder: Path, pid: int) -> Machine:
        """QMP only, for repairs at start-up (the guest agent is left alone)."""
        return cls(vm_id, run_folder, pid, await Qmp.connect(sockets(run_folder)["qmp"], timeout=5), None)

    async def disk_chain(self) -> list[str]:
        """The files of the VM's disk as QEMU uses them now: the one it writes to first, then its backing files."""
        for device in await self.qmp.execute("query-block"):
            if device.get("device") == "virtio0" and "inserted" in device:
                chain, image = [], device["inserted"].get("image")
                while image is not None:
                    chain.append(str(image["filename"]))
                    image = image.get("backing-image")
                return chain or [str(device["inserted"]["file"])]
        raise QmpError("QEMU reports no virtio0 disk")

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
        await self.qmp.execute("migrate-incoming", {"uri": f"exec:cat {shlex.quote(str(state_file))}"})
        await self._wait_migration("incoming")
        return time.perf_counter() - started

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

    async def pause(self) -> None:
        await self.qmp.execute("stop")

    async def resume(self) -> None:
        await self.qmp.execute("cont")

    async def snapshot(self, new_disk: Path, state_file: Path, ram_copy: Path | None, keep_paused: bool) -> float:
        """Freeze the disk (the VM goes on in `new_disk`), save device state, and RAM: copied from the
        shared RAM file when `ram_copy` is given, else streamed. Returns the seconds the VM was paused."""
        was_running = await self.status() == "running"
        await self.qmp.execute("stop")
        paused_at = time.perf_counter()
        try:
            await self.qmp.execute(
                "blockdev-snapshot-sync", {"device": "virtio0", "snapshot-file": str(new_disk), "format": "qcow2"}
            )
            fault_point("commit.after_snapshot")
            await self._save_state(state_file, ram_copy)
        except BaseException:
            with contextlib.suppress(Exception):
                await self.cancel_migration()  # a save still running would stop the VM again when it ends
            raise
        finally:
            if was_running and not keep_paused:
                await self.qmp.execute("cont")
        return time.perf_counter() - paused_at

    async def _save_state(self, state_file: Path, ram_copy: Path | None) -> None:
        await self.qmp.execute("migrate", {"uri": f"exec:cat > {shlex.quote(str(state_file))}"})
        await self._wait_migration("outgoing")
        if ram_copy is not None:
            await asyncio.to_thread(copy_sparse, self.ram_file, ram_copy)

    async def save(self, state_file: Path, ram_copy: Path | None) -> None:
        """Stop the VM and save its device state and RAM (as `snapshot` does, the disk left as it is).
        If saving fails the VM is left stopped."""
        await self.qmp.execute("stop")
        await self._save_state(state_file, ram_copy)

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
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        await self.wait_exit()
        await self.agent.close()
        await self.qmp.close()


def copy_sparse(source: Path, target: Path) -> None:
    """Copy only the allocated parts of `source` (RAM the guest never touched stays a hole)."""
    with source.open("rb") as src, target.open("wb") as dst:
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


__all__ = ["RAM_MODES", "LaunchSpec", "Machine", "QmpClosed", "QmpError", "copy_sparse", "find_processes", "kill_process", "qemu_args"]

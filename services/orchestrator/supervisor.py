"""The VMs this process has in hand, one record each: made when a VM's QEMU starts or is adopted (or when a
change or a connection takes the VM up), dropped once its QEMU has ended (it stopped, died, went to sleep or
was deleted) and nothing uses the record any more. So the records are those of the VMs running here and of
those being changed or connected to now: nothing of a VM stays behind once it is gone."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from services.orchestrator.machine import Machine
from services.orchestrator.models import VmRow


@dataclass(eq=False)
class LiveVm:
    """One VM in this process's hands: its QEMU while it runs (the process, its QMP and agent connections),
    whether it has booted, its console, its connections from outside, and the lock that keeps the changes to
    it (commit, branch, sleep, wake, state, resize, delete) one at a time."""

    vm_id: str
    org_id: str
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    console: asyncio.Lock = field(default_factory=asyncio.Lock)
    booted: asyncio.Event = field(default_factory=asyncio.Event)
    machine: Machine | None = None
    # Its QEMU is being ended on purpose (sleep, delete): its exit is not a death.
    ending: bool = False
    # Connections to its ports from outside (tunnels, SSH, domains), and the lock that makes host forwards.
    tunnels: int = 0
    forwarding: asyncio.Lock = field(default_factory=asyncio.Lock)
    # What its QEMU may take of this host at most: memory, and tmpfs for a RAM file of its own.
    memory_mib: int = 0
    run_mib: int = 0
    # Changes and connections holding the record now (waiting for its lock counts).
    users: int = 0


class Supervisor:
    def __init__(self) -> None:
        self._records: dict[str, LiveVm] = {}

    def __contains__(self, vm_id: str) -> bool:
        return vm_id in self._records

    def __len__(self) -> int:
        return len(self._records)

    def get(self, vm_id: str) -> LiveVm | None:
        return self._records.get(vm_id)

    def running(self) -> list[LiveVm]:
        """The records of the VMs whose QEMU runs here."""
        return [record for record in self._records.values() if record.machine is not None]

    def tunnels(self, org_id: str | None = None) -> int:
        """Connections into VMs open now: on this host, or into the VMs of one org."""
        return sum(record.tunnels for record in self._records.values() if org_id is None or record.org_id == org_id)

    @contextmanager
    def hold(self, vm_id: str, org_id: str) -> Iterator[LiveVm]:
        """The VM's record (made if it has none), kept while the block runs: a change waiting for the VM's lock
        and the one holding it share one record, so one lock."""
        record = self._records.get(vm_id)
        if record is None:
            record = self._records[vm_id] = LiveVm(vm_id, org_id)
        record.users += 1
        try:
            yield record
        finally:
            record.users -= 1
            self._drop_if_unused(record)

    def attach(self, vm: VmRow, machine: Machine, booted: bool) -> LiveVm:
        """The VM's QEMU runs (started, woken or adopted): its record holds it from now on."""
        record = self._records.get(vm.id)
        if record is None:
            record = self._records[vm.id] = LiveVm(vm.id, vm.org_id)
        record.machine = machine
        record.memory_mib = vm.mem_size_mib
        record.run_mib = vm.mem_size_mib if vm.ram_mode == "shared" else 0
        record.ending = False
        record.booted = asyncio.Event()
        if booted:
            record.booted.set()
        return record

    def detach(self, record: LiveVm) -> None:
        """The VM's QEMU has ended, or is being ended: its record goes once nothing holds it."""
        record.machine = None
        self._drop_if_unused(record)

    async def close(self) -> None:
        """Let go of every VM: their QMP and agent connections close, their QEMUs go on as they are."""
        for record in self._records.values():
            if record.machine is not None:
                await record.machine.agent.close()
                await record.machine.qmp.close()
                record.machine = None
        self._records.clear()

    def _drop_if_unused(self, record: LiveVm) -> None:
        if record.machine is None and not record.users and self._records.get(record.vm_id) is record:
            del self._records[record.vm_id]

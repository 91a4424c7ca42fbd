"""Several VM hosts: the host agents' records, their heartbeats, and what happens when one falls silent.

A host agent (VERS_ORCHESTRATOR_ROLE=host) runs the engine on its machine and sends the orchestrator API a
heartbeat every VERS_HOST_HEARTBEAT_SECONDS: where it is reached and what room it has. The API keeps one
row per host in the orchestrator's database, which every API replica and host agent shares. An API replica
marks a host silent for VERS_HOST_DEAD_SECONDS dead, and with it every VM that was live on it: a dead VM
never runs again, and its commits (in the shared commit store) branch on any other host. A sleeping VM of
a dead host stays asleep (its memory is on that host's disk) and wakes once the host is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import grpc
from sqlmodel import col, select

from services.common.auth import PLATFORM_ITSELF, ServiceCredential, current_principal
from services.common.db import Database
from services.common.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from services.common.peers import open_channel
from services.common.settings import Settings
from services.common.timestamps import as_utc, to_timestamp, utcnow
from services.orchestrator.models import LIVE_STATES, HostRow, HostState, VmRow, VmState
from vers.orchestrator.v1 import hosts_pb2, hosts_pb2_grpc

log = logging.getLogger(__name__)


def host_status(row: HostRow) -> hosts_pb2.HostStatus:
    return hosts_pb2.HostStatus(
        host_id=row.id,
        address=row.address,
        state=row.state,
        accelerator=row.accelerator,
        room=hosts_pb2.HostRoom(
            memory_total_mib=row.memory_total_mib,
            memory_free_mib=row.memory_free_mib,
            disk_free_mib=row.disk_free_mib,
            run_free_mib=row.run_free_mib,
            vcpus=row.vcpus,
            vm_count=row.vm_count,
        ),
        heartbeat_at=to_timestamp(row.heartbeat_at),
        registered_at=to_timestamp(row.registered_at),
    )


class HostTable:
    """The hosts' rows: written by heartbeats, read by placement and routing, swept for silent hosts."""

    def __init__(self, db: Database, dead_after: float) -> None:
        self.db = db
        self.dead_after = timedelta(seconds=dead_after)

    async def beat(self, status: hosts_pb2.HostStatus) -> None:
        """A heartbeat: the host's row made or brought up to date; a host marked dead is up again."""
        if not status.host_id or not status.address:
            raise InvalidArgument("a heartbeat names the host (host_id) and where it is reached (address)")
        room = status.room
        figures: dict[str, Any] = {
            "address": status.address,
            "instance": status.instance,
            "accelerator": status.accelerator,
            "memory_total_mib": room.memory_total_mib,
            "memory_free_mib": room.memory_free_mib,
            "disk_free_mib": room.disk_free_mib,
            "run_free_mib": room.run_free_mib,
            "vcpus": room.vcpus,
            "vm_count": room.vm_count,
            "heartbeat_at": utcnow(),
        }
        async with self.db.write() as session:
            row = await session.get(HostRow, status.host_id, with_for_update=True)
            if row is not None and self.is_live(row) and row.instance != status.instance and row.address != status.address:
                raise FailedPrecondition(
                    f"host {status.host_id!r} is already up, as another agent at {row.address}: give this agent "
                    f"another VERS_HOST_ID, or start it once the other has been silent for VERS_HOST_DEAD_SECONDS"
                )
            if row is None:
                log.info("host %s registered at %s", status.host_id, status.address)
                row = HostRow(id=status.host_id, **figures)
            else:
                if row.state != HostState.UP:
                    log.warning("host %s is back (at %s)", status.host_id, status.address)
                for key, value in figures.items():
                    setattr(row, key, value)
                row.state = HostState.UP
            session.add(row)

    async def hosts(self) -> list[HostRow]:
        async with self.db.read() as session:
            return list(await session.exec(select(HostRow).order_by(col(HostRow.id))))

    def is_live(self, row: HostRow) -> bool:
        return row.state == HostState.UP and utcnow() - as_utc(row.heartbeat_at) < self.dead_after

    async def live(self) -> list[HostRow]:
        """Live hosts, the one with the most memory free for new VMs first (then the fewest VMs)."""
        rows = [row for row in await self.hosts() if self.is_live(row)]
        return sorted(rows, key=lambda row: (-row.memory_free_mib, row.vm_count, row.id))

    async def get(self, host_id: str) -> HostRow | None:
        async with self.db.read() as session:
            return await session.get(HostRow, host_id)

    async def sweep(self) -> list[str]:
        """Hosts silent for longer than VERS_HOST_DEAD_SECONDS are marked dead, and every VM live on them with
        them, in one transaction; returns their ids."""
        cutoff = utcnow() - self.dead_after
        async with self.db.write() as session:
            query = select(HostRow).where(col(HostRow.state) == HostState.UP, col(HostRow.heartbeat_at) < cutoff).with_for_update()
            silent = list(await session.exec(query))
            for row in silent:
                row.state = HostState.DEAD
                session.add(row)
                vms = select(VmRow).where(col(VmRow.host_id) == row.id, col(VmRow.state).in_(LIVE_STATES), col(VmRow.deleted_at).is_(None))
                lost = list(await session.exec(vms))
                for vm in lost:
                    vm.state = VmState.DEAD
                    vm.pid = 0
                    session.add(vm)
                log.warning(
                    "host %s has been silent since %s: marked dead, with its %d live VM(s) %s",
                    row.id, as_utc(row.heartbeat_at).isoformat(), len(lost), ", ".join(vm.id for vm in lost),
                )  # fmt: skip
            return [row.id for row in silent]

    async def remove(self, host_id: str) -> list[str]:
        """Forget a host marked dead: its row goes, and the VMs not deleted that name it (asleep on it) are marked
        dead; returns their ids. A host already forgotten (or never known) is nothing to do."""
        async with self.db.write() as session:
            row = await session.get(HostRow, host_id, with_for_update=True)
            if row is None:
                return []
            if row.state != HostState.DEAD:
                raise FailedPrecondition(
                    f"host {host_id!r} is {'up' if self.is_live(row) else 'silent, not yet marked dead'}: only a dead host is removed"
                )
            query = select(VmRow).where(col(VmRow.host_id) == host_id, col(VmRow.deleted_at).is_(None), col(VmRow.state) != VmState.DEAD)
            stranded = list(await session.exec(query))
            for vm in stranded:
                vm.state = VmState.DEAD
                vm.pid = 0
                session.add(vm)
            await session.delete(row)
        log.warning("host %s removed; its sleeping VM(s) %s are dead", host_id, ", ".join(vm.id for vm in stranded) or "(none)")
        return [vm.id for vm in stranded]

    async def watch(self, every: float) -> None:
        """Sweep for silent hosts until cancelled (each API replica does; a sweep is one transaction). None before
        VERS_HOST_DEAD_SECONDS have passed since this replica started: the agents could not reach an API that was
        down (a restart, an outage), which says nothing of the hosts, and they need that long to beat again."""
        await asyncio.sleep(self.dead_after.total_seconds())
        while True:
            try:
                await self.sweep()
            except Exception:
                log.exception("could not look for silent hosts")
            await asyncio.sleep(every)


class HostRegistryServicer(hosts_pb2_grpc.HostRegistryInternalServiceServicer):
    """The API's side of the heartbeats."""

    def __init__(self, table: HostTable, settings: Settings) -> None:
        self.table = table
        self.settings = settings

    async def Heartbeat(self, request: hosts_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext) -> hosts_pb2.HeartbeatResponse:
        if current_principal().org_id != PLATFORM_ITSELF:
            raise PermissionDenied("only a host agent's own credential sends heartbeats, not a service acting for an organization")
        await self.table.beat(request.status)
        return hosts_pb2.HeartbeatResponse(
            heartbeat_seconds=self.settings.host_heartbeat_seconds, dead_seconds=self.settings.host_dead_seconds
        )


class HostsServicer(hosts_pb2_grpc.HostsServiceServicer):
    """The hosts, for the administrator (GET /api/v1/admin/hosts, `vers admin hosts`)."""

    def __init__(self, table: HostTable) -> None:
        self.table = table

    async def ListHosts(self, request: hosts_pb2.ListHostsRequest, context: grpc.aio.ServicerContext) -> hosts_pb2.ListHostsResponse:
        hosts = []
        for row in await self.table.hosts():
            status = host_status(row)
            if row.state == HostState.UP and not self.table.is_live(row):
                status.state = "silent"  # not yet swept: the next sweep marks it dead
            hosts.append(status)
        return hosts_pb2.ListHostsResponse(hosts=hosts)

    async def RemoveHost(self, request: hosts_pb2.RemoveHostRequest, context: grpc.aio.ServicerContext) -> hosts_pb2.RemoveHostResponse:
        return hosts_pb2.RemoveHostResponse(host_id=request.host_id, dead_vm_ids=await self.table.remove(request.host_id))


Send = Callable[[hosts_pb2.HostStatus], Awaitable[None]]


class HostAgent(hosts_pb2_grpc.HostAgentInternalServiceServicer):
    """A host's side: its status on request, and a heartbeat every VERS_HOST_HEARTBEAT_SECONDS until it stops,
    sent to the orchestrator API by a host agent, written to the table itself by a single-host orchestrator."""

    def __init__(
        self,
        settings: Settings,
        address: str,
        room: Callable[[], hosts_pb2.HostRoom],
        accelerator: Callable[[], str],
        reconcile: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.settings = settings
        self.address = address
        self.room = room
        self.accelerator = accelerator
        # A host agent's, after each heartbeat the API heard: stop what the database says is dead (a host declared
        # dead while cut off has had its VMs marked dead meanwhile).
        self.reconcile = reconcile
        self.instance = uuid.uuid4().hex
        self._task: asyncio.Task[None] | None = None
        self._channel: grpc.aio.Channel | None = None

    def status(self) -> hosts_pb2.HostStatus:
        return hosts_pb2.HostStatus(
            host_id=self.settings.host_name,
            address=self.address,
            room=self.room(),
            state=HostState.UP,
            accelerator=self.accelerator(),
            instance=self.instance,
        )

    async def GetHostStatus(
        self, request: hosts_pb2.GetHostStatusRequest, context: grpc.aio.ServicerContext
    ) -> hosts_pb2.GetHostStatusResponse:
        return hosts_pb2.GetHostStatusResponse(status=self.status())

    def start(self, send: Send) -> None:
        self._task = asyncio.create_task(self._beat(send))

    def to_api(self, credential: ServiceCredential) -> Send:
        """Heartbeats over gRPC to the orchestrator API (ORCHESTRATOR_ADDR), with the platform's own credential, on
        a channel of their own that tries to reconnect every second (gRPC's default backs off to two minutes,
        longer than an API's restart takes, and a host silent that long is marked dead)."""
        every = self.settings.host_heartbeat_seconds
        backoff = [("grpc.initial_reconnect_backoff_ms", 500), ("grpc.max_reconnect_backoff_ms", int(max(every, 1.0) * 1000))]
        self._channel = open_channel(self.settings, self.settings.orchestrator_addr, backoff)
        registry: hosts_pb2_grpc.HostRegistryInternalServiceAsyncStub = hosts_pb2_grpc.HostRegistryInternalServiceStub(self._channel)
        timeout = max(every, 1.0)

        async def send(status: hosts_pb2.HostStatus) -> None:
            request = hosts_pb2.HeartbeatRequest(status=status)
            await registry.Heartbeat(request, metadata=credential.metadata(PLATFORM_ITSELF), timeout=timeout)

        return send

    async def _beat(self, send: Send) -> None:
        failing = False
        while True:
            try:
                await send(self.status())
                if failing:
                    log.info("the orchestrator API hears this host again")
                failing = False
                if self.reconcile is not None:
                    await self.reconcile()
            except grpc.aio.AioRpcError as error:
                if not failing:
                    log.warning(
                        "heartbeat to the orchestrator API at %s failed: %s %s",
                        self.settings.orchestrator_addr,
                        error.code().name,
                        error.details(),
                    )
                failing = True
            except Exception:
                log.exception("heartbeat or its reconciliation failed")
            await asyncio.sleep(self.settings.host_heartbeat_seconds)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._channel is not None:
            await self._channel.close()

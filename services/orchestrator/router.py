"""The orchestrator API of a platform with several VM hosts (VERS_ORCHESTRATOR_ROLE=api): it runs no VM and
keeps no VM state of its own. It serves the orchestrator's services by passing each call, as it came (its
bytes, its key, its deadline), to a host agent, and the host's answer back:

- a call about a VM (its `vm_id`, a branch's source VM, a domain's VM) goes to the host the VM runs on;
- a call that makes VMs from nothing or from a commit (a new root VM, a restore, a branch of a commit, tag or
  ref, a fork, a deploy) is placed on the live host with the most memory free; a host that answers it has no
  room (HOST_FULL) passes it to the next;
- every other call (lists, commits, domains by id, env vars, images) reads or writes the shared database
  and commit store, and goes to any live host.

The administrator may name the hosts to try, in order, in a call's `vers-placement-host` metadata (comma-separated:
benchmarks, draining a host).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import descriptor, message_factory
from google.protobuf.message import DecodeError, Message

from services.common.auth import current_principal
from services.common.errors import InvalidArgument, Unavailable
from services.common.interceptor import AioContext
from services.common.names import normalize_host
from services.common.peers import open_channel
from services.common.settings import Settings
from services.orchestrator.hosts import HostTable
from services.orchestrator.models import HostRow, VmState
from services.orchestrator.placement import is_host_full
from services.orchestrator.store import OrchestratorStore
from vers.orchestrator.v1 import images_pb2, orchestrator_pb2

log = logging.getLogger(__name__)

# The services a host agent serves and the API forwards.
FORWARDED = (
    orchestrator_pb2.DESCRIPTOR.services_by_name["OrchestratorService"],
    orchestrator_pb2.DESCRIPTOR.services_by_name["OrchestratorInternalService"],
    orchestrator_pb2.DESCRIPTOR.services_by_name["OrchestratorEdgeService"],
    images_pb2.DESCRIPTOR.services_by_name["ImagesService"],
)
# Calls that make VMs on the host they land on (not from a VM, which stays on its own host).
PLACED = frozenset(
    {
        "vers.orchestrator.v1.OrchestratorService.CreateRootVm",
        "vers.orchestrator.v1.OrchestratorService.RestoreFromCommit",
        "vers.orchestrator.v1.OrchestratorService.BranchByCommit",
        "vers.orchestrator.v1.OrchestratorService.BranchByTag",
        "vers.orchestrator.v1.OrchestratorService.BranchByRef",
        "vers.orchestrator.v1.OrchestratorService.Deploy",
        "vers.orchestrator.v1.OrchestratorInternalService.ForkCommit",
    }
)
PLACEMENT_HINT = "vers-placement-host"
# Metadata grpc sets on every call itself; the rest (the key, a hint) passes on.
_OWN_METADATA = ("user-agent", "content-type", "te")


def _forwarded_metadata(context: AioContext) -> tuple[tuple[str, str | bytes], ...]:
    return tuple(
        (key, value)
        for key, value in context.invocation_metadata() or ()
        if not key.startswith((":", "grpc-")) and key not in _OWN_METADATA
    )


class Router:
    def __init__(self, settings: Settings, store: OrchestratorStore, hosts: HostTable) -> None:
        self.settings = settings
        self.store = store
        self.hosts = hosts
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._turn = itertools.count()

    def channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = open_channel(self.settings, address)
        return self._channels[address]

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()

    # Where a call goes

    async def _live_hosts(self) -> list[HostRow]:
        live = await self.hosts.live()
        if not live:
            raise Unavailable("no VM host is up: start a host agent (VERS_ORCHESTRATOR_ROLE=host), or wait for one to come back")
        return live

    async def _any_host(self) -> list[HostRow]:
        """Every live host, starting from the next in turn, so that calls any host can answer are spread."""
        live = await self._live_hosts()
        start = next(self._turn) % len(live)
        return live[start:] + live[:start]

    async def _placement(self, context: AioContext) -> list[HostRow]:
        """The hosts to try for new VMs, in order: those the hint names (comma-separated, in its order), or every
        live host with room for anything (disk and tmpfs left), the most memory free first."""
        hint = str(dict(context.invocation_metadata() or ()).get(PLACEMENT_HINT, ""))
        live = await self._live_hosts()
        if not hint:
            roomy = [row for row in live if row.disk_free_mib > 0 and row.run_free_mib > 0]
            return roomy or live  # none with room: the first says why
        caller = current_principal()
        if not (caller.is_admin or caller.is_service):
            raise InvalidArgument(f"only the platform administrator may choose a VM's host ({PLACEMENT_HINT})")
        up = {row.id: row for row in live}
        chosen = [up[name] for name in (part.strip() for part in hint.split(",")) if name in up]
        if not chosen:
            raise Unavailable(f"no host of {hint!r} is up: choose among {', '.join(up)}")
        return chosen

    async def _host_of_vm(self, vm_id: str, org_id: str | None) -> list[HostRow] | None:
        """The host the VM runs on. None lets any host answer: for a VM that is missing, deleted or dead (the
        answer comes from the shared database), of another organization than the caller's `org_id` (its
        NOT_FOUND comes from a host, as for any id; nothing here says more), or whose host is down when the
        caller is not its organization's (`org_id` None: a domain's visitor, the platform's own saga). To its
        organization, a live VM whose host is down cannot be reached, and the answer says why."""
        vm = await self.store.vm(vm_id)
        if vm is None or vm.deleted_at is not None or vm.state == VmState.DEAD:
            return None
        if org_id is not None and vm.org_id != org_id:
            return None
        host = await self.hosts.get(vm.host_id)
        if host is not None and self.hosts.is_live(host):
            return [host]
        if org_id is None:
            return None
        raise Unavailable(
            f"VM {vm_id} is on a host that is down: a sleeping VM wakes once its host is back; its commits start new VMs on any other host"
        )

    async def _host_of_fork(self, saga_id: str) -> list[HostRow] | None:
        """The host of the VM a fork's saga made, when there is one: the fork goes on there, and is undone there."""
        fork = await self.store.fork_request(saga_id)
        return await self._host_of_vm(fork.vm_id, None) if fork is not None and fork.vm_id else None

    async def _route(self, method: descriptor.MethodDescriptor, request: Message | None, context: AioContext) -> tuple[list[HostRow], bool]:
        """The hosts to try in order, and whether a host's HOST_FULL passes the call to the next one."""
        fields = request.DESCRIPTOR.fields_by_name if request is not None else {}
        if request is not None and "vm_id" in fields and (vm_id := getattr(request, "vm_id", "")):
            return (await self._host_of_vm(vm_id, current_principal().org_id) or await self._any_host()), False
        if isinstance(request, orchestrator_pb2.BranchVmRequest) and (
            source := await self._host_of_vm(request.vm_or_commit_id, current_principal().org_id)
        ):
            return source, False  # a branch of a VM; of a commit, it is placed as any new VM
        if isinstance(request, orchestrator_pb2.ProxyDomainRequest):
            domain = await self.store.domain_named(normalize_host(request.host))
            if domain is not None and (host := await self._host_of_vm(domain.vm_id, None)):
                return host, False
            return await self._any_host(), False
        if isinstance(request, orchestrator_pb2.ForkCommitRequest | orchestrator_pb2.AbandonForkRequest) and (
            forked := await self._host_of_fork(request.saga_id)
        ):
            return forked, False
        if method.full_name in PLACED or isinstance(request, orchestrator_pb2.BranchVmRequest):
            return await self._placement(context), True
        return await self._any_host(), False

    # Forwarding

    async def _unary(self, host: HostRow, path: str, raw: bytes, context: AioContext) -> bytes:
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = self.channel(host.address).unary_unary(path)
        answer: bytes = await call(raw, metadata=_forwarded_metadata(context), timeout=context.time_remaining())
        return answer

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        """A generic handler per forwarded service: every method passes bytes through, untouched."""
        handlers = []
        for service in FORWARDED:
            methods = {method.name: self._handler(method) for method in service.methods}
            handlers.append(grpc.method_handlers_generic_handler(service.full_name, methods))
        return handlers

    def _handler(self, method: descriptor.MethodDescriptor) -> grpc.RpcMethodHandler[Any, Any]:
        path = f"/{method.containing_service.full_name}/{method.name}"
        request_class = message_factory.GetMessageClass(method.input_type)

        def parse(raw: bytes | None) -> Message | None:
            if raw is None:
                return None
            try:
                return request_class.FromString(raw)
            except DecodeError:
                raise InvalidArgument(f"{method.full_name}: the request is not a valid {method.input_type.full_name}") from None

        if not method.client_streaming and not method.server_streaming:

            async def unary_unary(raw: bytes, context: AioContext) -> bytes:
                hosts, pass_on_full = await self._route(method, parse(raw), context)
                tried = hosts if pass_on_full else hosts[:1]
                for host in tried[:-1]:
                    try:
                        return await self._unary(host, path, raw, context)
                    except grpc.aio.AioRpcError as error:
                        if not is_host_full(error):
                            raise
                        log.info("host %s has no room for %s: trying the next", host.id, method.name)
                return await self._unary(tried[-1], path, raw, context)

            return grpc.unary_unary_rpc_method_handler(unary_unary)

        if not method.client_streaming:

            async def unary_stream(raw: bytes, context: AioContext) -> AsyncIterator[bytes]:
                hosts, _ = await self._route(method, parse(raw), context)
                method_call: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = self.channel(hosts[0].address).unary_stream(path)
                call = method_call(raw, metadata=_forwarded_metadata(context), timeout=context.time_remaining())
                try:
                    async for answer in call:
                        yield answer
                finally:
                    call.cancel()

            return grpc.unary_stream_rpc_method_handler(unary_stream)

        async def opened(requests: AsyncIterator[bytes], context: AioContext) -> tuple[str, AsyncIterator[bytes]]:
            """The host the first message names, and the caller's messages to send it, the first one again."""
            first = await anext(aiter(requests), None)
            hosts, _ = await self._route(method, parse(first), context)

            async def again() -> AsyncIterator[bytes]:
                if first is None:
                    return
                yield first
                async for item in requests:
                    yield item

            return hosts[0].address, again()

        if not method.server_streaming:

            async def stream_unary(requests: AsyncIterator[bytes], context: AioContext) -> bytes:
                address, forwarded = await opened(requests, context)
                method_call: grpc.aio.StreamUnaryMultiCallable[bytes, bytes] = self.channel(address).stream_unary(path)
                answer: bytes = await method_call(forwarded, metadata=_forwarded_metadata(context), timeout=context.time_remaining())
                return answer

            return grpc.stream_unary_rpc_method_handler(stream_unary)

        async def stream_stream(requests: AsyncIterator[bytes], context: AioContext) -> AsyncIterator[bytes]:
            address, forwarded = await opened(requests, context)
            method_call: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = self.channel(address).stream_stream(path)
            call = method_call(forwarded, metadata=_forwarded_metadata(context), timeout=context.time_remaining())
            try:
                async for answer in call:
                    yield answer
            finally:
                call.cancel()

        return grpc.stream_stream_rpc_method_handler(stream_stream)


def forwarded_names() -> list[str]:
    return [service.full_name for service in FORWARDED]

"""Domains: NAME.<VERS_DOMAIN_SUFFIX> reaches a port of a VM through the gateway (HTTP and WebSocket).

The domain RPCs act for the caller's org like every other call. ProxyDomain is the gateway's: it is
public (the interceptor asks for no key), because a public domain is reached by anyone; for a private
one it checks the caller's key here, against the domain's org, with the resolver the interceptor uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import AsyncIterator

import grpc

from services.common.auth import TokenResolver, bearer_token
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, Unauthenticated, Unavailable
from services.common.names import normalize_host, normalize_suffix
from services.common.timestamps import to_timestamp
from services.orchestrator import tunnel
from services.orchestrator.engine import Engine
from services.orchestrator.models import DomainRow
from services.orchestrator.store import OrchestratorStore
from vers.orchestrator.v1 import orchestrator_pb2 as pb
from vers.orchestrator.v1 import orchestrator_pb2_grpc

DEFAULT_PORT = 80
# After the guest has closed a connection, how long the call waits for the gateway to end its side.
CLOSE_GRACE_SECONDS = 30.0
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def domain_pb(domain: DomainRow) -> pb.Domain:
    return pb.Domain(
        domain_id=domain.id, domain=domain.name, vm_id=domain.vm_id, created_at=to_timestamp(domain.created_at),
        port=domain.port, is_public=domain.is_public,
    )  # fmt: skip


# Names a user could take for the platform's own.
RESERVED_NAMES = frozenset({"api", "www", "admin", "app", "console", "dashboard", "docs", "status", "mail", "vers", "login", "auth"})


class Domains:
    """The domain RPCs of OrchestratorService, for one org at a time."""

    def __init__(self, store: OrchestratorStore, suffix: str, max_per_org: int) -> None:
        self.store = store
        self.suffix = normalize_suffix(suffix)
        self.max_per_org = max_per_org

    def full_name(self, requested: str) -> str:
        """NAME or NAME.<suffix> -> NAME.<suffix>; DNS is case-blind, so names are kept in lowercase."""
        name = requested.strip().lower().rstrip(".")
        label = name.removesuffix(f".{self.suffix}")
        if label in RESERVED_NAMES:
            raise InvalidArgument(f"domain {requested!r} is reserved for the platform: choose another name")
        if label[2:4] == "--":
            raise InvalidArgument(
                f"domain {requested!r}: names with '--' in the third and fourth place (punycode, xn--) are refused, "
                f"so that no name can pass for another"
            )
        if _LABEL.fullmatch(label):
            return f"{label}.{self.suffix}"
        if not label:
            problem = "is empty"
        elif "." in label:
            problem = "has more than one label"
        elif len(label) > 63:
            problem = f"is {len(label)} characters long"
        elif label.startswith("-") or label.endswith("-"):
            problem = "starts or ends with '-'"
        else:
            problem = "contains " + ", ".join(repr(c) for c in sorted({c for c in label if not re.fullmatch(r"[a-z0-9-]", c)}))
        raise InvalidArgument(
            f"domain {requested!r} {problem}: give NAME or NAME.{self.suffix}, NAME being 1-63 characters of a-z, 0-9 "
            f"and '-', not starting or ending with '-'"
        )

    async def create(self, org_id: str, request: pb.CreateDomainRequest) -> DomainRow:
        name = self.full_name(request.domain)
        if not request.vm_id:
            raise InvalidArgument('vm_id is required: the VM the domain leads to, e.g. {"domain": "my-app", "vm_id": "<uuid>"}')
        port = request.port or DEFAULT_PORT
        if not 1 <= port <= 65535:
            raise InvalidArgument(f"port must be between 1 and 65535 (80 when left out), not {port}")
        vm = await self.store.get_vm(org_id, request.vm_id)
        if not vm.network:
            raise FailedPrecondition(f"VM {vm.id} was made before VMs had a network card: a domain cannot reach it; use a new VM")
        domain = DomainRow(id=str(uuid.uuid4()), name=name, org_id=org_id, vm_id=vm.id, port=port, is_public=request.is_public)
        return await self.store.add_domain(domain, self.max_per_org)

    async def list(self, org_id: str, vm_id: str, offset: int = 0, limit: int | None = None) -> list[DomainRow]:
        return await self.store.list_domains(org_id, vm_id, offset, limit)

    async def get(self, org_id: str, domain_id: str) -> DomainRow:
        return await self.store.get_domain(org_id, domain_id)

    async def delete(self, org_id: str, domain_id: str) -> DomainRow:
        return await self.store.delete_domain(org_id, domain_id)


class DomainProxyServicer(orchestrator_pb2_grpc.OrchestratorEdgeServiceServicer):
    """One connection of the gateway, for one request to a domain, to the domain's VM port."""

    def __init__(self, engine: Engine, store: OrchestratorStore, resolver: TokenResolver, suffix: str) -> None:
        self.engine = engine
        self.store = store
        self.resolver = resolver
        self.suffix = normalize_suffix(suffix)

    async def _domain(self, host: str, context: grpc.aio.ServicerContext) -> DomainRow:
        """The domain the Host names, if the caller may use it. Another org's private domain is not found, as
        anything of another org is; only a private domain of which the caller sent no key says so."""
        name = normalize_host(host)
        domain = await self.store.domain_named(name) if name.endswith(f".{self.suffix}") else None
        missing = NotFound(f"domain {name!r} not found: no domain of that name exists, or it belongs to another organization")
        if domain is None:
            raise missing
        if not domain.is_public:
            token = bearer_token(context.invocation_metadata())
            if not token:
                raise Unauthenticated(
                    f"domain {name!r} is private: send the header 'Authorization: Bearer <key>' with a key of the "
                    f"organization that owns it, or make it public"
                )
            principal = await self.resolver.resolve(token)
            if principal.org_id != domain.org_id:
                raise missing
        return domain

    async def ProxyDomain(
        self, request_iterator: AsyncIterator[pb.ProxyDomainRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ProxyDomainResponse]:
        """The first answer is empty: the connection to the VM's port is open. When the guest closes it, an
        empty answer says so, and the call ends once the caller has ended its side (or after CLOSE_GRACE):
        a call that ended while the caller was still writing would reach it as INTERNAL (grpc's client puts
        its failed write in place of the call's status), losing the answer and its status. A guest that
        closes without a byte of answer ends the call UNAVAILABLE (no server on that port: 502)."""
        first = await anext(aiter(request_iterator), None)
        if first is None or not first.host:
            raise InvalidArgument("the first message of ProxyDomain names the domain: {host}")
        domain = await self._domain(first.host, context)
        vm = await self.store.find_vm(domain.org_id, domain.vm_id)
        if vm is None:
            raise NotFound(f"domain {domain.name!r} not found: its VM is gone")
        answered = False
        requests = _Requests(request_iterator)
        try:
            async with self.engine.connect_port(vm, domain.port) as (reader, writer):
                yield pb.ProxyDomainResponse()
                try:
                    async for data in tunnel.pipe(first.data, requests.messages(), reader, writer):
                        answered = True
                        yield pb.ProxyDomainResponse(data=data)
                except OSError:
                    pass  # the guest reset the connection: closed, as far as the caller is concerned
            yield pb.ProxyDomainResponse()
            await requests.drain(CLOSE_GRACE_SECONDS)
        finally:
            requests.close()
        if not answered:
            raise Unavailable(
                f"nothing answered on port {domain.port} of VM {vm.id} (domain {domain.name}): start a server listening "
                f"on that port in the VM, or point the domain at the right port"
            )


class _Requests:
    """The caller's messages, read by a task of their own: tunnel.pipe cancels its reads when the guest closes,
    and the messages the caller still sends after that must be read (and dropped) until it ends its side."""

    def __init__(self, requests: AsyncIterator[pb.ProxyDomainRequest]) -> None:
        # One message ahead, so backpressure stays; None once the caller has ended its side.
        self._queue: asyncio.Queue[pb.ProxyDomainRequest | None] = asyncio.Queue(maxsize=1)
        self._draining = False
        self._task = asyncio.ensure_future(self._pump(requests))
        self._task.add_done_callback(lambda task: task.cancelled() or task.exception())

    async def _pump(self, requests: AsyncIterator[pb.ProxyDomainRequest]) -> None:
        with contextlib.suppress(Exception):  # a broken request stream ends as a finished one does
            async for message in requests:
                if not self._draining:
                    await self._queue.put(message)
        if not self._draining:
            await self._queue.put(None)

    async def messages(self) -> AsyncIterator[pb.ProxyDomainRequest]:
        while (message := await self._queue.get()) is not None:
            yield message

    async def drain(self, timeout: float) -> None:
        """Drop what comes from now on; return when the caller has ended its side, or after `timeout`."""
        self._draining = True
        while not self._queue.empty():
            self._queue.get_nowait()  # frees the pump if it waits to put
        with contextlib.suppress(asyncio.TimeoutError, Exception):
            await asyncio.wait_for(asyncio.shield(self._task), timeout)

    def close(self) -> None:
        self._task.cancel()

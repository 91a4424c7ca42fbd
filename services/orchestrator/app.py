from __future__ import annotations

import asyncio
import contextlib

import grpc

from services.common.db import Database
from services.common.errors import Conflict, Unavailable
from services.common.migrations import migrate
from services.common.peers import Peers
from services.common.server import Service
from services.common.settings import Settings
from services.orchestrator.domains import DomainProxyServicer, Domains
from services.orchestrator.engine import Engine, ReserveDeletion
from services.orchestrator.hosts import HostAgent, HostRegistryServicer, HostsServicer, HostTable
from services.orchestrator.images_api import ImageCatalog, ImagesServicer
from services.orchestrator.router import Router
from services.orchestrator.servicer import OrchestratorInternalServicer, OrchestratorServicer
from services.orchestrator.store import OrchestratorStore
from vers.orchestrator.v1 import hosts_pb2, hosts_pb2_grpc, images_pb2, images_pb2_grpc, orchestrator_pb2, orchestrator_pb2_grpc
from vers.tagging.v1 import tagging_pb2, tagging_pb2_grpc


def _deletion_reserver(peers: Peers) -> ReserveDeletion:
    """Asks the tagging service, as the org, to refuse tags to a commit being deleted (Conflict when tagged)."""
    tagging = tagging_pb2_grpc.TaggingInternalServiceStub(peers.channel("tagging"))

    async def reserve(org_id: str, commit_id: str) -> None:
        try:
            await tagging.ReserveCommitDeletion(
                tagging_pb2.ReserveCommitDeletionRequest(commit_id=commit_id), metadata=peers.credential.metadata(org_id), timeout=30
            )
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.ABORTED:
                raise Conflict(error.details() or f"commit {commit_id} is still tagged") from None
            raise Unavailable(f"cannot ask the tagging service whether commit {commit_id} is tagged: {error.code().name}") from None

    return reserve


SERVICE_NAMES = [
    *(
        orchestrator_pb2.DESCRIPTOR.services_by_name[name].full_name
        for name in ("OrchestratorService", "OrchestratorInternalService", "OrchestratorEdgeService")
    ),
    images_pb2.DESCRIPTOR.services_by_name["ImagesService"].full_name,
]
HOSTS = hosts_pb2.DESCRIPTOR.services_by_name["HostsService"].full_name
HOST_REGISTRY = hosts_pb2.DESCRIPTOR.services_by_name["HostRegistryInternalService"].full_name
HOST_AGENT = hosts_pb2.DESCRIPTOR.services_by_name["HostAgentInternalService"].full_name


async def build(settings: Settings) -> Service:
    """The orchestrator in its role (VERS_ORCHESTRATOR_ROLE): the API and the VMs in one process ("all"), the
    API of several hosts ("api"), or one of those hosts ("host")."""
    check_role(settings)
    if settings.orchestrator_role == "api":
        return await build_api(settings)
    return await build_engine(settings)


def check_role(settings: Settings) -> None:
    """The API and the host agents of several hosts share what one orchestrator keeps in its data folder: a
    role that would not is refused at start, saying what to set, instead of failing later in ways that look
    like corruption (a commit missing on another host, a key that does not match)."""
    role = settings.orchestrator_role
    if role == "all":
        return
    needed = {
        "ORCHESTRATOR_DATABASE_URL": (settings.orchestrator_database_url, "the database every API replica and host agent shares"),
        "VERS_SERVICE_SECRET": (settings.service_secret, "the secret the services sign their calls to each other with"),
    }
    if role == "host":
        needed["VERS_COMMIT_STORE"] = (str(settings.commit_store_path or ""), "a folder every host mounts at the same path (NFS, CephFS)")
        needed["VERS_ENV_VARS_KEY"] = (settings.env_vars_key, "the key organizations' environment variables are encrypted with")
    missing = [f"{name} ({why})" for name, (value, why) in needed.items() if not value]
    if missing:
        raise RuntimeError(f"VERS_ORCHESTRATOR_ROLE={role} needs what every host shares; set {'; '.join(missing)}")


async def _database(settings: Settings) -> Database:
    db = Database(settings.database_url("orchestrator"))
    await migrate(db, "orchestrator")
    return db


async def build_api(settings: Settings) -> Service:
    """No engine and no VM: every call of the orchestrator's services goes to a host agent (router.py), and
    the host agents' heartbeats come here."""
    db = await _database(settings)
    store = OrchestratorStore(db, settings.org_max_vcpus, settings.org_max_memory_mib)
    peers = Peers(settings)
    table = HostTable(db, settings.host_dead_seconds)
    router = Router(settings, store, table)
    watch = asyncio.create_task(table.watch(settings.host_heartbeat_seconds))

    async def stop_watching() -> None:
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch

    def register(server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers(router.handlers())
        hosts_pb2_grpc.add_HostRegistryInternalServiceServicer_to_server(HostRegistryServicer(table, settings), server)
        hosts_pb2_grpc.add_HostsServiceServicer_to_server(HostsServicer(table), server)

    return Service(
        name="orchestrator",
        service_names=[*SERVICE_NAMES, HOSTS, HOST_REGISTRY],
        register=register,
        resolver=peers.resolver,
        on_close=[db.close, peers.close, router.close, stop_watching],  # run last to first
    )


async def build_engine(settings: Settings) -> Service:
    host = settings.orchestrator_role == "host"
    db = await _database(settings)
    store = OrchestratorStore(db, settings.org_max_vcpus, settings.org_max_memory_mib, host_id=settings.host_name if host else "")
    engine = Engine(settings, store)
    engine.env_vars.check_key()
    peers = Peers(settings)
    engine.reserve_deletion = _deletion_reserver(peers)
    await engine.start()
    images = ImageCatalog(db, settings)
    await images.start()
    engine.image_lookup = images.lookup
    domains = Domains(store, settings.domain_suffix, settings.org_max_domains)
    servicer = OrchestratorServicer(engine, store, peers.channel("tagging"), peers.credential, domains)
    internal = OrchestratorInternalServicer(engine, store)
    # The gateway's connections to domains: keys of private ones are checked as the interceptor checks any.
    edge = DomainProxyServicer(engine, store, peers.resolver, settings.domain_suffix)
    # A host agent tells the API it is alive; a single-host orchestrator writes its own row (`vers admin hosts`).
    address = settings.host_addr if host else settings.orchestrator_addr
    agent = HostAgent(settings, address, engine.room, lambda: engine.accel, engine.reconcile_host if host else None)
    table = None if host else HostTable(db, settings.host_dead_seconds)
    if table is None:
        agent.start(agent.to_api(peers.credential))
    else:
        agent.start(table.beat)

    def register(server: grpc.aio.Server) -> None:
        orchestrator_pb2_grpc.add_OrchestratorServiceServicer_to_server(servicer, server)
        orchestrator_pb2_grpc.add_OrchestratorInternalServiceServicer_to_server(internal, server)
        orchestrator_pb2_grpc.add_OrchestratorEdgeServiceServicer_to_server(edge, server)
        images_pb2_grpc.add_ImagesServiceServicer_to_server(ImagesServicer(images), server)
        if table is None:
            hosts_pb2_grpc.add_HostAgentInternalServiceServicer_to_server(agent, server)
        else:
            hosts_pb2_grpc.add_HostsServiceServicer_to_server(HostsServicer(table), server)

    return Service(
        name="orchestrator",
        service_names=[*SERVICE_NAMES, HOST_AGENT if table is None else HOSTS],
        register=register,
        resolver=peers.resolver,
        # run last to first: the heartbeats stop first (the API stops hearing from a host that is going)
        on_close=[db.close, peers.close, engine.close, images.close, internal.close, agent.close],
    )

from __future__ import annotations

import grpc

from services.common.audit import create_audit_table
from services.common.db import Database
from services.common.errors import Conflict, Unavailable
from services.common.peers import Peers
from services.common.server import Service
from services.common.settings import Settings
from services.orchestrator.domains import DomainProxyServicer, Domains
from services.orchestrator.engine import Engine, ReserveDeletion
from services.orchestrator.images_api import IMAGE_TABLES, ImageCatalog, ImagesServicer
from services.orchestrator.models import TABLES
from services.orchestrator.servicer import OrchestratorInternalServicer, OrchestratorServicer
from services.orchestrator.store import OrchestratorStore
from vers.orchestrator.v1 import images_pb2, images_pb2_grpc, orchestrator_pb2, orchestrator_pb2_grpc
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


async def build(settings: Settings) -> Service:
    db = Database(settings.database_url("orchestrator"))
    await db.create_tables([*TABLES, *IMAGE_TABLES])
    await create_audit_table(db)  # commit deletions are recorded in the transaction that makes them
    store = OrchestratorStore(db, settings.org_max_vcpus, settings.org_max_memory_mib)
    engine = Engine(settings, store)
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

    def register(server: grpc.aio.Server) -> None:
        orchestrator_pb2_grpc.add_OrchestratorServiceServicer_to_server(servicer, server)
        orchestrator_pb2_grpc.add_OrchestratorInternalServiceServicer_to_server(internal, server)
        orchestrator_pb2_grpc.add_OrchestratorEdgeServiceServicer_to_server(edge, server)
        images_pb2_grpc.add_ImagesServiceServicer_to_server(ImagesServicer(images), server)

    return Service(
        name="orchestrator",
        service_names=[
            orchestrator_pb2.DESCRIPTOR.services_by_name[name].full_name
            for name in ("OrchestratorService", "OrchestratorInternalService", "OrchestratorEdgeService")
        ]
        + [images_pb2.DESCRIPTOR.services_by_name["ImagesService"].full_name],
        register=register,
        resolver=peers.resolver,
        on_close=[db.close, peers.close, engine.close, images.close, internal.close],  # run last to first
    )

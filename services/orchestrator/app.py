from __future__ import annotations

from services.common.db import Database
from services.common.peers import Peers
from services.common.server import Service
from services.common.settings import Settings
from services.orchestrator.engine import Engine
from services.orchestrator.models import TABLES
from services.orchestrator.servicer import OrchestratorServicer
from services.orchestrator.store import OrchestratorStore
from vers.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc


async def build(settings: Settings) -> Service:
    db = Database(settings.database_url("orchestrator"))
    await db.create_tables(TABLES)
    store = OrchestratorStore(db, settings.org_max_vcpus, settings.org_max_memory_mib)
    engine = Engine(settings, store)
    await engine.start()
    peers = Peers(settings)
    servicer = OrchestratorServicer(engine, store, peers.channel("tagging"))
    return Service(
        name="orchestrator",
        service_names=[orchestrator_pb2.DESCRIPTOR.services_by_name["OrchestratorService"].full_name],
        register=lambda server: orchestrator_pb2_grpc.add_OrchestratorServiceServicer_to_server(servicer, server),
        resolver=peers.resolver,
        on_close=[db.close, peers.close, engine.close],
    )

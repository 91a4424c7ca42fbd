from __future__ import annotations

from services.common.peers import Peers
from services.common.server import Service
from services.common.settings import Settings
from vers.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc


class OrchestratorServicer(orchestrator_pb2_grpc.OrchestratorServiceServicer):
    """Every method answers UNIMPLEMENTED until the VM engine lands (see README)."""


async def build(settings: Settings) -> Service:
    peers = Peers(settings)
    servicer = OrchestratorServicer()
    return Service(
        name="orchestrator",
        service_names=[orchestrator_pb2.DESCRIPTOR.services_by_name["OrchestratorService"].full_name],
        register=lambda server: orchestrator_pb2_grpc.add_OrchestratorServiceServicer_to_server(servicer, server),
        resolver=peers.resolver,
        on_close=[peers.close],
    )

from __future__ import annotations

from services.common.peers import Peers
from services.common.server import Service
from services.common.settings import Settings
from vers.tagging.v1 import tagging_pb2, tagging_pb2_grpc


class TaggingServicer(tagging_pb2_grpc.TaggingServiceServicer):
    """Every method answers UNIMPLEMENTED until the tagging store lands (see README)."""


async def build(settings: Settings) -> Service:
    peers = Peers(settings)
    servicer = TaggingServicer()
    return Service(
        name="tagging",
        service_names=[tagging_pb2.DESCRIPTOR.services_by_name["TaggingService"].full_name],
        register=lambda server: tagging_pb2_grpc.add_TaggingServiceServicer_to_server(servicer, server),
        resolver=peers.resolver,
        on_close=[peers.close],
    )

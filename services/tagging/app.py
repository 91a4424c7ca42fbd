from __future__ import annotations

from services.common.db import Database
from services.common.peers import Peers
from services.common.server import Service
from services.common.settings import Settings
from services.tagging.models import TABLES
from services.tagging.servicer import TaggingServicer
from services.tagging.store import TaggingStore
from vers.tagging.v1 import tagging_pb2, tagging_pb2_grpc


async def build(settings: Settings) -> Service:
    db = Database(settings.database_url("tagging"))
    await db.create_tables(TABLES)
    peers = Peers(settings)
    servicer = TaggingServicer(TaggingStore(db), peers.channel("registry"), peers.channel("orchestrator"))
    return Service(
        name="tagging",
        service_names=[tagging_pb2.DESCRIPTOR.services_by_name["TaggingService"].full_name],
        register=lambda server: tagging_pb2_grpc.add_TaggingServiceServicer_to_server(servicer, server),
        resolver=peers.resolver,
        on_close=[db.close, peers.close],
    )

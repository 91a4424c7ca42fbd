from __future__ import annotations

import grpc

from services.common.db import Database
from services.common.migrations import migrate
from services.common.peers import Peers
from services.common.quotas import OrgLimits
from services.common.server import Service
from services.common.settings import Settings
from services.tagging.repositories import RecentRepositories
from services.tagging.servicer import TaggingInternalServicer, TaggingServicer
from services.tagging.store import TaggingStore
from vers.tagging.v1 import tagging_pb2, tagging_pb2_grpc


async def build(settings: Settings) -> Service:
    db = Database(settings.database_url("tagging"))
    await migrate(db, "tagging")
    peers = Peers(settings)
    store = TaggingStore(db, OrgLimits.defaults(settings), settings.tag_history_max_events)
    repositories = RecentRepositories(settings.repository_cache_seconds)
    servicer = TaggingServicer(store, peers.channel("registry"), peers.channel("orchestrator"), repositories)
    internal = TaggingInternalServicer(store, peers.channel("registry"), repositories)

    def register(server: grpc.aio.Server) -> None:
        tagging_pb2_grpc.add_TaggingServiceServicer_to_server(servicer, server)
        tagging_pb2_grpc.add_TaggingInternalServiceServicer_to_server(internal, server)

    return Service(
        name="tagging",
        service_names=[tagging_pb2.DESCRIPTOR.services_by_name[name].full_name for name in ("TaggingService", "TaggingInternalService")],
        register=register,
        resolver=peers.resolver,
        on_close=[db.close, peers.close],
    )

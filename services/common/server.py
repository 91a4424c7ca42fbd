"""One `serve()` for every service: grpc.aio, interceptors, health, reflection, graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.auth import TokenResolver
from services.common.interceptor import ServiceInterceptor
from services.common.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Service:
    """What one service process serves; built by each service's `build(settings)`."""

    name: str
    service_names: Sequence[str]
    register: Callable[[grpc.aio.Server], None]
    resolver: TokenResolver
    on_close: list[Callable[[], Awaitable[None]]] = field(default_factory=list)


class RunningService:
    def __init__(self, service: Service, server: grpc.aio.Server, health_servicer, port: int) -> None:  # type: ignore[no-untyped-def]
        self.service = service
        self.server = server
        self.health = health_servicer
        self.port = port

    async def stop(self, grace: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        for close in reversed(self.service.on_close):
            await close()


async def start(service: Service, listen_addr: str) -> RunningService:
    server = grpc.aio.server(interceptors=[ServiceInterceptor(service.resolver)])
    service.register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*service.service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )
    port = server.add_insecure_port(listen_addr)
    if not port:
        raise OSError(f"{service.name}: cannot listen on {listen_addr}")
    await server.start()
    for name in ("", *service.service_names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("%s listening on port %d", service.name, port)
    return RunningService(service, server, health_servicer, port)


async def serve(build: Callable[[Settings], Awaitable[Service]], name: str, settings: Settings) -> None:
    """Run one service until SIGTERM or SIGINT, then let in-flight calls finish within the grace period."""
    logging.basicConfig(level=settings.log_level, format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s")
    running = await start(await build(settings), settings.listen_addr(name))
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    log.info("%s stopping", name)
    await running.stop(settings.shutdown_grace_seconds)

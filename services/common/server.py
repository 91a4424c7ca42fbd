"""One `serve()` for every service: grpc.aio, interceptors, health, reflection, graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.auth import TokenResolver
from services.common.interceptor import ServiceInterceptor
from services.common.peers import message_size_options
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
    def __init__(self, service: Service, server: grpc.aio.Server, health_servicer: health.aio.HealthServicer, port: int) -> None:
        self.service = service
        self.server = server
        self.health = health_servicer
        self.port = port

    async def stop(self, grace: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        for close in reversed(self.service.on_close):
            await close()


# Files the platform makes (databases, keys, VM disks, sockets) are its own unless it says otherwise.
PROCESS_UMASK = 0o077


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS from VERS_GRPC_TLS_CERT_FILE and VERS_GRPC_TLS_KEY_FILE; None (plain TCP) when they are empty."""
    if not settings.grpc_tls_cert_file:
        return None
    with open(settings.grpc_tls_key_file, "rb") as key, open(settings.grpc_tls_cert_file, "rb") as cert:
        return grpc.ssl_server_credentials([(key.read(), cert.read())])


async def start(service: Service, listen_addr: str, settings: Settings | None = None) -> RunningService:
    """Serve `service` on `listen_addr`; TLS and message sizes from `settings` (the defaults when None)."""
    settings = settings or Settings.model_construct()
    server = grpc.aio.server(interceptors=[ServiceInterceptor(service.resolver)], options=message_size_options(settings))
    service.register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*service.service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )
    credentials = server_credentials(settings)
    port = server.add_insecure_port(listen_addr) if credentials is None else server.add_secure_port(listen_addr, credentials)
    if not port:
        raise OSError(f"{service.name}: cannot listen on {listen_addr}")
    await server.start()
    for name in ("", *service.service_names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("%s listening on port %d%s", service.name, port, "" if credentials is None else " (TLS)")
    return RunningService(service, server, health_servicer, port)


async def serve(build: Callable[[Settings], Awaitable[Service]], name: str, settings: Settings) -> None:
    """Run one service until SIGTERM or SIGINT, then let in-flight calls finish within the grace period."""
    os.umask(PROCESS_UMASK)
    logging.basicConfig(level=settings.log_level, format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s")
    running = await start(await build(settings), settings.listen_addr(name), settings)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    log.info("%s stopping", name)
    await running.stop(settings.shutdown_grace_seconds)

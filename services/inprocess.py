"""The whole platform in one event loop: the three services on their addresses and the gateway on a real
socket. Used by the test suite and the benchmarks; `make run` starts separate processes instead."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field

import uvicorn

from services.common.server import RunningService, start
from services.common.settings import SERVICES, Settings
from services.gateway.app import UVICORN_WS, create_app
from services.orchestrator.app import build as build_orchestrator
from services.registry.app import build as build_registry
from services.tagging.app import build as build_tagging

BUILDERS = {"registry": build_registry, "tagging": build_tagging, "orchestrator": build_orchestrator}


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


@dataclass
class InProcessPlatform:
    settings: Settings
    url: str = ""
    running: dict[str, RunningService] = field(default_factory=dict)
    _server: uvicorn.Server | None = None
    _task: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, settings: Settings) -> InProcessPlatform:
        addresses = {f"{name}_addr": f"127.0.0.1:{port}" for name, port in zip(SERVICES, free_ports(len(SERVICES)), strict=True)}
        platform = cls(settings.model_copy(update=addresses))
        for name in SERVICES:
            platform.running[name] = await start(await BUILDERS[name](platform.settings), platform.settings.addr(name), platform.settings)
        # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets that say so, and without it
        # every keep-alive response waits ~40 ms for a delayed ACK.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.bind(("127.0.0.1", 0))
        settings = platform.settings
        config = uvicorn.Config(
            create_app(settings),
            log_level="warning",
            lifespan="on",
            ws=UVICORN_WS,
            ssl_certfile=settings.http_tls_cert_file or None,
            ssl_keyfile=settings.http_tls_key_file or None,
        )
        platform._server = uvicorn.Server(config)
        platform._task = asyncio.create_task(platform._server.serve(sockets=[sock]))
        while not platform._server.started:
            if platform._task.done():
                platform._task.result()
            await asyncio.sleep(0.01)
        scheme = "https" if settings.http_tls_cert_file else "http"
        platform.url = f"{scheme}://127.0.0.1:{sock.getsockname()[1]}"
        return platform

    async def restart(self, service: str) -> None:
        """Stop one service and start it again on the same address, data and VMs."""
        await self.running[service].stop(0)
        self.running[service] = await start(await BUILDERS[service](self.settings), self.settings.addr(service), self.settings)

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task
        for service in reversed(list(self.running.values())):
            await service.stop(0)

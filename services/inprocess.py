"""The whole platform in one event loop: the three services on their addresses and the gateway on a real
socket. Used by the test suite and the benchmarks; `make run` starts separate processes instead."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn

from services.common.server import RunningService, start
from services.common.settings import SERVICES, Settings
from services.gateway.app import UVICORN_HTTP, UVICORN_WS, create_app
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
            http=UVICORN_HTTP,
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


@dataclass
class HostAgentProcess:
    """A host agent beside an in-process platform whose orchestrator is the API of several hosts (its settings'
    orchestrator_role "api"): `python -m services.orchestrator` in the host role, a process of its own with
    its own data and run folders, sharing the API's database, service secret and commit store."""

    name: str
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None

    @classmethod
    def beside(cls, api: Settings, name: str, data_dir: Path, **settings: str) -> HostAgentProcess:
        """An agent of the platform whose settings are `api`; `settings` are more variables (VERS_*) for it."""
        (port,) = free_ports(1)
        env = {
            **os.environ,
            "VERS_ORCHESTRATOR_ROLE": "host",
            "VERS_HOST_ID": name,
            "VERS_HOST_ADDR": f"127.0.0.1:{port}",
            "VERS_DATA_DIR": str(data_dir),
            "VERS_IMAGES_DIR": str(api.image_root),
            "ORCHESTRATOR_DATABASE_URL": api.database_url("orchestrator"),
            "REGISTRY_ADDR": api.registry_addr,
            "TAGGING_ADDR": api.tagging_addr,
            "ORCHESTRATOR_ADDR": api.orchestrator_addr,
            "VERS_SERVICE_SECRET": api.service_secret,
            "VERS_ENV_VARS_KEY": api.env_vars_key,
            "VERS_COMMIT_STORE": api.commit_store,
            "VERS_HOST_HEARTBEAT_SECONDS": str(api.host_heartbeat_seconds),
            "VERS_KEEP_VMS_RUNNING": "true",
            "VERS_LOG_LEVEL": "WARNING",
            **settings,
        }
        return cls(name, env)

    @property
    def run_dir(self) -> Path:
        return Settings(data_dir=Path(self.env["VERS_DATA_DIR"])).vm_run_dir

    def start(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "services.orchestrator"], env=self.env)

    def kill(self) -> None:
        """As a machine that fails: the agent ends at once (its VMs' QEMUs are processes of their own)."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)

    def runs(self, vm_id: str) -> bool:
        """Whether the VM's QEMU runs on this host: its pid file is in this host's run folder."""
        return (self.run_dir / vm_id / "qemu.pid").exists()

"""The platform under test: the three services as real grpc.aio servers on port 0, and the REST gateway
served by uvicorn on a real socket, all in this process's event loop."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest_asyncio
import uvicorn

from services.common.server import RunningService, start
from services.common.settings import SERVICES, Settings
from services.gateway.app import create_app
from services.orchestrator.app import build as build_orchestrator
from services.orchestrator.images import build_all
from services.registry.app import build as build_registry
from services.tagging.app import build as build_tagging

BUILDERS = {"registry": build_registry, "tagging": build_tagging, "orchestrator": build_orchestrator}


@dataclass(frozen=True)
class Org:
    name: str
    id: str
    key: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.key}"),)


@dataclass
class Platform:
    settings: Settings
    url: str
    running: dict[str, RunningService] = field(default_factory=dict)

    @property
    def admin_key(self) -> str:
        return self.settings.admin_key_file.read_text().strip()

    def client(self, org: Org | None = None, **headers: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, headers={**(org.auth if org else {}), **headers}, timeout=60)

    async def restart(self, service: str) -> None:
        """Stop one service and start it again on the same address, data and VMs."""
        await self.running[service].stop(0)
        self.running[service] = await start(await BUILDERS[service](self.settings), self.settings.addr(service))

    def vm_pid(self, vm_id: str) -> int:
        return int((self.settings.vm_run_dir / vm_id / "qemu.pid").read_text())

    async def new_org(self, prefix: str = "org") -> Org:
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        async with self.client(Authorization=f"Bearer {self.admin_key}") as http:
            answer = await http.post("/api/v1/admin/orgs", json={"name": name})
        assert answer.status_code == 201, answer.text
        body = answer.json()
        return Org(name=name, id=body["org"]["id"], key=body["token"])


ROOT = Path(__file__).resolve().parent.parent
# `make test` builds the images first (make images); the suite shares that cache.
IMAGES = Path(os.environ.get("VERS_IMAGES_DIR") or ROOT / ".vers" / "images")


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def test_settings(data_dir: Path) -> Settings:
    return Settings(
        data_dir=data_dir, images_dir=str(IMAGES), auth_cache_seconds=0.5, shutdown_grace_seconds=1, accel="auto"
    )


def kill_vms_under(run_dir: Path) -> None:
    """Kill every QEMU whose sockets live in `run_dir` and remove the folder (RAM files live there)."""
    marker = str(run_dir).encode()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if b"qemu-system" in cmdline.read_bytes() and marker in cmdline.read_bytes():
                os.kill(int(cmdline.parent.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue
    shutil.rmtree(run_dir, ignore_errors=True)


async def serve_gateway(settings: Settings) -> tuple[uvicorn.Server, asyncio.Task[None], str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    return server, task, f"http://127.0.0.1:{port}"


@pytest_asyncio.fixture(scope="session")
async def platform(tmp_path_factory) -> AsyncIterator[Platform]:  # type: ignore[no-untyped-def]
    addresses = {f"{name}_addr": f"127.0.0.1:{port}" for name, port in zip(SERVICES, free_ports(len(SERVICES)))}
    settings = test_settings(tmp_path_factory.mktemp("vers-data")).model_copy(update=addresses)
    await asyncio.to_thread(build_all, IMAGES)
    running: dict[str, RunningService] = {}
    for name in SERVICES:
        running[name] = await start(await BUILDERS[name](settings), settings.addr(name))
    server, task, url = await serve_gateway(settings)
    platform = Platform(settings=settings, url=url, running=running)
    yield platform
    server.should_exit = True
    await task
    kill_vms_under(settings.vm_run_dir)
    await asyncio.sleep(0.3)  # let the orchestrator see its VMs exit while the loop still runs
    for service in reversed(list(platform.running.values())):
        await service.stop(0)


@pytest_asyncio.fixture
async def org(platform: Platform) -> Org:
    return await platform.new_org("acme")


@pytest_asyncio.fixture
async def other_org(platform: Platform) -> Org:
    return await platform.new_org("globex")

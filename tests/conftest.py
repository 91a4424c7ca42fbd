"""The platform under test: the three services as real grpc.aio servers on free ports, and the REST
gateway served by uvicorn on a real socket, all in this process's event loop.

Tiers: a test that boots a VM or needs the guest images is marked `vm`, either itself (`pytestmark =
pytest.mark.vm` for a module whose tests all do) or by depending on the `images` fixture (a fixture that
starts a platform for VMs takes it as an argument), which marks it `vm` here. A session that selects any
`vm` test builds the images before its first test; `pytest -m "not vm"` builds none, and the platforms of
such a session have none, so a test that boots a VM without being marked fails at once instead of making
the fast tier slow.
"""

from __future__ import annotations

import os

# The tests fork this process (pexpect's terminals) while its gRPC servers run; each child only execs a program.
# grpc's fork handlers would run in the child before the exec, and there they can print epoll errors onto the
# terminal the test reads, or stop the child. Read by grpc when it is first imported, so set before that.
os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "0"

import asyncio
import shutil
import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from services.common.settings import SERVICES, Settings, get_settings
from services.inprocess import InProcessPlatform, free_ports
from services.orchestrator.images import build_all
from services.orchestrator.network import GuestNetwork
from tests.postgres import TempPostgres

__all__ = ["IMAGES", "ROOT", "Org", "Platform", "discard", "free_ports", "kill_vms_under"]


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


class Platform(InProcessPlatform):
    @property
    def admin_key(self) -> str:
        return self.settings.admin_key_file.read_text().strip()

    def client(self, org: Org | None = None, **headers: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, headers={**(org.auth if org else {}), **headers}, timeout=60)

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
# Where the `images` fixture builds the guest images, a cache kept between runs: the checkout's own, the
# folder `make run` uses with its default data folder, whatever the caller's VERS_DATA_DIR or VERS_IMAGES_DIR.
IMAGES = ROOT / ".vers" / "images"
# The suite's own settings, in the environment of this process and of every platform, `vers` and script
# it starts: no guest's DNS query leaves this machine; the host's disk reserve is tested on platforms of
# its own (test_hostile_guest.py), the suite's keep a small one so that it runs with a few GiB of disk free. No
# pools of booted VMs or waiting QEMU processes (on two cores they would slow every other test): test_pool.py
# starts engines with them.
SUITE_ENVIRONMENT = {
    "VERS_GUEST_DNS": "none",
    "VERS_HOST_RESERVE_DISK_MIB": "256",
    "VERS_ROOT_POOL_SIZE": "0",
    "VERS_BRANCH_POOL_SIZE": "0",
}


def pytest_configure() -> None:
    """The suite runs the same whatever the caller exported (a user of `make run` may have VERS_DATA_DIR,
    VERS_URL or VERS_API_KEY set): every VERS_* variable and every other variable a setting reads is
    removed, the suite's own knobs (VERS_TEST_*) kept, and SUITE_ENVIRONMENT set. VERS_IMAGES_DIR is set
    by the `images` fixture once the images are built."""
    settings_variables = {field.validation_alias for field in Settings.model_fields.values()}
    for name in list(os.environ):
        if (name.startswith("VERS_") and not name.startswith("VERS_TEST_")) or name in settings_variables:
            del os.environ[name]
    os.environ.update(SUITE_ENVIRONMENT)
    get_settings.cache_clear()


@pytest.hookimpl(tryfirst=True)  # before -m selects by marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "images" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.vm)


@pytest.fixture(scope="session")
def images() -> Path:
    """The guest images (kernel, initramfs, root disk), built into IMAGES when missing (a few minutes the
    first time, a second when cached), and named in VERS_IMAGES_DIR for the platforms started from now on."""
    build_all(IMAGES)
    os.environ["VERS_IMAGES_DIR"] = str(IMAGES)
    return IMAGES


@pytest.fixture(scope="session", autouse=True)
def images_for_vm_tests(request: pytest.FixtureRequest) -> None:
    """A session that runs any VM test builds the images before its first test, so every platform it starts
    has them (the shared one picks its accelerator, KVM or TCG, at start by booting one); a session without
    VM tests builds none, and its platforms have none."""
    if any(item.get_closest_marker("vm") for item in request.session.items):
        request.getfixturevalue("images")


def test_settings(data_dir: Path) -> Settings:
    """A platform's settings for the suite; its images are the built ones in a session with VM tests, else the
    data folder's own `images`, empty."""
    return Settings(
        data_dir=data_dir,
        images_dir=os.environ.get("VERS_IMAGES_DIR", ""),
        auth_cache_seconds=0.5,
        shutdown_grace_seconds=1,
        accel="auto",
        keep_vms_running=True,  # a restart in these tests is one under systemd: VMs are adopted, not put to sleep
        guest_dns="none",  # guests' DNS goes nowhere but to a test's own server
        # every test talks from 127.0.0.1 with keys made a moment before: the gateway's limits are tested on
        # platforms of their own (test_gateway_limits.py), not by the suite's pace
        rate_limit_per_second=10_000,
        rate_limit_burst=100_000,
        auth_failures_per_minute=100_000,
        host_reserve_disk_mib=int(SUITE_ENVIRONMENT["VERS_HOST_RESERVE_DISK_MIB"]),
        root_pool_size=int(SUITE_ENVIRONMENT["VERS_ROOT_POOL_SIZE"]),
        branch_pool_size=int(SUITE_ENVIRONMENT["VERS_BRANCH_POOL_SIZE"]),
    )


def kill_vms_under(run_dir: Path) -> None:
    """Kill every QEMU whose sockets live in `run_dir`, remove the folder (RAM files live there) and the
    platform's guest network (namespace, link, rules)."""
    marker = str(run_dir).encode()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if b"qemu-system" in cmdline.read_bytes() and marker in cmdline.read_bytes():
                os.kill(int(cmdline.parent.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue
    shutil.rmtree(run_dir, ignore_errors=True)
    GuestNetwork(run_dir, [], []).teardown()


def discard(folder: Path) -> None:
    """A stopped platform's data folder goes as soon as its tests end: the suite's commits and disks would
    otherwise add up to more than a small machine's disk holds. (VERS_TEST_KEEP_DATA=1 keeps it, to look at.)"""
    if os.environ.get("VERS_TEST_KEEP_DATA") != "1":
        shutil.rmtree(folder, ignore_errors=True)


async def _running(settings: Settings) -> AsyncIterator[Platform]:
    platform = await Platform.start(settings)
    yield platform
    kill_vms_under(platform.settings.vm_run_dir)
    await asyncio.sleep(0.3)  # let the orchestrator see its VMs exit while the loop still runs
    await platform.stop()
    discard(platform.settings.data_dir)


@pytest_asyncio.fixture(scope="session")
async def sqlite_platform(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Platform]:
    """The suite's platform: its databases are SQLite files in its data folder, as `make run`'s are."""
    async for platform in _running(test_settings(tmp_path_factory.mktemp("vers-data"))):
        yield platform


@pytest.fixture(scope="session")
def postgres() -> Iterator[TempPostgres]:
    """The suite's PostgreSQL server, started by the first test that needs it, stopped and removed at the end."""
    server = TempPostgres()
    yield server
    server.stop()


def postgres_urls(server: TempPostgres, prefix: str) -> dict[str, str]:
    """New databases on `server`, one per service, as the settings' *_database_url fields."""
    return {f"{service}_database_url": server.create_database(f"{prefix}_{service}") for service in SERVICES}


@pytest_asyncio.fixture(scope="session")
async def postgres_platform(postgres: TempPostgres, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Platform]:
    """The same platform with its three databases on PostgreSQL."""
    settings = test_settings(tmp_path_factory.mktemp("vers-data-pg")).model_copy(update=postgres_urls(postgres, "suite"))
    async for platform in _running(settings):
        yield platform


# Each backend's platform fixture.
BACKENDS = {"sqlite": "sqlite_platform", "postgresql": "postgres_platform"}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """The tests of a module marked `both_backends` run on each backend's platform."""
    if "platform" in metafunc.fixturenames and metafunc.definition.get_closest_marker("both_backends"):
        metafunc.parametrize("platform", list(BACKENDS), indirect=True, scope="session")


@pytest.fixture(scope="session")
def platform(request: pytest.FixtureRequest) -> Platform:
    """The platform a test runs against: the SQLite one, or in a module marked `both_backends` each in turn.
    Both are started once for the session; this only chooses."""
    return request.getfixturevalue(BACKENDS[getattr(request, "param", "sqlite")])  # type: ignore[no-any-return]


@pytest_asyncio.fixture
async def org(platform: Platform) -> Org:
    return await platform.new_org("acme")


@pytest_asyncio.fixture
async def other_org(platform: Platform) -> Org:
    return await platform.new_org("globex")

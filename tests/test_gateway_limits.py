"""The gateway against a hostile tenant: rate limits, failed authentications, bad tokens remembered,
hostile JSON, body sizes, deadlines. No VMs."""

from __future__ import annotations

import asyncio
import secrets
import socket
from collections.abc import AsyncIterator

import grpc
import httpx
import pytest
import pytest_asyncio
import uvicorn
import websockets

from services.common.peers import DefaultDeadline, open_channel
from services.common.server import start
from services.gateway import limits
from services.gateway.app import UVICORN_WS, create_app
from services.gateway.bindings import all_bindings
from services.gateway.limits import FailureWindow, RecentSet, TokenBuckets, call_timeout
from services.inprocess import BUILDERS
from tests.conftest import Org, Platform, kill_vms_under
from tests.conftest import test_settings as settings_in
from vers.orchestrator.v1 import orchestrator_pb2
from vers.registry.v1 import registry_pb2


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_allows_a_burst_then_refills() -> None:
    clock = Clock()
    buckets = TokenBuckets(rate=2, burst=3, clock=clock)
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a") == pytest.approx(0.5)
    assert buckets.take("b") == 0.0  # every key has its own bucket
    clock.now += 0.5
    assert buckets.take("a") == 0.0
    clock.now += 100
    assert [buckets.take("a") for _ in range(4)][-1] > 0  # refilled up to the burst, no further


def test_tables_forget_the_least_recently_seen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "MAX_TRACKED", 3)
    buckets = TokenBuckets(rate=1, burst=1, clock=Clock())
    for key in "abcd":
        buckets.take(key)
    assert len(buckets._buckets) == 3 and "a" not in buckets._buckets
    remembered = RecentSet(None)
    for key in "abcd":
        remembered.add(key)
    assert "a" not in remembered and "d" in remembered


def test_failures_block_an_address_for_the_rest_of_the_minute() -> None:
    clock = Clock()
    failures = FailureWindow(limit=3, clock=clock)
    for _ in range(2):
        failures.record("10.0.0.1")
        clock.now += 10
    assert failures.blocked_for("10.0.0.1") == 0.0
    failures.record("10.0.0.1")
    assert failures.blocked_for("10.0.0.1") == pytest.approx(40)  # the first failure leaves the window then
    assert failures.blocked_for("10.0.0.2") == 0.0
    clock.now += 40
    assert failures.blocked_for("10.0.0.1") == 0.0


def test_remembered_tokens_expire() -> None:
    clock = Clock()
    refused = RecentSet(30, clock)
    refused.add("t")
    clock.now += 29
    assert "t" in refused
    clock.now += 2
    assert "t" not in refused


def _binding(name: str):  # type: ignore[no-untyped-def]
    return next(b for b in all_bindings() if b.method.name == name)


def test_every_call_has_a_deadline(tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings = settings_in(tmp_path).model_copy(
        update={"rpc_timeout_seconds": 60, "exec_max_timeout_seconds": 3600, "boot_timeout_seconds": 120}
    )
    exec_vm = _binding("ExecVm")
    running = orchestrator_pb2.ExecVmRequest(vm_id="v", timeout_secs=5)
    assert call_timeout(exec_vm, running, settings) == 60 + 5 + 120
    assert call_timeout(exec_vm, orchestrator_pb2.ExecVmRequest(vm_id="v"), settings) == 60 + 3600 + 120
    assert call_timeout(_binding("ListRepositories"), registry_pb2.ListRepositoriesRequest(), settings) == 60
    root = _binding("CreateRootVm")
    assert call_timeout(root, orchestrator_pb2.CreateRootVmRequest(), settings) == 60
    assert call_timeout(root, orchestrator_pb2.CreateRootVmRequest(wait_boot=True), settings) == 180


async def test_peer_calls_without_a_timeout_get_the_platforms() -> None:
    seen = []

    async def continuation(details, request):  # type: ignore[no-untyped-def]
        seen.append(details.timeout)

    interceptor = DefaultDeadline(7.0)
    details = grpc.aio.ClientCallDetails("/x.Y/Z", None, None, None, None)
    await interceptor.intercept_unary_unary(continuation, details, None)
    await interceptor.intercept_unary_unary(continuation, details._replace(timeout=2.0), None)
    assert seen == [7.0, 2.0]


class StuckService:
    """A gRPC server whose every unary method never answers."""

    async def __aenter__(self) -> str:
        async def never(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            await asyncio.sleep(3600)
            return b""

        class Handler(grpc.GenericRpcHandler):
            def service(self, details):  # type: ignore[no-untyped-def]
                return grpc.unary_unary_rpc_method_handler(never)

        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers([Handler()])
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return f"127.0.0.1:{port}"

    async def __aexit__(self, *_exc: object) -> None:
        await self.server.stop(0)


async def test_a_stuck_service_is_504_at_the_gateway_and_deadline_exceeded_between_services(tmp_path) -> None:  # type: ignore[no-untyped-def]
    async with StuckService() as address:
        settings = settings_in(tmp_path).model_copy(
            update={"rpc_timeout_seconds": 0.3, **{f"{name}_addr": address for name in ("registry", "tagging", "orchestrator")}}
        )
        channel = open_channel(settings, address)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await channel.unary_unary("/vers.registry.v1.RegistryService/Authenticate")(b"")
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await channel.close()

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="warning", lifespan="on", ws=UVICORN_WS))
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            await asyncio.sleep(0.01)
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}") as http:
                answer = await http.get("/api/v1/repositories", headers={"Authorization": "Bearer vers_x"})
        finally:
            server.should_exit = True
            await task
    assert answer.status_code == 504
    assert answer.json()["code"] == "DEADLINE_EXCEEDED"
    assert "VERS_RPC_TIMEOUT_SECONDS" in answer.json()["error"]


# A platform of its own, with small limits. Each test talks from a loopback address of its own
# (127.0.0.0/8 is all loopback), so one test's failures do not block the next.
@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def limited(images, tmp_path_factory) -> AsyncIterator[Platform]:  # type: ignore[no-untyped-def]
    settings = settings_in(tmp_path_factory.mktemp("vers-limits")).model_copy(
        update={
            "rate_limit_per_second": 1.0,
            "rate_limit_burst": 5,
            "auth_failures_per_minute": 3,
            "auth_negative_cache_seconds": 30.0,
            "http_max_body_bytes": 6 * 1024 * 1024,
        }
    )
    platform = await Platform.start(settings)
    yield platform  # type: ignore[misc]
    kill_vms_under(platform.settings.vm_run_dir)
    await platform.stop()


def client_from(platform: Platform, address: str, token: str = "") -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    transport = httpx.AsyncHTTPTransport(local_address=address)
    return httpx.AsyncClient(base_url=platform.url, headers=headers, transport=transport, timeout=60)


async def test_a_key_past_its_burst_gets_429_and_another_key_does_not(limited: Platform) -> None:
    first, second = await limited.new_org("burst"), await limited.new_org("calm")
    async with client_from(limited, "127.0.0.3", first.key) as http:
        answers = [await http.get("/api/v1/whoami") for _ in range(9)]
    statuses = [answer.status_code for answer in answers]
    assert statuses[:5] == [200] * 5
    assert 429 in statuses
    refused = answers[statuses.index(429)]
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["code"] == "RESOURCE_EXHAUSTED"
    assert refused.json()["success"] is False
    assert "VERS_RATE_LIMIT_PER_SECOND" in refused.json()["error"]
    assert "VERS_RATE_LIMIT_BURST" in refused.json()["error"]
    async with client_from(limited, "127.0.0.3", second.key) as http:
        assert (await http.get("/api/v1/whoami")).status_code == 200


async def test_failed_authentications_get_an_address_429(limited: Platform) -> None:
    known = await limited.new_org("known")
    async with client_from(limited, "127.0.0.7", known.key) as http:
        assert (await http.get("/api/v1/whoami")).status_code == 200
    failures = []
    for _ in range(3):
        async with client_from(limited, "127.0.0.7", f"vers_{secrets.token_hex(16)}") as http:
            failures.append((await http.get("/api/v1/repositories")).status_code)
    assert failures == [401, 401, 401]

    fresh = await limited.new_org("fresh")  # a good key, but not yet seen from there
    async with client_from(limited, "127.0.0.7", fresh.key) as http:
        refused = await http.get("/api/v1/whoami")
    async with client_from(limited, "127.0.0.7") as http:
        anonymous = await http.get("/api/v1/whoami")
    assert refused.status_code == anonymous.status_code == 429
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert "VERS_AUTH_FAILURES_PER_MINUTE" in refused.json()["error"]
    console = limited.url.replace("http://", "ws://") + "/api/v1/vm/some-vm/console"
    with pytest.raises(websockets.InvalidStatus) as handshake:
        async with websockets.connect(console, additional_headers=fresh.auth, local_addr=("127.0.0.7", 0)):
            pass
    assert handshake.value.response.status_code == 429
    async with client_from(limited, "127.0.0.7", known.key) as http:
        assert (await http.get("/api/v1/whoami")).status_code == 200  # known good: served
    async with client_from(limited, "127.0.0.8", fresh.key) as http:
        assert (await http.get("/api/v1/whoami")).status_code == 200  # other addresses: served


async def test_a_bad_token_is_remembered_without_hiding_a_new_key(limited: Platform) -> None:
    bad = f"vers_{secrets.token_hex(16)}"
    async with client_from(limited, "127.0.0.9", bad) as http:
        assert (await http.get("/api/v1/whoami")).status_code == 401
    org = await limited.new_org("later")
    async with client_from(limited, "127.0.0.9", org.key) as http:
        assert (await http.get("/api/v1/whoami")).status_code == 200

    settings = limited.settings
    await limited.running["registry"].stop(0)
    try:
        # The registry is down: only an answer from the gateway's memory can be a 401.
        async with client_from(limited, "127.0.0.9", bad) as http:
            remembered = await http.get("/api/v1/whoami")
        async with client_from(limited, "127.0.0.9", f"vers_{secrets.token_hex(16)}") as http:
            unknown = await http.get("/api/v1/whoami")
    finally:
        limited.running["registry"] = await start(await BUILDERS["registry"](settings), settings.addr("registry"), settings)
    assert remembered.status_code == 401
    assert remembered.json()["code"] == "UNAUTHENTICATED"
    assert unknown.status_code == 503


async def test_deeply_nested_json_is_400(platform: Platform, org: Org) -> None:
    async with platform.client(org) as http:
        arrays = await http.post("/api/v1/repositories", content=b"[" * 100_000)
        objects = await http.post("/api/v1/repositories", content=b'{"a":' * 70 + b"1" + b"}" * 70)
        closed = await http.post("/api/v1/repositories", content=b"[" * 65 + b"]" * 65)
    for answer in (arrays, objects, closed):
        assert answer.status_code == 400, answer.text
        assert answer.json()["code"] == "INVALID_ARGUMENT"
        assert "64 levels" in answer.json()["error"]


@pytest.mark.parametrize(
    "body",
    [
        b'{"name": {"a": 1}}',
        b'{"name": [1, 2]}',
        b'{"name": "ok", "description": 1e999}',
        b'{"name": "ok", "description": NaN}',
        b'{"name": null, "description": {"x": [[]]}}',
        b'"just a string"',
        b"\xff\xfe",
        b'{"name": "\\ud800"}',
    ],
)
async def test_json_that_does_not_fit_the_request_is_400(platform: Platform, org: Org, body: bytes) -> None:
    async with platform.client(org) as http:
        answer = await http.post("/api/v1/repositories", content=body)
    assert answer.status_code == 400, answer.text
    assert answer.json()["code"] == "INVALID_ARGUMENT"


@pytest.mark.parametrize(
    "body",
    [
        b'{"vm_config": {"vcpu_count": -1e30}}',
        b'{"vm_config": {"vcpu_count": "many"}}',
        b'{"vm_config": 5}',
        b'{"vm_config": {"mem_size_mib": 99999999999999999999999}}',
        b'{"vm_config": {"vcpu_count": 1.5}}',
    ],
)
async def test_vm_fields_that_do_not_fit_are_400(platform: Platform, org: Org, body: bytes) -> None:
    async with platform.client(org) as http:
        answer = await http.post("/api/v1/vm/new_root", content=body)
    assert answer.status_code == 400, answer.text


async def test_a_body_over_the_limit_is_413_naming_the_setting(platform: Platform, org: Org) -> None:
    async with platform.client(org) as http:
        answer = await http.post("/api/v1/keys/validate", json={"api_key": "x" * platform.settings.http_max_body_bytes})
    assert answer.status_code == 413
    assert "VERS_HTTP_MAX_BODY_BYTES" in answer.json()["error"]


async def test_a_body_near_the_limit_reaches_the_service(limited: Platform) -> None:
    limit = limited.settings.http_max_body_bytes
    assert limit > 4 * 1024 * 1024  # beyond gRPC's own default, which alone would refuse this call
    async with client_from(limited, "127.0.0.11") as http:
        answer = await http.post("/api/v1/keys/validate", json={"api_key": "x" * (limit - 100)})
    assert answer.status_code == 200, answer.text[:300]
    assert answer.json()["valid"] is False


async def test_services_accept_what_the_gateway_sends(platform: Platform, org: Org) -> None:
    """Straight to the registry, as the gateway would: a request message near the body limit."""
    channel = open_channel(platform.settings, platform.settings.addr("registry"))
    try:
        validate = channel.unary_unary(
            "/vers.registry.v1.RegistryService/ValidateKey",
            request_serializer=registry_pb2.ValidateKeyRequest.SerializeToString,
            response_deserializer=registry_pb2.ValidateKeyResponse.FromString,
        )
        answer = await validate(registry_pb2.ValidateKeyRequest(api_key="y" * (2 * platform.settings.http_max_body_bytes)))
    finally:
        await channel.close()
    assert answer.valid is False

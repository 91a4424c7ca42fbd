"""Domains: NAME.vers.localhost reaches a port of a real VM through the gateway, by the Host header alone
(HTTP and WebSocket), private ones only with the owning org's key; CRUD over REST and the official SDK."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import pytest_asyncio
import websockets
from vers_sdk import ConflictError, NotFoundError, VersSdkClient
from vers_sdk import models as M

from services.common.errors import InvalidArgument
from services.common.names import normalize_host
from services.orchestrator.domains import Domains
from tests.conftest import Org, Platform

pytestmark = pytest.mark.vm

SUFFIX = "vers.localhost"
WEB_PORT = 80
WS_PORT = 8080
# A WebSocket echo server in busybox sh, for one connection on stdin/stdout (`nc -ll -e`): says "hello",
# answers each text frame (under 126 bytes) with "echo: <text>", and a close with a close. (busybox awk
# reserves the name `xor` without having it: the unmasking's own is `bxor`.)
WS_SERVER = r"""#!/bin/sh
key=""
cr=$(printf '\r')
while IFS= read -r line; do
  line=${line%"$cr"}
  [ -z "$line" ] && break
  case "$line" in [Ss]ec-[Ww]eb[Ss]ocket-[Kk]ey:*) key=$(echo "${line#*:}" | tr -d ' ') ;; esac
done
accept=$(printf '%s258EAFA5-E914-47DA-95CA-C5AB0DC85B11' "$key" | sha1sum | cut -d' ' -f1 | xxd -r -p | base64)
printf 'HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n' "$accept"
frame() { printf "\\201\\$(printf %o ${#1})%s" "$1"; }
frame hello
while :; do
  set -- $(dd bs=1 count=2 2>/dev/null | od -An -tu1)
  [ $# -eq 2 ] || exit 0
  op=$(($1 & 15)) len=$(($2 & 127))
  mask=$(dd bs=1 count=4 2>/dev/null | od -An -tu1)
  data=$(dd bs=1 count=$len 2>/dev/null | od -An -tu1)
  [ $op -eq 8 ] && { printf '\210\000'; exit 0; }
  text=$(echo $mask $data | awk '
    function bxor(a, b,  r, p) { for (p = 1; a || b; p *= 2) { r += (a % 2 != b % 2) * p; a = int(a / 2); b = int(b / 2) } return r }
    { for (i = 5; i <= NF; i++) printf "%c", bxor($i, $((i - 5) % 4 + 1)) }')
  frame "echo: $text"
done
"""
# Echoes a request's body (busybox httpd hands a CGI exactly CONTENT_LENGTH bytes).
ECHO_CGI = """#!/bin/sh
echo "Content-Type: application/octet-stream"
echo
head -c "$CONTENT_LENGTH"
"""


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def sh(http: httpx.AsyncClient, vm_id: str, script: str, **extra: Any) -> str:
    answer = await http.post(f"/api/v1/vm/{vm_id}/exec", json={"command": ["sh", "-c", script], **extra})
    assert answer.status_code == 200, answer.text
    assert answer.json()["exit_code"] == 0, answer.json()
    return str(answer.json()["stdout"])


async def new_vm(http: httpx.AsyncClient) -> str:
    answer = await http.post("/api/v1/vm/new_root?wait_boot=true", json={"vm_config": {"mem_size_mib": 256}})
    assert answer.status_code == 201, answer.text
    return str(answer.json()["vm_id"])


async def create(http: httpx.AsyncClient, domain: str, vm_id: str, **extra: Any) -> dict[str, Any]:
    answer = await http.post("/api/v1/domains", json={"domain": domain, "vm_id": vm_id, **extra})
    assert answer.status_code == 201, answer.text
    return dict(answer.json())


def visit(platform: Platform, name: str, org: Org | None = None) -> httpx.AsyncClient:
    """A client that asks the gateway for NAME.vers.localhost (with the gateway's port, as a browser sends it)."""
    port = platform.url.rsplit(":", 1)[1]
    return httpx.AsyncClient(base_url=platform.url, headers={"Host": f"{name}:{port}", **(org.auth if org else {})}, timeout=60)


async def get_when_listening(client: httpx.AsyncClient, path: str = "/", within: float = 30) -> httpx.Response:
    """The guest's server was started a moment ago: 502 (nothing listening yet) is asked again."""
    deadline = time.monotonic() + within
    while (answer := await client.get(path)).status_code == 502 and time.monotonic() < deadline:
        await asyncio.sleep(0.3)
    return answer


@pytest.mark.parametrize(
    ("host", "name"),
    [("App.Vers.Localhost:8080", "app.vers.localhost"), ("app.vers.localhost.", "app.vers.localhost"), ("[::1]:80", "[::1]")],
)
def test_hosts_read_as_names(host: str, name: str) -> None:
    assert normalize_host(host) == name


def test_names_become_full_names() -> None:
    domains = Domains(store=None, suffix=".Vers.Localhost.", max_per_org=20)  # type: ignore[arg-type]
    assert domains.full_name("My-App") == domains.full_name("my-app.vers.localhost.") == "my-app.vers.localhost"
    assert domains.full_name("a" * 63) == "a" * 63 + ".vers.localhost"
    with pytest.raises(InvalidArgument, match="has more than one label"):
        domains.full_name("a.b.vers.localhost")


@dataclass
class Served:
    org: Org
    http: httpx.AsyncClient
    vm_id: str


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def served(platform: Platform) -> AsyncIterator[Served]:
    """One VM serving HTTP on port 80 (busybox httpd) and a WebSocket echo on 8080, shared by the tests."""
    org = await platform.new_org("domains")
    async with platform.client(org) as http:
        vm_id = await new_vm(http)
        await sh(http, vm_id, "mkdir -p /www/cgi-bin && cat > /www/cgi-bin/echo && chmod +x /www/cgi-bin/echo", stdin=ECHO_CGI)
        await sh(http, vm_id, "echo hi > /www/index.html && httpd -p 80 -h /www")
        await sh(
            http, vm_id, "cat > /root/ws.sh && chmod +x /root/ws.sh && (nc -ll -p 8080 -e /root/ws.sh </dev/null >/dev/null 2>&1 &)",
            stdin=WS_SERVER,
        )  # fmt: skip
        yield Served(org, http, vm_id)


async def test_crud_over_rest(served: Served) -> None:
    http, name = served.http, unique("app")
    created = await create(http, name, served.vm_id)
    assert created["domain"] == f"{name}.{SUFFIX}"
    assert created["vm_id"] == served.vm_id
    assert (created["port"], created["is_public"]) == (80, False)
    uuid.UUID(created["domain_id"])
    assert created["created_at"].endswith("Z")
    got = await http.get(f"/api/v1/domains/{created['domain_id']}")
    assert (got.status_code, got.json()) == (200, created)
    listed = (await http.get("/api/v1/domains")).json()
    assert isinstance(listed, list) and created in listed
    again = await http.post("/api/v1/domains", json={"domain": f"{name}.{SUFFIX}", "vm_id": served.vm_id})
    assert (again.status_code, again.json()["code"]) == (409, "ALREADY_EXISTS")
    assert "already exists" in again.json()["error"]
    deleted = await http.delete(f"/api/v1/domains/{created['domain_id']}")
    assert (deleted.status_code, deleted.json()) == (200, {"domain_id": created["domain_id"]})
    assert (await http.get(f"/api/v1/domains/{created['domain_id']}")).status_code == 404
    assert (await http.delete(f"/api/v1/domains/{created['domain_id']}")).status_code == 404
    assert (await http.get("/api/v1/domains/not-a-uuid")).status_code == 404


async def test_full_names_port_and_case(served: Served) -> None:
    http, name = served.http, unique("Full")
    created = await create(http, f"{name}.{SUFFIX.upper()}", served.vm_id, port=8080, is_public=True)
    assert created["domain"] == f"{name.lower()}.{SUFFIX}"
    assert (created["port"], created["is_public"]) == (8080, True)
    await http.delete(f"/api/v1/domains/{created['domain_id']}")


@pytest.mark.parametrize(
    "name", ["", "-lead", "trail-", "under_score", "a" * 64, "two.labels", f"a.b.{SUFFIX}", "x.example.com", "sp ace", "ü"]
)
async def test_bad_names_are_400(served: Served, name: str) -> None:
    answer = await served.http.post("/api/v1/domains", json={"domain": name, "vm_id": served.vm_id})
    assert (answer.status_code, answer.json()["code"]) == (400, "INVALID_ARGUMENT"), answer.text
    assert "1-63 characters of a-z, 0-9 and '-'" in answer.json()["error"]


async def test_bad_requests(served: Served) -> None:
    http = served.http
    longest = "a" * 63
    no_vm = await http.post("/api/v1/domains", json={"domain": unique("novm")})
    assert no_vm.status_code == 400 and "vm_id is required" in no_vm.json()["error"]
    bad_port = await http.post("/api/v1/domains", json={"domain": unique("port"), "vm_id": served.vm_id, "port": 70000})
    assert bad_port.status_code == 400 and "port must be between 1 and 65535" in bad_port.json()["error"]
    unknown = await http.post("/api/v1/domains", json={"domain": unique("ghost"), "vm_id": str(uuid.uuid4())})
    assert unknown.status_code == 404 and "VM" in unknown.json()["error"] and "not found" in unknown.json()["error"]
    created = await create(http, longest, served.vm_id)  # 63 characters is a label still
    await http.delete(f"/api/v1/domains/{created['domain_id']}")


async def test_another_org_neither_sees_nor_targets(platform: Platform, served: Served, other_org: Org) -> None:
    mine = await create(served.http, unique("mine"), served.vm_id)
    async with platform.client(other_org) as other:
        on_my_vm = await other.post("/api/v1/domains", json={"domain": unique("theirs"), "vm_id": served.vm_id})
        assert on_my_vm.status_code == 404, on_my_vm.text
        assert (await other.get(f"/api/v1/domains/{mine['domain_id']}")).status_code == 404
        assert (await other.delete(f"/api/v1/domains/{mine['domain_id']}")).status_code == 404
        assert (await other.get("/api/v1/domains")).json() == []
        assert (await other.get(f"/api/v1/domains?vm_id={served.vm_id}")).json() == []
    assert (await served.http.get(f"/api/v1/domains/{mine['domain_id']}")).status_code == 200
    await served.http.delete(f"/api/v1/domains/{mine['domain_id']}")


async def test_private_domain_needs_the_owners_key(platform: Platform, served: Served, other_org: Org) -> None:
    domain = (await create(served.http, unique("private"), served.vm_id))["domain"]
    async with visit(platform, domain, served.org) as owner:
        answer = await get_when_listening(owner, "/index.html")
        assert (answer.status_code, answer.text) == (200, "hi\n")
        assert answer.headers["content-type"].startswith("text/html")
    async with visit(platform, domain) as anonymous:
        refused = await anonymous.get("/")
        assert (refused.status_code, refused.json()["code"]) == (401, "UNAUTHENTICATED")
        assert "private" in refused.json()["error"] and refused.json()["success"] is False
    async with visit(platform, domain, other_org) as stranger:
        hidden = await stranger.get("/")
        assert (hidden.status_code, hidden.json()["code"]) == (404, "NOT_FOUND")
    async with visit(platform, domain) as wrong_key:
        invalid = await wrong_key.get("/", headers={"Authorization": "Bearer vers_not-a-key"})
        assert invalid.status_code == 401


async def test_public_domain_answers_without_a_key(platform: Platform, served: Served) -> None:
    domain = (await create(served.http, unique("public"), served.vm_id, is_public=True))["domain"]
    async with visit(platform, domain) as anonymous:
        answer = await get_when_listening(anonymous)
        assert (answer.status_code, answer.text) == (200, "hi\n")
        missing = await anonymous.get("/no-such-page")
        assert missing.status_code == 404  # the guest's own 404, passed on
        head = await anonymous.head("/index.html")
        assert (head.status_code, head.headers["content-length"], head.content) == (200, "3", b"")


async def test_large_answers_and_bodies_stream_through(platform: Platform, served: Served) -> None:
    await sh(served.http, served.vm_id, "head -c 3000000 /dev/urandom > /www/big.bin && sha256sum /www/big.bin > /www/big.sum")
    domain = (await create(served.http, unique("big"), served.vm_id, is_public=True))["domain"]
    async with visit(platform, domain) as client:
        big = await get_when_listening(client, "/big.bin")
        assert big.status_code == 200 and len(big.content) == 3_000_000
        expected = (await client.get("/big.sum")).text.split()[0]
        assert hashlib.sha256(big.content).hexdigest() == expected
        body = os.urandom(1_000_000)
        echoed = await client.post("/cgi-bin/echo?x=1", content=body)
        assert echoed.status_code == 200 and echoed.content == body


async def test_unknown_domain_and_closed_port(platform: Platform, served: Served) -> None:
    async with visit(platform, f"{unique('nobody')}.{SUFFIX}") as client:
        answer = await client.get("/")
        assert (answer.status_code, answer.json()["code"]) == (404, "NOT_FOUND")
    async with visit(platform, f"a.b.{SUFFIX}") as client:
        assert (await client.get("/")).status_code == 404
    domain = (await create(served.http, unique("closed"), served.vm_id, port=81, is_public=True))["domain"]
    async with visit(platform, domain) as client:
        closed = await client.get("/")
        assert (closed.status_code, closed.json()["code"]) == (502, "UNAVAILABLE"), closed.text
        assert "port 81" in closed.json()["error"]
    # the API itself is where it was
    async with platform.client(served.org) as api:
        assert (await api.get("/api/v1/domains")).status_code == 200


async def test_websocket_through_a_domain(platform: Platform, served: Served) -> None:
    domain = (await create(served.http, unique("ws"), served.vm_id, port=WS_PORT, is_public=True))["domain"]
    private = (await create(served.http, unique("wspriv"), served.vm_id, port=WS_PORT))["domain"]
    port = int(platform.url.rsplit(":", 1)[1])
    deadline = time.monotonic() + 30
    while True:
        try:
            socket = await websockets.connect(f"ws://{domain}:{port}/chat?x=1", host="127.0.0.1", port=port)
            break
        except websockets.exceptions.InvalidStatus as error:
            if error.response.status_code != 502 or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.3)
    async with socket:
        assert await socket.recv() == "hello"
        await socket.send("hi there")
        assert await socket.recv() == "echo: hi there"
        await socket.send("again")
        assert await socket.recv() == "echo: again"
    with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
        await websockets.connect(f"ws://{private}:{port}/", host="127.0.0.1", port=port)
    assert refused.value.response.status_code == 401
    async with websockets.connect(f"ws://{private}:{port}/", host="127.0.0.1", port=port, additional_headers=served.org.auth) as owner:
        assert await owner.recv() == "hello"


async def test_domain_limit(served: Served) -> None:
    http = served.http
    made = []
    try:
        for _ in range(25):
            answer = await http.post("/api/v1/domains", json={"domain": unique("many"), "vm_id": served.vm_id})
            if answer.status_code != 201:
                break
            made.append(answer.json()["domain_id"])
        assert (answer.status_code, answer.json()["code"]) == (429, "RESOURCE_EXHAUSTED"), answer.text
        assert "VERS_ORG_MAX_DOMAINS" in answer.json()["error"]
        assert len((await http.get("/api/v1/domains")).json()) == 20
    finally:
        for domain_id in made:
            await http.delete(f"/api/v1/domains/{domain_id}")


async def test_sdk_domains(platform: Platform, served: Served) -> None:
    async with VersSdkClient(base_url=platform.url, api_key=served.org.key, max_retries=0) as sdk:
        name = unique("sdk")
        created = await sdk.create_domain({"domain": name, "vm_id": served.vm_id})
        assert set(created) >= {"created_at", "domain", "domain_id", "vm_id"}
        assert created["domain"] == f"{name}.{SUFFIX}"
        with pytest.raises(ConflictError):
            await sdk.create_domain({"domain": name, "vm_id": served.vm_id})
        listed = await sdk.list_domains(M.ListDomainsParams(vm_id=served.vm_id))
        assert isinstance(listed, list) and created["domain_id"] in [d["domain_id"] for d in listed]
        assert await sdk.list_domains(M.ListDomainsParams(vm_id=str(uuid.uuid4()))) == []
        assert (await sdk.get_domain(created["domain_id"]))["vm_id"] == served.vm_id
        assert await sdk.delete_domain(created["domain_id"]) == {"domain_id": created["domain_id"]}
        with pytest.raises(NotFoundError):
            await sdk.get_domain(created["domain_id"])


async def test_sdk_ssh_key(platform: Platform, served: Served, other_org: Org) -> None:
    async with VersSdkClient(base_url=platform.url, api_key=served.org.key, max_retries=0) as sdk:
        key = await sdk.ssh_key(served.vm_id)
        assert key["ssh_port"] == 22 and key["ssh_private_key"].startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    async with VersSdkClient(base_url=platform.url, api_key=other_org.key, max_retries=0) as stranger:
        with pytest.raises(NotFoundError):
            await stranger.ssh_key(served.vm_id)


async def test_names_are_platform_wide_and_a_deleted_vm_takes_its_domains(platform: Platform, served: Served, other_org: Org) -> None:
    mine = await create(served.http, unique("mine"), served.vm_id)
    async with platform.client(other_org) as other:
        their_vm = await new_vm(other)
        taken = await other.post("/api/v1/domains", json={"domain": mine["domain"], "vm_id": their_vm})
        assert (taken.status_code, taken.json()["code"]) == (409, "ALREADY_EXISTS")
        theirs = await create(other, unique("gone"), their_vm, is_public=True)
        assert (await other.get(f"/api/v1/domains?vm_id={their_vm}")).json() == [theirs]
        assert (await other.get(f"/api/v1/domains?vm_id={served.vm_id}")).json() == []
        assert (await other.get("/api/v1/domains")).json() == [theirs]
        assert (await served.http.get(f"/api/v1/domains?vm_id={their_vm}")).json() == []
        mine_listed = (await served.http.get(f"/api/v1/domains?vm_id={served.vm_id}")).json()
        assert mine in mine_listed and theirs not in mine_listed
        assert (await other.delete(f"/api/v1/vm/{their_vm}")).status_code == 200
        assert (await other.get(f"/api/v1/domains/{theirs['domain_id']}")).status_code == 404
        assert (await other.get("/api/v1/domains")).json() == []
        async with visit(platform, theirs["domain"]) as client:
            assert (await client.get("/")).status_code == 404
        gone_vm = await other.post("/api/v1/domains", json={"domain": theirs["domain"], "vm_id": their_vm})
        assert gone_vm.status_code == 404
    again = await create(served.http, theirs["domain"], served.vm_id)  # the name is free again
    for domain in (again, mine):
        assert (await served.http.delete(f"/api/v1/domains/{domain['domain_id']}")).status_code == 200

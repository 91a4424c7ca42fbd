"""VMs on the network: NAT to "the outside" (a network namespace this module makes, with an HTTP server,
a git repository and a DNS server in it, reached only because VERS_GUEST_ALLOW names it), every refusal
of the isolation rules, network "none", tunnels over the REST WebSocket, and each VM's SSH key."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import pytest_asyncio
import websockets

from services.orchestrator.network import GuestNetwork
from tests.conftest import Org, Platform, kill_vms_under
from tests.conftest import test_settings as settings_for
from tests.outside import GIT, Outside, outside_world
from tests.test_vms import new_vm, out, sh

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outside]:
    with outside_world(tmp_path_factory.mktemp("outside")) as world:
        (world.folder / "hello.txt").write_text("hello from outside\n")
        source = tmp_path_factory.mktemp("app")
        subprocess.run([*GIT, "init", "-q", str(source)], check=True)
        (source / "README").write_text("the app\n")
        subprocess.run([*GIT, "-C", str(source), "add", "README"], check=True)
        subprocess.run([*GIT, "-C", str(source), "commit", "-qm", "first"], check=True)
        world.publish_repository("app", source)
        yield world


@pytest_asyncio.fixture(scope="module")
async def netplatform(outside: Outside, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Platform]:
    """A platform whose guests may reach the outside server (and resolve names through it), nothing else."""
    settings = settings_for(tmp_path_factory.mktemp("net-data")).model_copy(
        update={"guest_allow": outside.address, "guest_dns": outside.address}
    )
    platform = await Platform.start(settings)
    yield platform  # type: ignore[misc]
    kill_vms_under(platform.settings.vm_run_dir)
    await asyncio.sleep(0.3)
    await platform.stop()


@pytest_asyncio.fixture(scope="module")
async def net_org(netplatform: Platform) -> Org:
    return await netplatform.new_org("net")


async def reach(http: httpx.AsyncClient, vm_id: str, address: str, port: int) -> bool:
    """Whether the guest can open a TCP connection to address:port (busybox nc, 5 s at most)."""
    result = await sh(http, vm_id, f"nc -w 5 {address} {port} </dev/null >/dev/null 2>&1; echo $?")
    return result["stdout"].strip() == "0"


async def test_a_vm_fetches_and_clones_from_outside_by_name_and_so_does_its_branch(netplatform: Platform, net_org: Org) -> None:
    async with netplatform.client(net_org) as http:
        vm = await new_vm(http)
        assert "default via 10.0.2.2" in await out(http, vm, "ip route")
        assert "nameserver 10.0.2.3" in await out(http, vm, "cat /etc/resolv.conf")
        assert await out(http, vm, "wget -q -O - http://git.test:8080/hello.txt") == "hello from outside\n"
        await out(http, vm, "git clone -q http://git.test:8080/app.git /srv/app")
        assert await out(http, vm, "cat /srv/app/README") == "the app\n"
        metadata = (await http.get(f"/api/v1/vm/{vm}/metadata")).json()
        assert (metadata["network"], metadata["ip"]) == ("nat", "10.0.2.15")
        assert (await http.get(f"/api/v1/vm/{vm}/ssh_key")).status_code == 200

        commit = (await http.post(f"/api/v1/vm/{vm}/commit", json={})).json()["commit_id"]
        branch = (await http.post(f"/api/v1/vm/branch/by_commit/{commit}")).json()["vms"][0]["vm_id"]
        # the branch's copy of the guest still has the address and route it booted with, and they work
        assert await out(http, branch, "wget -q -O - http://git.test:8080/hello.txt") == "hello from outside\n"
        await out(http, branch, "git -C /srv/app pull -q && git clone -q http://git.test:8080/app.git /srv/again")
        assert await out(http, branch, "cat /srv/again/README") == "the app\n"
        for vm_id in (vm, branch):
            await http.delete(f"/api/v1/vm/{vm_id}")


async def test_network_none_has_a_nic_that_reaches_nothing(netplatform: Platform, net_org: Org, outside: Outside) -> None:
    async with netplatform.client(net_org) as http:
        vm = await new_vm(http, network="none")
        assert "10.0.2.15" in await out(http, vm, "ip addr show eth0")
        assert not await reach(http, vm, outside.address, 8080)
        # its stack runs in the host's own network namespace: the host's loopback must stay out of reach
        grpc_port = int(netplatform.settings.orchestrator_addr.rsplit(":", 1)[1])
        assert not await reach(http, vm, "10.0.2.2", grpc_port)
        result = await sh(http, vm, "wget -q -O - http://git.test:8080/hello.txt")
        assert result["exit_code"] != 0
        assert (await http.get(f"/api/v1/vm/{vm}/metadata")).json()["network"] == "none"
        # ...and its branches stay without
        commit = (await http.post(f"/api/v1/vm/{vm}/commit", json={})).json()["commit_id"]
        branch = (await http.post(f"/api/v1/vm/branch/by_commit/{commit}")).json()["vms"][0]["vm_id"]
        assert not await reach(http, branch, outside.address, 8080)
        for vm_id in (vm, branch):
            await http.delete(f"/api/v1/vm/{vm_id}")


async def test_an_unknown_network_mode_is_refused(netplatform: Platform, net_org: Org) -> None:
    async with netplatform.client(net_org) as http:
        answer = await http.post("/api/v1/vm/new_root", json={"vm_config": {"network": "bridge"}})
    assert answer.status_code == 400
    assert '"nat"' in answer.json()["error"] and '"none"' in answer.json()["error"]


@contextlib.contextmanager
def host_listener() -> Iterator[int]:
    """A TCP server on every address of this host, answering anyone who connects."""
    server = socket.create_server(("0.0.0.0", 0))
    server.settimeout(0.2)
    yield server.getsockname()[1]
    server.close()


def host_private_address() -> str:
    """An address of this host on a private network (its primary interface here)."""
    for line in subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, check=True).stdout.splitlines():
        address = line.split()[3].split("/")[0]
        if not address.startswith(("127.", "100.64.", "198.18.")) and line.split()[1] != "lo":
            return address
    pytest.fail("this host has no address besides loopback")


async def test_isolation_refuses_the_host_other_vms_metadata_and_private_ranges(
    netplatform: Platform, net_org: Org, outside: Outside
) -> None:
    async with netplatform.client(net_org) as http:
        vm, other = await asyncio.gather(new_vm(http), new_vm(http))
        assert await reach(http, vm, outside.address, 8080), "the allowed outside server must answer (control)"
        grpc_port = int(netplatform.settings.orchestrator_addr.rsplit(":", 1)[1])
        gateway_port = int(netplatform.url.rsplit(":", 1)[1])
        with host_listener() as port:
            refused = {
                "the platform's gRPC port via the guest's gateway (host loopback)": ("10.0.2.2", grpc_port),
                "the gateway's port via the guest's gateway (host loopback)": ("10.0.2.2", gateway_port),
                "a host service on the host's private address": (host_private_address(), port),
                "a host service on the outside link's host address": (outside.host_side, port),
                "the cloud metadata address (link-local)": ("169.254.169.254", 80),
                "a private range": ("192.168.1.1", 80),
                "the outside server's neighbour, not allowed": (outside.host_side, 8080),
            }
            # another VM: its port as reached from outside, through a forward that a tunnel opened
            await out(http, other, "mkdir -p /www && echo other > /www/index.html && httpd -p 8000 -h /www")
            async with websockets.connect(ws_url(netplatform, other, 8000), additional_headers=net_org.auth) as tunnel:
                await tunnel.send(b"GET /index.html HTTP/1.0\r\n\r\n")
                assert b"other" in await read_all(tunnel)
            forwards = listening_forwards(netplatform)
            assert forwards, "the tunnel's host forward listens in the platform's namespace"
            for address, forward in forwards:
                refused[f"another VM's forwarded port {forward}"] = (address, forward)
                refused[f"another VM's forwarded port {forward} via the guest's gateway"] = ("10.0.2.2", forward)
            for what, (address, target) in refused.items():
                assert not await reach(http, vm, address, target), f"the guest reached {what} ({address}:{target})"
        for vm_id in (vm, other):
            await http.delete(f"/api/v1/vm/{vm_id}")


def listening_forwards(platform: Platform) -> list[tuple[str, int]]:
    """The host forwards listening in the platform's network namespace (address, port)."""
    netns = GuestNetwork(platform.settings.vm_run_dir, [], []).netns
    listing = subprocess.run(["ip", "netns", "exec", netns, "ss", "-Hltn"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in listing.splitlines():
        address, _, port = line.split()[3].rpartition(":")
        found.append((address, int(port)))
    return found


def ws_url(platform: Platform, vm_id: str, port: int) -> str:
    return platform.url.replace("http://", "ws://") + f"/api/v1/vm/{vm_id}/tunnel?port={port}"


async def read_all(tunnel: websockets.asyncio.client.ClientConnection) -> bytes:
    received = b""
    with contextlib.suppress(websockets.ConnectionClosedOK):
        async for frame in tunnel:
            received += frame if isinstance(frame, bytes) else frame.encode()
    return received


async def test_tunnels_carry_many_connections_and_are_private_to_the_org(netplatform: Platform, net_org: Org) -> None:
    stranger = await netplatform.new_org("stranger")
    async with netplatform.client(net_org) as http:
        vm = await new_vm(http, network="none")  # a tunnel reaches into a VM whose network is closed
        await out(http, vm, "mkdir -p /www && seq 1 20000 > /www/big.txt && httpd -p 80 -h /www")
        expected = "".join(f"{i}\n" for i in range(1, 20001)).encode()

        async def fetch(turn: int) -> bytes:
            # busybox httpd's listen backlog is 9: connections arrive 50 ms apart, not in one burst
            await asyncio.sleep(0.05 * turn)
            async with websockets.connect(ws_url(netplatform, vm, 80), additional_headers=net_org.auth) as tunnel:
                await tunnel.send(b"GET /big.txt HTTP/1.0\r\n\r\n")
                return await read_all(tunnel)

        answers = await asyncio.gather(*(fetch(turn) for turn in range(20)))
        assert all(answer.split(b"\r\n\r\n", 1)[1] == expected for answer in answers)

        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(ws_url(netplatform, vm, 80), additional_headers=stranger.auth)
        assert refused.value.response.status_code == 404
        with pytest.raises(websockets.InvalidStatus) as anonymous:
            await websockets.connect(ws_url(netplatform, vm, 80))
        assert anonymous.value.response.status_code == 401
        with pytest.raises(websockets.InvalidStatus) as bad_port:
            await websockets.connect(ws_url(netplatform, vm, 70000), additional_headers=net_org.auth)
        assert bad_port.value.response.status_code == 400
        # nothing listens on 81: the connection opens and is closed at once
        async with websockets.connect(ws_url(netplatform, vm, 81), additional_headers=net_org.auth) as tunnel:
            assert await read_all(tunnel) == b""
        await http.delete(f"/api/v1/vm/{vm}")


async def test_each_vm_has_its_own_ssh_key_and_a_branch_gets_another(netplatform: Platform, net_org: Org) -> None:
    async with netplatform.client(net_org) as http:
        vm = await new_vm(http)
        key = (await http.get(f"/api/v1/vm/{vm}/ssh_key")).json()
        assert key["ssh_port"] == 22 and key["ssh_private_key"].startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
        assert (await http.get(f"/api/v1/vm/{vm}/ssh_key")).json() == key  # the same key every time
        installed = await out(http, vm, "cat /root/.ssh/authorized_keys")
        assert installed.startswith("ssh-ed25519 ") and f"vers-{vm}" in installed
        branch = (await http.post(f"/api/v1/vm/{vm}/branch")).json()["vms"][0]["vm_id"]
        branch_key = (await http.get(f"/api/v1/vm/{branch}/ssh_key")).json()
        assert branch_key["ssh_private_key"] != key["ssh_private_key"]
        branch_installed = await out(http, branch, "cat /root/.ssh/authorized_keys")
        assert len(branch_installed.splitlines()) == 1 and f"vers-{branch}" in branch_installed
        assert branch_installed.split()[1] != installed.split()[1]  # the source's key is gone from the branch
        # the SSH server answers through a tunnel
        async with websockets.connect(ws_url(netplatform, vm, 22), additional_headers=net_org.auth) as tunnel:
            banner = await asyncio.wait_for(tunnel.recv(), 30)
        assert isinstance(banner, bytes) and banner.startswith(b"SSH-2.0-")
        for vm_id in (vm, branch):
            await http.delete(f"/api/v1/vm/{vm_id}")

"""Several VM hosts on this machine: the orchestrator API (VERS_ORCHESTRATOR_ROLE=api, in this process with the
other services and the gateway) and two host agents (VERS_ORCHESTRATOR_ROLE=host), each a process of its own
with its own data and run folders, sharing the orchestrator's database (PostgreSQL, as several hosts are
deployed) and one commit store folder.

A VM committed on host A branches on host B (A is full), and its counter goes on; once A's agent is killed,
A is marked dead with its VMs, A's commits still branch on B, and new VMs land on B; A comes back when its
agent starts again."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import pytest_asyncio
import websockets
from cryptography.fernet import Fernet

from services.common.auth import ServiceCredential
from services.inprocess import HostAgentProcess
from services.orchestrator.router import PLACEMENT_HINT
from tests.conftest import Org, Platform, discard, kill_vms_under, postgres_urls
from tests.conftest import test_settings as settings_in
from tests.launcher import VERS
from tests.postgres import TempPostgres
from tests.test_vms import COUNTER, console_url, read_until, sh
from vers.orchestrator.v1 import hosts_pb2, hosts_pb2_grpc, orchestrator_pb2, orchestrator_pb2_grpc

HEARTBEAT = 0.5
DEAD_AFTER = 4.0
# Host A offers room for one 256 MiB VM; B all that the machine has.
VM_MIB = 256
A_MEMORY_MIB = 384


@dataclass
class Cluster:
    platform: Platform
    store: Path
    agents: dict[str, HostAgentProcess] = field(default_factory=dict)

    async def hosts(self) -> dict[str, hosts_pb2.HostStatus]:
        async with grpc.aio.insecure_channel(self.platform.settings.orchestrator_addr) as channel:
            answer = await hosts_pb2_grpc.HostsServiceStub(channel).ListHosts(
                hosts_pb2.ListHostsRequest(), metadata=(("authorization", f"Bearer {self.platform.admin_key}"),), timeout=10
            )
        return {host.host_id: host for host in answer.hosts}

    async def wait_host(self, name: str, state: str, timeout: float = 90) -> hosts_pb2.HostStatus:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            host = (await self.hosts()).get(name)
            if host is not None and host.state == state:
                return host
            await asyncio.sleep(0.2)
        raise AssertionError(f"host {name} was not {state} within {timeout:.0f} s: {await self.hosts()}")


@pytest_asyncio.fixture(scope="module")
async def cluster(images: Path, postgres: TempPostgres, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Cluster]:
    folder = tmp_path_factory.mktemp("hosts")
    secret = secrets.token_hex(32)
    store = folder / "commit-store"
    store.mkdir()
    settings = settings_in(folder / "api").model_copy(
        update={
            "orchestrator_role": "api",
            "service_secret": secret,
            "host_heartbeat_seconds": HEARTBEAT,
            "host_dead_seconds": DEAD_AFTER,
            "commit_store": str(store),
            "env_vars_key": Fernet.generate_key().decode(),
            **postgres_urls(postgres, "hosts"),
        }
    )
    platform = await Platform.start(settings)
    cluster = Cluster(platform, store)
    for name in ("a", "b"):
        room = {"VERS_HOST_MEMORY_MIB": str(A_MEMORY_MIB), "VERS_HOST_RESERVE_MEMORY_MIB": "0"} if name == "a" else {}
        cluster.agents[name] = HostAgentProcess.beside(
            platform.settings, name, folder / f"host-{name}", VERS_AUTH_CACHE_SECONDS="0.5", **room
        )
    try:
        yield cluster
    finally:
        for agent in cluster.agents.values():
            agent.stop()
            kill_vms_under(agent.run_dir)
        await platform.stop()
        discard(folder)


async def new_vm(http: httpx.AsyncClient) -> str:
    answer = await http.post("/api/v1/vm/new_root?wait_boot=true", json={"vm_config": {"mem_size_mib": VM_MIB}})
    assert answer.status_code == 201, answer.text
    return str(answer.json()["vm_id"])


async def counter(http: httpx.AsyncClient, vm_id: str) -> int:
    for _ in range(20):
        if text := (await sh(http, vm_id, "cat /run/counter"))["stdout"].strip():
            return int(text)
    raise AssertionError("/run/counter stayed empty")


async def branch(http: httpx.AsyncClient, commit_id: str) -> str:
    answer = await http.post("/api/v1/vm/from_commit", json={"commit_id": commit_id})
    assert answer.status_code == 201, answer.text
    return str(answer.json()["vm_id"])


async def state(http: httpx.AsyncClient, vm_id: str) -> Any:
    answer = await http.get(f"/api/v1/vm/{vm_id}/status")
    assert answer.status_code == 200, answer.text
    return answer.json()["state"]


async def test_no_host_up_is_unavailable(cluster: Cluster) -> None:
    """Before any host agent has registered, a new VM has nowhere to go, and the answer says so."""
    org: Org = await cluster.platform.new_org("nohost")
    async with cluster.platform.client(org) as http:
        answer = await http.post("/api/v1/vm/new_root", json={"vm_config": {"mem_size_mib": VM_MIB}})
    assert answer.status_code == 503, answer.text
    assert "no VM host is up" in answer.json()["error"]


async def test_commit_on_one_host_branches_on_another_and_outlives_it(cluster: Cluster) -> None:
    a, b = cluster.agents["a"], cluster.agents["b"]
    a.start()
    await cluster.wait_host("a", "up")
    org = await cluster.platform.new_org("hosts")
    async with cluster.platform.client(org) as http:
        # the one host there is
        vm = await new_vm(http)
        assert a.runs(vm)
        await sh(http, vm, COUNTER)
        commit = await http.post(f"/api/v1/vm/{vm}/commit", json={})
        assert commit.status_code == 201, commit.text
        commit_id = commit.json()["commit_id"]
        at_commit = await counter(http, vm)
        # complete in the shared store when the commit was answered
        assert (cluster.store / "commits" / commit_id).is_dir()

        # A is full: the branch of A's commit goes to B, which reads the commit from the store
        b.start()
        await cluster.wait_host("b", "up")
        copy = await branch(http, commit_id)
        assert b.runs(copy) and not a.runs(copy)
        assert at_commit - 20 <= await counter(http, copy)  # the counter goes on from the commit
        first = await counter(http, copy)
        await asyncio.sleep(0.5)
        assert await counter(http, copy) > first
        # the console (a stream both ways) and the org's environment variables (one key on every host) reach it on B
        async with websockets.connect(console_url(cluster.platform, copy), additional_headers=org.auth) as socket:
            await socket.send(b"echo console-on-$((40 + 2))\r")
            await read_until(socket, b"console-on-42")
        assert (await http.put("/api/v1/env_vars", json={"vars": {"WHERE": "everywhere"}})).status_code == 200
        assert (await sh(http, copy, 'printf %s "$WHERE"'))["stdout"] == "everywhere"
        # the administrator's hint names A first: A has no room, says so (HOST_FULL), and the call passes to B
        admin = (("authorization", f"Bearer {cluster.platform.admin_key}"),)
        async with grpc.aio.insecure_channel(cluster.platform.settings.orchestrator_addr) as channel:
            vms = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            request = orchestrator_pb2.CreateRootVmRequest(vm_config=orchestrator_pb2.VmConfig(mem_size_mib=VM_MIB), wait_boot=True)
            made = await vms.CreateRootVm(request, metadata=(*admin, (PLACEMENT_HINT, "a,b")), timeout=180)
            assert b.runs(made.vm_id)
            await vms.DeleteVm(orchestrator_pb2.DeleteVmRequest(vm_id=made.vm_id), metadata=admin, timeout=60)
            # ...and so does a fork (the registry's saga calls ForkCommit): A discards the VM it noted, B makes it
            assert (await http.patch(f"/api/v1/commits/{commit_id}", json={"is_public": True})).status_code == 200, "published"
            forker = await cluster.platform.new_org("forker")
            service = ServiceCredential(cluster.platform.settings.service_secret.encode()).metadata(forker.id)
            internal = orchestrator_pb2_grpc.OrchestratorInternalServiceStub(channel)
            saga = str(uuid.uuid4())
            fork = orchestrator_pb2.ForkCommitRequest(source_commit_id=commit_id, source_reference="hosts:test", saga_id=saga)
            forked = await internal.ForkCommit(fork, metadata=(*service, (PLACEMENT_HINT, "a,b")), timeout=300)
            assert b.runs(forked.vm_id) and forked.commit_id
            await internal.AbandonFork(orchestrator_pb2.AbandonForkRequest(saga_id=saga), metadata=service, timeout=120)
            assert not b.runs(forked.vm_id)
        # the VM on A is still A's: its calls go there
        assert (await sh(http, vm, "echo still here"))["stdout"] == "still here\n"

        # A's agent dies: A is marked dead, and its live VM with it, within VERS_HOST_DEAD_SECONDS
        a.kill()
        await cluster.wait_host("a", "dead", timeout=DEAD_AFTER * 4)
        assert await state(http, vm) == "dead"
        assert await state(http, copy) == "running"
        refused = await http.post(f"/api/v1/vm/{vm}/exec", json={"command": ["true"]})
        assert refused.status_code == 400, refused.text  # a dead VM runs nothing, wherever it was

        # A's commit still branches (on B), and a new VM lands on B
        again = await branch(http, commit_id)
        assert b.runs(again)
        assert at_commit - 20 <= await counter(http, again)
        fresh = await new_vm(http)
        assert b.runs(fresh)

        # a host that is up cannot be forgotten; a dead one can (`vers admin hosts remove`), and registers anew
        async with cluster.platform.client(Authorization=f"Bearer {cluster.platform.admin_key}") as admin_http:
            assert (await admin_http.delete("/api/v1/admin/hosts/b")).status_code == 400
        env = {**os.environ, "VERS_URL": cluster.platform.url, "VERS_API_KEY": cluster.platform.admin_key}
        removed = await asyncio.to_thread(
            subprocess.run, [VERS, "admin", "hosts", "remove", "--format", "json", "a"], env=env, capture_output=True, text=True, timeout=60
        )
        assert removed.returncode == 0, removed.stderr
        answer = json.loads(removed.stdout)
        assert answer["host_id"] == "a" and answer.get("dead_vm_ids", []) == [], answer  # its one VM was dead already
        assert "a" not in await cluster.hosts()
        # A's agent starts again: A is up, its dead VM's QEMU (left running by the kill) is stopped
        a.start()
        await cluster.wait_host("a", "up")
        deadline = time.monotonic() + 30
        while a.runs(vm) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert not a.runs(vm)
        assert await state(http, vm) == "dead"
        for vm_id in (copy, again, fresh):
            assert (await http.delete(f"/api/v1/vm/{vm_id}")).status_code == 200


async def test_the_administrator_lists_the_hosts(cluster: Cluster) -> None:
    """GET /api/v1/admin/hosts and `vers admin hosts`: every host with its state and room; an org's key is refused."""
    async with cluster.platform.client(Authorization=f"Bearer {cluster.platform.admin_key}") as http:
        answer = await http.get("/api/v1/admin/hosts")
    assert answer.status_code == 200, answer.text
    hosts = {host["host_id"]: host for host in answer.json()["hosts"]}
    assert hosts["a"]["state"] == hosts["b"]["state"] == "up"
    assert hosts["a"]["address"] == cluster.agents["a"].env["VERS_HOST_ADDR"]
    assert int(hosts["a"]["room"]["memory_total_mib"]) == A_MEMORY_MIB
    env = {**os.environ, "VERS_URL": cluster.platform.url, "VERS_API_KEY": cluster.platform.admin_key}
    listed = await asyncio.to_thread(subprocess.run, [VERS, "admin", "hosts"], env=env, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert all(f"127.0.0.1:{agent.env['VERS_HOST_ADDR'].rsplit(':', 1)[1]}" in listed.stdout for agent in cluster.agents.values())
    as_json = await asyncio.to_thread(
        subprocess.run, [VERS, "admin", "hosts", "list", "--format", "json"], env=env, capture_output=True, text=True, timeout=60
    )
    assert {host["host_id"]: host["state"] for host in json.loads(as_json.stdout)["hosts"]} == {"a": "up", "b": "up"}
    org = await cluster.platform.new_org("curious")
    async with cluster.platform.client(org) as http:
        assert (await http.get("/api/v1/admin/hosts")).status_code == 403


async def test_host_calls_are_for_the_platform_only(cluster: Cluster) -> None:
    """An organization's key cannot pose as a host to the API, nor ask a host agent directly."""
    org = await cluster.platform.new_org("poser")
    status = hosts_pb2.HostStatus(host_id="evil", address="127.0.0.1:1")
    async with grpc.aio.insecure_channel(cluster.platform.settings.orchestrator_addr) as channel:
        registry = hosts_pb2_grpc.HostRegistryInternalServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as beat:
            await registry.Heartbeat(hosts_pb2.HeartbeatRequest(status=status), metadata=org.metadata, timeout=10)
        assert beat.value.code() == grpc.StatusCode.PERMISSION_DENIED
    async with grpc.aio.insecure_channel(cluster.agents["b"].env["VERS_HOST_ADDR"]) as channel:
        agent = hosts_pb2_grpc.HostAgentInternalServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as asked:
            await agent.GetHostStatus(hosts_pb2.GetHostStatusRequest(), metadata=org.metadata, timeout=10)
        assert asked.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "evil" not in await cluster.hosts()

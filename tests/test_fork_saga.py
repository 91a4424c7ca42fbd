"""The fork saga and repository delete under concurrency and crashes: each fork lands whole or leaves
nothing behind (no VM, no commit, no empty repository it made), and a crash at any step is finished or
undone on the next start."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
import pytest_asyncio

from services.common.auth import ServiceCredential
from services.common.settings import Settings
from tests.conftest import Org, Platform, kill_vms_under
from tests.launcher import Launched, launcher_env
from tests.test_faults import fsck
from vers.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc

pytestmark = pytest.mark.vm

# Fault point: (the step its saga is left at, the state of its fork in the orchestrator (state, VM made,
# commit made) or None when the call never came, what the next start makes of it).
FORK_FAULTS = {
    "fork.after_saga_record": ("started", None, "undone"),
    "fork.after_orchestrator": ("forked", ("done", True, True), "undone"),
    "fork.after_repository": ("repository", ("done", True, True), "undone"),
    "fork.after_tag": ("repository", ("done", True, True), "finished"),
    "fork.after_copy": ("started", ("running", False, True), "undone"),  # in the orchestrator
    "fork.after_restore": ("started", ("running", True, True), "undone"),  # in the orchestrator
    "fork.after_done": ("started", ("done", True, True), "undone"),  # in the orchestrator
}


def rows(database: Path, query: str, *args: str) -> list[tuple[object, ...]]:
    with contextlib.closing(sqlite3.connect(database)) as db:
        return db.execute(query, args).fetchall()


def sagas(data: Path) -> list[tuple[object, ...]]:
    return rows(data / "registry.db", "SELECT id, kind, step, payload FROM sagas")


def fork_request(data: Path, saga_id: str) -> tuple[str, bool, bool] | None:
    found = rows(data / "orchestrator.db", "SELECT state, vm_id, commit_id FROM fork_requests WHERE saga_id = ?", saga_id)
    return (str(found[0][0]), found[0][1] is not None, found[0][2] is not None) if found else None


async def settled(data: Path, timeout: float = 120) -> None:
    """Until the registry has finished or undone every saga left (it retries until its peers answer)."""
    deadline = time.monotonic() + timeout
    while left := sagas(data):
        assert time.monotonic() < deadline, f"sagas still unsettled after {timeout:.0f} s: {left}"
        await asyncio.sleep(0.3)


async def publish(http: httpx.AsyncClient) -> None:
    """base:latest in a public repository: a commit of a VM with a file written before it."""
    answer = await http.post("/api/v1/vm/new_root?wait_boot=true", json={"vm_config": {"mem_size_mib": 128}})
    assert answer.status_code == 201, answer.text
    vm = answer.json()["vm_id"]
    assert (
        await http.post(f"/api/v1/vm/{vm}/exec", json={"command": ["sh", "-c", "echo upstream > /root/origin; sync"]})
    ).status_code == 200
    commit = (await http.post(f"/api/v1/vm/{vm}/commit", json={"name": "base"})).json()["commit_id"]
    assert (await http.post("/api/v1/repositories", json={"name": "base"})).status_code == 201
    assert (await http.patch("/api/v1/repositories/base/visibility", json={"is_public": True})).status_code == 200
    assert (await http.post("/api/v1/repositories/base/tags", json={"tag_name": "latest", "commit_id": commit})).status_code == 201
    assert (await http.delete(f"/api/v1/vm/{vm}")).status_code == 200  # forks start from the commit alone


async def references(site: Site, http: httpx.AsyncClient, commit_id: str) -> list[str]:
    """The `repo:tag` references of the org of `http`'s key that name the commit, read through the API."""
    found = []
    for repository in (await http.get("/api/v1/repositories", params={"page_size": 1000})).json()["repositories"]:
        tags = (await http.get(f"/api/v1/repositories/{repository['name']}/tags", params={"page_size": 1000})).json()["tags"]
        found += [f"{repository['name']}:{tag['tag_name']}" for tag in tags if tag["commit_id"] == commit_id]
    return sorted(found)


def fork_body(source_org: str, repo_name: str, tag_name: str) -> dict[str, str]:
    return {"source_org": source_org, "source_repo": "base", "source_tag": "latest", "repo_name": repo_name, "tag_name": tag_name}


async def owned(http: httpx.AsyncClient) -> tuple[set[str], set[str]]:
    """The org's VMs and commits."""
    vms = {vm["vm_id"] for vm in (await http.get("/api/v1/vm")).json()}
    commits = {c["commit_id"] for c in (await http.get("/api/v1/commits", params={"limit": 500})).json()["commits"]}
    return vms, commits


# Concurrency, on the in-process platform


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def publisher(platform: Platform) -> Org:
    org = await platform.new_org("publisher")
    async with platform.client(org) as http:
        await publish(http)
    return org


async def test_twenty_concurrent_forks_into_one_repository_all_land(platform: Platform, publisher: Org, other_org: Org) -> None:
    async with platform.client(other_org) as http:
        names = [f"t{i:02}" for i in range(20)]
        answers = await asyncio.gather(
            *(http.post("/api/v1/repositories/fork", json=fork_body(publisher.name, "many", name)) for name in names)
        )
        assert [a.status_code for a in answers] == [201] * 20, [a.text for a in answers if a.status_code != 201]
        forks = {a.json()["tag_name"]: a.json() for a in answers}
        tags = {t["tag_name"]: t["commit_id"] for t in (await http.get("/api/v1/repositories/many/tags")).json()["tags"]}
        assert tags == {name: forks[name]["commit_id"] for name in names}
        assert len(set(tags.values())) == 20
        assert [r["name"] for r in (await http.get("/api/v1/repositories")).json()["repositories"]] == ["many"]
        assert await owned(http) == ({f["vm_id"] for f in forks.values()}, set(tags.values()))
        assert sagas(platform.settings.data_dir) == []
        await asyncio.gather(*(http.delete(f"/api/v1/vm/{f['vm_id']}") for f in forks.values()))


async def test_concurrent_forks_to_one_tag_one_lands_the_others_leave_nothing(platform: Platform, publisher: Org, other_org: Org) -> None:
    """All pass the early check at once; the tag decides: the losers' VMs and commits are undone."""
    async with platform.client(other_org) as http:
        answers = await asyncio.gather(
            *(http.post("/api/v1/repositories/fork", json=fork_body(publisher.name, "one", "latest")) for _ in range(8))
        )
        codes = sorted(a.status_code for a in answers)
        assert codes == [201] + [409] * 7, [a.text for a in answers]
        assert all("--tag-name" in a.json()["error"] for a in answers if a.status_code == 409)
        [won] = [a.json() for a in answers if a.status_code == 201]
        assert (await http.get("/api/v1/repositories/one/tags/latest")).json()["commit_id"] == won["commit_id"]
        assert await owned(http) == ({won["vm_id"]}, {won["commit_id"]})
        assert sagas(platform.settings.data_dir) == []
        # The losers did fork before the tag refused them: what they made was undone.
        forks = rows(
            platform.settings.data_dir / "orchestrator.db", "SELECT state, vm_id FROM fork_requests WHERE org_id = ?", other_org.id
        )
        assert sorted(state for state, _ in forks).count("done") == 1
        assert [vm for state, vm in forks if state == "abandoned" and vm is not None], forks
        await http.delete(f"/api/v1/vm/{won['vm_id']}")


async def test_the_orchestrator_forks_once_per_saga_and_abandons_it_whole(platform: Platform, publisher: Org, other_org: Org) -> None:
    """The saga's side of the orchestrator: internal (the service credential only, no REST path), one VM and
    commit per saga id however often it is called, all of it deleted on abandon, the id refused after."""
    settings = platform.settings
    as_org = ServiceCredential.load(settings.service_secret, settings.service_secret_file).metadata(other_org.id)
    async with grpc.aio.insecure_channel(settings.addr("orchestrator")) as channel, platform.client(other_org) as http:
        source = (await http.get(f"/api/v1/public/repositories/{publisher.name}/base/tags/latest")).json()["commit_id"]
        request = orchestrator_pb2.ForkCommitRequest(
            source_commit_id=source, source_reference=f"{publisher.name}/base:latest", saga_id=str(uuid.uuid4())
        )
        stub = orchestrator_pb2_grpc.OrchestratorInternalServiceStub(channel)
        first, joined = await asyncio.gather(stub.ForkCommit(request, metadata=as_org), stub.ForkCommit(request, metadata=as_org))
        again = await stub.ForkCommit(request, metadata=as_org)
        assert (first.vm_id, first.commit_id) == (joined.vm_id, joined.commit_id) == (again.vm_id, again.commit_id)
        assert await owned(http) == ({first.vm_id}, {first.commit_id})
        assert (await http.get(f"/api/v1/commits/{first.commit_id}")).json()["name"] == f"fork of {publisher.name}/base:latest"
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ForkCommit(request, metadata=other_org.metadata)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert (await http.post(f"/api/v1/vm/fork/{publisher.name}/base/latest")).status_code == 404

        abandoned = await stub.AbandonFork(orchestrator_pb2.AbandonForkRequest(saga_id=request.saga_id), metadata=as_org)
        assert (abandoned.vm_id, abandoned.commit_id) == (first.vm_id, first.commit_id)
        assert await owned(http) == (set(), set())
        with pytest.raises(grpc.aio.AioRpcError) as late:
            await stub.ForkCommit(request, metadata=as_org)
        assert late.value.code() == grpc.StatusCode.ABORTED
        assert "abandoned" in (late.value.details() or "")
        again_abandoned = await stub.AbandonFork(orchestrator_pb2.AbandonForkRequest(saga_id=request.saga_id), metadata=as_org)
        assert again_abandoned.vm_id == first.vm_id  # harmless when repeated


# Crashes, on a platform launched as `make run` does and restarted once per fault point


@dataclass
class Crashed:
    fault: str
    saga_id: str
    body: dict[str, str]
    before: tuple[set[str], set[str]]


class Site:
    """One data folder; each start may carry a fault point that ends a service when reached."""

    def __init__(self, folder: Path) -> None:
        # VMs stay up across the restarts, as under systemd, and are adopted again.
        self.env = {**launcher_env(folder), "VERS_KEEP_VMS_RUNNING": "true"}
        self.data = Path(self.env["VERS_DATA_DIR"])
        self.launched: Launched | None = None

    async def start(self, fault: str | None) -> None:
        env = {**self.env, "VERS_FAULT_POINT": fault} if fault else self.env
        self.launched = await asyncio.to_thread(Launched, env)

    async def dies(self, request: Awaitable[httpx.Response]) -> None:
        """The call reaches the fault point: a service ends, and the platform with it."""
        assert self.launched is not None
        with contextlib.suppress(httpx.TransportError):
            answer = await request
            assert answer.status_code >= 500, answer.text
        assert await asyncio.to_thread(self.launched.process.wait, 60) == 1

    def client(self, key: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.env["VERS_URL"], headers={"Authorization": f"Bearer {key}"}, timeout=120)

    def admin_key(self) -> str:
        return Settings(data_dir=self.data).admin_key_file.read_text().strip()

    def close(self) -> None:
        if self.launched is not None and self.launched.process.poll() is None:
            self.launched.stop()
        kill_vms_under(Settings(data_dir=self.data).vm_run_dir)


@pytest_asyncio.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    site = Site(tmp_path)
    yield site
    await asyncio.to_thread(site.close)


async def check_settled(http: httpx.AsyncClient, site: Site, crashed: Crashed) -> None:
    """Finished (tag, commit and VM there) or wholly undone (no VM, commit, tag or repository of it left)."""
    outcome = FORK_FAULTS[crashed.fault][2]
    vms, commits = await owned(http)
    tag = await http.get(f"/api/v1/repositories/{crashed.body['repo_name']}/tags/{crashed.body['tag_name']}")
    if outcome == "finished":
        assert tag.status_code == 200, (crashed.fault, tag.text)
        commit_id = tag.json()["commit_id"]
        [vm] = vms - crashed.before[0]
        assert commits - crashed.before[1] == {commit_id}
        assert (await http.get(f"/api/v1/vm/{vm}/metadata")).json()["parent_commit_id"] == commit_id
        assert (await http.get(f"/api/v1/vm/{vm}/status")).json()["state"] == "running"
        assert fork_request(site.data, crashed.saga_id) == ("done", True, True)
    else:
        assert (await http.get(f"/api/v1/repositories/{crashed.body['repo_name']}")).status_code == 404, crashed.fault
        assert (vms, commits) == crashed.before, crashed.fault
        assert fork_request(site.data, crashed.saga_id)[0] == "abandoned"  # type: ignore[index]
    await asyncio.to_thread(fsck, site.env)


async def test_forks_and_a_repository_delete_killed_at_each_step_are_settled_on_restart(site: Site) -> None:
    """Each start settles what the last crash left, then a fork (or, last, a repository delete) dies at
    the start's own fault point; the last start has none. Then the same forks are asked for again."""
    crashed: Crashed | None = None
    await site.start(next(iter(FORK_FAULTS)))
    publisher, _, _ = (site.data / "first-org.key").read_text().partition(" ")
    async with site.client(site.launched.api_key) as http:  # type: ignore[union-attr]
        await publish(http)
    async with site.client(site.admin_key()) as admin:
        forker = (await admin.post("/api/v1/admin/orgs", json={"name": "forker"})).json()["token"]

    for index, fault in enumerate(FORK_FAULTS):
        if index:
            await site.start(fault)
        async with site.client(forker) as http:
            await settled(site.data)
            if crashed is not None:
                await check_settled(http, site, crashed)
            body = fork_body(publisher, f"repo-{index}", "v1")
            before = await owned(http)
            await site.dies(http.post("/api/v1/repositories/fork", json=body))
        [(saga_id, kind, step, _)] = sagas(site.data)
        expected_step, expected_fork, _ = FORK_FAULTS[fault]
        assert (kind, step, fork_request(site.data, str(saga_id))) == ("fork", expected_step, expected_fork), fault
        crashed = Crashed(fault, str(saga_id), body, before)

    await site.start("repo_delete.after_tags")
    async with site.client(forker) as http:
        await settled(site.data)
        await check_settled(http, site, crashed)  # type: ignore[arg-type]
        commit = next(iter((await owned(http))[1]))
        assert (await http.post("/api/v1/repositories", json={"name": "doomed"})).status_code == 201
        assert (await http.post("/api/v1/repositories/doomed/tags", json={"tag_name": "x", "commit_id": commit})).status_code == 201
        await site.dies(http.delete("/api/v1/repositories/doomed"))
    [(_, kind, step, payload)] = sagas(site.data)
    assert (kind, step, json.loads(str(payload))["repo_name"]) == ("repo_delete", "tags_deleted", "doomed")

    await site.start(None)
    async with site.client(forker) as http:
        await settled(site.data)
        assert (await http.get("/api/v1/repositories/doomed")).status_code == 404
        await asyncio.to_thread(fsck, site.env)
        assert "doomed:x" not in await references(site, http, commit)
        # Made again under its name, the repository starts empty.
        assert (await http.post("/api/v1/repositories", json={"name": "doomed"})).status_code == 201
        assert (await http.get("/api/v1/repositories/doomed/tags")).json()["tags"] == []
        for index, (fault, (_, _, outcome)) in enumerate(FORK_FAULTS.items()):
            again = await http.post("/api/v1/repositories/fork", json=fork_body(publisher, f"repo-{index}", "v1"))
            # An undone fork can be asked for again; a finished one holds its tag.
            assert again.status_code == (201 if outcome == "undone" else 409), (fault, again.text)

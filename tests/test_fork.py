"""Fork across organisations with real VMs: a running copy-on-write VM, a commit owned by the forker."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
import pytest_asyncio

from tests.conftest import Org, Platform

pytestmark = pytest.mark.vm


@dataclass
class Source:
    org: Org
    http: httpx.AsyncClient
    vm_id: str
    commit_id: str


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def source(platform: Platform) -> AsyncIterator[Source]:
    """acme publishes base:latest, a commit with a file and a running counter; base-private stays private."""
    org = await platform.new_org("publisher")
    async with platform.client(org) as http:
        vm = (await http.post("/api/v1/vm/new_root?wait_boot=true", json={"vm_config": {}})).json()["vm_id"]
        script = "echo upstream > /root/origin; (i=0; while :; do i=$((i+1)); echo $i > /run/counter; sleep 0.1; done) >/dev/null 2>&1 &"
        await http.post(f"/api/v1/vm/{vm}/exec", json={"command": ["sh", "-c", script]})
        await asyncio.sleep(0.5)
        commit = (await http.post(f"/api/v1/vm/{vm}/commit", json={"name": "base"})).json()["commit_id"]
        for repo, public in (("base", True), ("base-private", False)):
            await http.post("/api/v1/repositories", json={"name": repo})
            await http.patch(f"/api/v1/repositories/{repo}/visibility", json={"is_public": public})
            await http.post(f"/api/v1/repositories/{repo}/tags", json={"tag_name": "latest", "commit_id": commit})
        yield Source(org, http, vm, commit)


def fork_body(source: Source, repo: str = "base", **target: str) -> dict[str, str]:
    return {"source_org": source.org.name, "source_repo": repo, "source_tag": "latest", **target}


async def sh(http: httpx.AsyncClient, vm: str, script: str) -> str:
    return (await http.post(f"/api/v1/vm/{vm}/exec", json={"command": ["sh", "-c", script]})).json()["stdout"].strip()


async def test_fork_copies_the_running_vm_into_the_forkers_org(platform: Platform, source: Source, other_org: Org) -> None:
    async with platform.client(other_org) as http:
        answer = await http.post("/api/v1/repositories/fork", json=fork_body(source))
        assert answer.status_code == 201, answer.text
        fork = answer.json()
        assert (fork["repo_name"], fork["tag_name"], fork["reference"]) == ("base", "latest", "base:latest")
        assert await sh(http, fork["vm_id"], "cat /root/origin") == "upstream"
        first = int(await sh(http, fork["vm_id"], "cat /run/counter"))
        await asyncio.sleep(0.4)
        assert int(await sh(http, fork["vm_id"], "cat /run/counter")) > first, "the forked process does not run"
        commit = (await http.get(f"/api/v1/commits/{fork['commit_id']}")).json()
        assert commit["owner_id"] == other_org.id
        assert commit["commit_id"] != source.commit_id
        assert (await http.get("/api/v1/repositories/base/tags/latest")).json()["commit_id"] == fork["commit_id"]
        # the VM starts from the org's own copy, never naming the other org's commit
        assert (await http.get(f"/api/v1/vm/{fork['vm_id']}/metadata")).json()["parent_commit_id"] == fork["commit_id"]
        restored = (await http.post("/api/v1/vm/from_commit", json={"ref": "base:latest"})).json()["vm_id"]
        assert await sh(http, restored, "cat /root/origin") == "upstream"
        for vm in (restored, fork["vm_id"]):
            await http.delete(f"/api/v1/vm/{vm}")


async def test_fork_of_a_private_or_missing_repository_is_404(platform: Platform, source: Source, other_org: Org) -> None:
    async with platform.client(other_org) as http:
        private = await http.post("/api/v1/repositories/fork", json=fork_body(source, "base-private"))
        missing = await http.post("/api/v1/repositories/fork", json=fork_body(source, "no-such"))
        tagless = await http.post("/api/v1/repositories/fork", json={**fork_body(source), "source_tag": "nope"})
        assert private.status_code == missing.status_code == tagless.status_code == 404
        assert (await http.get("/api/v1/vm")).json() == []


async def test_fork_into_an_existing_repository_adds_the_tag(platform: Platform, source: Source, other_org: Org) -> None:
    async with platform.client(other_org) as http:
        await http.post("/api/v1/repositories", json={"name": "my-base"})
        answer = await http.post("/api/v1/repositories/fork", json=fork_body(source, repo_name="my-base", tag_name="v0"))
        assert answer.status_code == 201
        assert [t["tag_name"] for t in (await http.get("/api/v1/repositories/my-base/tags")).json()["tags"]] == ["v0"]
        await http.delete(f"/api/v1/vm/{answer.json()['vm_id']}")


async def test_existing_tag_name_is_409_with_nothing_created(platform: Platform, source: Source, other_org: Org) -> None:
    async with platform.client(other_org) as http:
        first = (await http.post("/api/v1/repositories/fork", json=fork_body(source, repo_name="taken"))).json()
        vms_before = (await http.get("/api/v1/vm")).json()
        commits_before = (await http.get("/api/v1/commits")).json()["total"]
        again = await http.post("/api/v1/repositories/fork", json=fork_body(source, repo_name="taken"))
        assert again.status_code == 409
        assert "--tag-name" in again.json()["error"]
        assert (await http.get("/api/v1/vm")).json() == vms_before
        assert (await http.get("/api/v1/commits")).json()["total"] == commits_before
        await http.delete(f"/api/v1/vm/{first['vm_id']}")


async def test_two_concurrent_forks_into_one_new_repository(platform: Platform, source: Source, other_org: Org) -> None:
    async with platform.client(other_org) as http:
        answers = await asyncio.gather(
            *(http.post("/api/v1/repositories/fork", json=fork_body(source, repo_name="together", tag_name=tag)) for tag in ("a", "b"))
        )
        assert [a.status_code for a in answers] == [201, 201], [a.text for a in answers]
        tags = (await http.get("/api/v1/repositories/together/tags")).json()["tags"]
        assert sorted(t["tag_name"] for t in tags) == ["a", "b"]
        assert [r["name"] for r in (await http.get("/api/v1/repositories")).json()["repositories"]].count("together") == 1
        for answer in answers:
            await http.delete(f"/api/v1/vm/{answer.json()['vm_id']}")


async def test_the_fork_is_independent_of_its_source(platform: Platform, source: Source) -> None:
    forker = await platform.new_org("forker")
    async with platform.client(forker) as http:
        answer = await http.post("/api/v1/repositories/fork", json=fork_body(source, repo_name="mine"))
        assert answer.status_code == 201, answer.text
        fork = answer.json()
    upstream = source.http
    await upstream.patch("/api/v1/repositories/base/tags/latest", json={"description": "moved on"})
    scratch = (await upstream.post(f"/api/v1/vm/{source.vm_id}/commit", json={"name": "newer"})).json()["commit_id"]
    await upstream.patch("/api/v1/repositories/base/tags/latest", json={"commit_id": scratch})
    async with platform.client(forker) as http:
        assert (await http.get("/api/v1/repositories/mine/tags/latest")).json()["commit_id"] == fork["commit_id"]
        assert await sh(http, fork["vm_id"], "cat /root/origin") == "upstream"
        again = (await http.post("/api/v1/vm/from_commit", json={"commit_id": fork["commit_id"]})).json()["vm_id"]
        assert await sh(http, again, "cat /root/origin") == "upstream"
        for vm in (again, fork["vm_id"]):
            await http.delete(f"/api/v1/vm/{vm}")


async def counts_on(http: httpx.AsyncClient, vm: str, at_least: int) -> None:
    """The commit's counter runs on in the VM, from where it was (or later)."""
    first = int(await sh(http, vm, "cat /run/counter"))
    assert first >= at_least
    await asyncio.sleep(0.4)
    assert int(await sh(http, vm, "cat /run/counter")) > first, "the forked process does not run"


async def test_a_fork_is_a_copy_that_outlives_its_source_and_the_source_outlives_it(platform: Platform, source: Source) -> None:
    """A fork's commit is a copy in the forker's org with its own id, sharing the source's files: deleting the
    copy leaves the source whole, and the source's owner deleting its commit leaves the copy whole."""
    upstream = source.http
    at_commit = int(await sh(upstream, source.vm_id, "echo short-lived > /root/origin; sync; cat /run/counter"))
    commit = (await upstream.post(f"/api/v1/vm/{source.vm_id}/commit", json={"name": "short-lived"})).json()["commit_id"]
    assert (await upstream.post("/api/v1/repositories", json={"name": "short-lived"})).status_code == 201
    assert (await upstream.patch("/api/v1/repositories/short-lived/visibility", json={"is_public": True})).status_code == 200
    tagged = await upstream.post("/api/v1/repositories/short-lived/tags", json={"tag_name": "latest", "commit_id": commit})
    assert tagged.status_code == 201, tagged.text
    forker = await platform.new_org("copier")
    async with platform.client(forker) as http:
        forks = []
        for tag in ("first", "second"):
            answer = await http.post("/api/v1/repositories/fork", json=fork_body(source, "short-lived", repo_name="copies", tag_name=tag))
            assert answer.status_code == 201, answer.text
            forks.append(answer.json())
        first, second = forks
        for fork in forks:
            copy = (await http.get(f"/api/v1/commits/{fork['commit_id']}")).json()
            assert copy["owner_id"] == forker.id and copy["commit_id"] != commit
        assert first["commit_id"] != second["commit_id"]

        # The forker deletes its first copy (VM, tag, commit): the source's commit still branches, whole.
        assert (await http.delete(f"/api/v1/vm/{first['vm_id']}")).status_code == 200
        assert (await http.delete("/api/v1/repositories/copies/tags/first")).status_code == 204
        assert (await http.delete(f"/api/v1/commits/{first['commit_id']}")).status_code == 204
    branched = await upstream.post("/api/v1/vm/from_commit", json={"commit_id": commit})
    assert branched.status_code == 201, branched.text
    assert await sh(upstream, branched.json()["vm_id"], "cat /root/origin") == "short-lived"
    await counts_on(upstream, branched.json()["vm_id"], at_commit)
    assert (await upstream.delete(f"/api/v1/vm/{branched.json()['vm_id']}")).status_code == 200

    # The source's owner deletes its tag and commit: the second copy still branches, its state intact.
    assert (await upstream.delete("/api/v1/repositories/short-lived/tags/latest")).status_code == 204
    assert (await upstream.delete(f"/api/v1/commits/{commit}")).status_code == 204
    async with platform.client(forker) as http:
        assert await sh(http, second["vm_id"], "cat /root/origin") == "short-lived"
        assert (await http.delete(f"/api/v1/vm/{second['vm_id']}")).status_code == 200
        again = await http.post("/api/v1/vm/from_commit", json={"commit_id": second["commit_id"]})
        assert again.status_code == 201, again.text
        assert await sh(http, again.json()["vm_id"], "cat /root/origin") == "short-lived"
        await counts_on(http, again.json()["vm_id"], at_commit)
        assert (await http.delete(f"/api/v1/vm/{again.json()['vm_id']}")).status_code == 200

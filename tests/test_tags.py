"""Repository tags, history, public tags, legacy tags and references, on real commits."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
import pytest_asyncio

from tests.conftest import Org, Platform

pytestmark = pytest.mark.vm


@dataclass
class Commits:
    org: Org
    http: httpx.AsyncClient
    vm_id: str
    first: str
    second: str


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def commits(platform: Platform) -> AsyncIterator[Commits]:
    """Two commits of one VM: /root/version says 1 in the first, 2 in the second."""
    org = await platform.new_org("tagger")
    async with platform.client(org) as http:
        vm = (await http.post("/api/v1/vm/new_root?wait_boot=true", json={"vm_config": {}})).json()["vm_id"]
        ids = []
        for version in (1, 2):
            await http.post(f"/api/v1/vm/{vm}/exec", json={"command": ["sh", "-c", f"echo {version} > /root/version; sync"]})
            ids.append((await http.post(f"/api/v1/vm/{vm}/commit", json={"name": f"v{version}"})).json()["commit_id"])
        yield Commits(org, http, vm, *ids)


async def new_repo(http: httpx.AsyncClient, name: str, public: bool = False) -> None:
    assert (await http.post("/api/v1/repositories", json={"name": name})).status_code == 201
    if public:
        await http.patch(f"/api/v1/repositories/{name}/visibility", json={"is_public": True})


async def version_of(http: httpx.AsyncClient, vm_id: str) -> str:
    answer = await http.post(f"/api/v1/vm/{vm_id}/exec", json={"command": ["cat", "/root/version"]})
    return answer.json()["stdout"].strip()


async def test_tag_rows_of_the_documentation(commits: Commits) -> None:
    http = commits.http
    await new_repo(http, "my-app")
    created = await http.post(
        "/api/v1/repositories/my-app/tags", json={"tag_name": "latest", "commit_id": commits.first, "description": "trunk"}
    )
    assert created.status_code == 201
    body = created.json()
    assert (body["commit_id"], body["reference"]) == (commits.first, "my-app:latest")
    listed = (await http.get("/api/v1/repositories/my-app/tags")).json()
    assert listed["repository"] == "my-app"
    assert [t["tag_name"] for t in listed["tags"]] == ["latest"]
    tag = (await http.get("/api/v1/repositories/my-app/tags/latest")).json()
    assert set(tag) == {"tag_id", "tag_name", "commit_id", "reference", "description", "created_at", "updated_at"}
    assert (tag["tag_id"], tag["description"]) == (body["tag_id"], "trunk")
    moved = await http.patch("/api/v1/repositories/my-app/tags/latest", json={"commit_id": commits.second})
    assert moved.status_code == 200
    assert moved.json()["commit_id"] == commits.second
    described = (await http.patch("/api/v1/repositories/my-app/tags/latest", json={"description": "release"})).json()
    assert (described["commit_id"], described["description"]) == (commits.second, "release")
    assert (await http.delete("/api/v1/repositories/my-app/tags/latest")).status_code == 204
    assert (await http.get("/api/v1/repositories/my-app/tags/latest")).status_code == 404
    assert (await http.get(f"/api/v1/commits/{commits.first}")).status_code == 200, "deleting a tag keeps the commit"


async def test_duplicate_tag_is_409_and_names_are_checked(commits: Commits) -> None:
    http = commits.http
    await new_repo(http, "dups")
    await http.post("/api/v1/repositories/dups/tags", json={"tag_name": "v1", "commit_id": commits.first})
    again = await http.post("/api/v1/repositories/dups/tags", json={"tag_name": "v1", "commit_id": commits.second})
    assert again.status_code == 409
    assert (await http.get("/api/v1/repositories/dups/tags/v1")).json()["commit_id"] == commits.first
    for bad in ("", "x" * 129, "a:b", "a/b", "spa ce"):
        answer = await http.post("/api/v1/repositories/dups/tags", json={"tag_name": bad, "commit_id": commits.first})
        assert answer.status_code == 400, bad
        assert "1-128 characters" in answer.json()["error"]
    assert (await http.post("/api/v1/repositories/dups/tags", json={"tag_name": "x" * 128, "commit_id": commits.first})).status_code == 201


async def test_history_lists_every_change_newest_first(commits: Commits) -> None:
    http = commits.http
    await new_repo(http, "hist")
    await http.post("/api/v1/repositories/hist/tags", json={"tag_name": "latest", "commit_id": commits.first})
    await http.patch("/api/v1/repositories/hist/tags/latest", json={"commit_id": commits.second})
    await http.delete("/api/v1/repositories/hist/tags/latest")
    history = (await http.get("/api/v1/repositories/hist/tags/latest/history")).json()
    assert history["reference"] == "hist:latest"
    steps = [(e["action"], e["old_commit_id"], e["new_commit_id"]) for e in history["events"]]
    assert steps == [
        ("deleted", commits.second, ""),
        ("moved", commits.first, commits.second),
        ("created", "", commits.first),
    ]
    assert all(e["org_id"] == commits.org.id for e in history["events"])


async def test_concurrent_moves_are_atomic_and_none_is_lost(commits: Commits) -> None:
    http = commits.http
    await new_repo(http, "race")
    await http.post("/api/v1/repositories/race/tags", json={"tag_name": "latest", "commit_id": commits.first})
    targets = [commits.second if i % 2 else commits.first for i in range(200)]
    answers = await asyncio.gather(*(http.patch("/api/v1/repositories/race/tags/latest", json={"commit_id": target}) for target in targets))
    assert all(a.status_code == 200 for a in answers)
    events = (await http.get("/api/v1/repositories/race/tags/latest/history?page_size=1000")).json()["events"]
    assert len(events) == 201
    final = (await http.get("/api/v1/repositories/race/tags/latest")).json()["commit_id"]
    assert final == events[0]["new_commit_id"]
    for newer, older in itertools.pairwise(events):
        assert newer["old_commit_id"] == older["new_commit_id"], "a move was lost between two history events"


async def test_only_own_commits_can_be_tagged(platform: Platform, commits: Commits, other_org: Org) -> None:
    async with platform.client(other_org) as http:
        await new_repo(http, "mine")
        answer = await http.post("/api/v1/repositories/mine/tags", json={"tag_name": "stolen", "commit_id": commits.first})
        legacy = await http.post("/api/v1/commit_tags", json={"tag_name": "stolen", "commit_id": commits.first})
    assert answer.status_code == legacy.status_code == 404
    assert "fork it first" in answer.json()["error"]


async def test_refs_restore_and_branch(commits: Commits) -> None:
    http = commits.http
    await new_repo(http, "app")
    await http.post("/api/v1/repositories/app/tags", json={"tag_name": "latest", "commit_id": commits.first})
    restored = (await http.post("/api/v1/vm/from_commit", json={"ref": "app:latest"})).json()["vm_id"]
    assert await version_of(http, restored) == "1"
    await http.patch("/api/v1/repositories/app/tags/latest", json={"commit_id": commits.second})
    branched = (await http.post("/api/v1/vm/branch/by_ref/app/latest")).json()["vms"][0]["vm_id"]
    assert await version_of(http, branched) == "2"
    for ref, hint in (
        ("App:latest", "not found"),
        ("app:Latest", "not found"),
        ("app:latest@x", "1-128"),
        ("app", "repo:tag"),
        (f"{commits.org.name}/app:latest", "fork it first"),
    ):
        answer = await http.post("/api/v1/vm/from_commit", json={"ref": ref})
        assert answer.status_code in (400, 404), ref
        assert hint in answer.json()["error"], (ref, answer.json())
    for vm in (restored, branched):
        await http.delete(f"/api/v1/vm/{vm}")


async def test_legacy_commit_tags(commits: Commits) -> None:
    http = commits.http
    created = await http.post("/api/v1/commit_tags", json={"tag_name": "old-style", "commit_id": commits.first, "description": "pre-repos"})
    assert created.status_code == 201
    assert created.json()["tag_name"] == "old-style"
    listed = (await http.get("/api/v1/commit_tags")).json()["tags"]
    assert [t["tag_name"] for t in listed] == ["old-style"]
    assert set(listed[0]) == {"tag_id", "tag_name", "commit_id", "description", "created_at", "updated_at"}
    moved = (await http.patch("/api/v1/commit_tags/old-style", json={"commit_id": commits.second})).json()
    assert moved["commit_id"] == commits.second
    vm = (await http.post("/api/v1/vm/from_commit", json={"tag_name": "old-style"})).json()["vm_id"]
    assert await version_of(http, vm) == "2"
    by_tag = (await http.post("/api/v1/vm/branch/by_tag/old-style")).json()["vms"][0]["vm_id"]
    assert await version_of(http, by_tag) == "2"
    for each in (vm, by_tag):
        await http.delete(f"/api/v1/vm/{each}")
    assert (await http.get("/api/v1/commit_tags/old-style")).json()["description"] == "pre-repos"
    assert (await http.delete("/api/v1/commit_tags/old-style")).status_code == 204
    assert (await http.get("/api/v1/commit_tags/old-style")).status_code == 404


async def test_tagged_commit_cannot_be_deleted(commits: Commits) -> None:
    http = commits.http
    vm = (await http.post(f"/api/v1/vm/{commits.vm_id}/commit", json={"name": "temp"})).json()
    commit = vm["commit_id"]
    await new_repo(http, "keeper")
    await http.post("/api/v1/repositories/keeper/tags", json={"tag_name": "pin", "commit_id": commit})
    await http.post("/api/v1/commit_tags", json={"tag_name": "pin-legacy", "commit_id": commit})
    refused = await http.delete(f"/api/v1/commits/{commit}")
    assert refused.status_code == 409
    assert "keeper:pin" in refused.json()["error"] and "pin-legacy" in refused.json()["error"]
    await http.delete("/api/v1/commit_tags/pin-legacy")
    assert (await http.delete("/api/v1/repositories/keeper")).status_code == 204
    assert (await http.get(f"/api/v1/commits/{commit}")).status_code == 200, "deleting a repo keeps its commits"
    assert (await http.delete(f"/api/v1/commits/{commit}")).status_code == 204


async def test_recreated_repository_starts_empty(commits: Commits) -> None:
    http = commits.http
    await new_repo(http, "phoenix")
    await http.post("/api/v1/repositories/phoenix/tags", json={"tag_name": "latest", "commit_id": commits.first})
    await http.delete("/api/v1/repositories/phoenix")
    await new_repo(http, "phoenix")
    assert (await http.get("/api/v1/repositories/phoenix/tags")).json()["tags"] == []


async def test_public_tags(platform: Platform, commits: Commits, other_org: Org) -> None:
    http = commits.http
    await new_repo(http, "shared", public=True)
    await new_repo(http, "hidden")
    for repo in ("shared", "hidden"):
        await http.post(f"/api/v1/repositories/{repo}/tags", json={"tag_name": "latest", "commit_id": commits.first})
    owner = commits.org.name
    async with platform.client(other_org) as other:
        listed = await other.get(f"/api/v1/public/repositories/{owner}/shared/tags")
        assert listed.status_code == 200
        assert listed.json()["repository"] == f"{owner}/shared"
        assert [t["commit_id"] for t in listed.json()["tags"]] == [commits.first]
        one = await other.get(f"/api/v1/public/repositories/{owner}/shared/tags/latest")
        assert one.json()["commit_id"] == commits.first
        for path in (f"{owner}/hidden/tags", f"{owner}/hidden/tags/latest", f"{owner}/shared/tags/nope"):
            assert (await other.get(f"/api/v1/public/repositories/{path}")).status_code == 404
        # public does not mean shared: the other org still cannot restore or tag it directly
        assert (await other.post("/api/v1/vm/from_commit", json={"commit_id": commits.first})).status_code == 404
        assert (await other.post("/api/v1/vm/from_commit", json={"ref": f"{owner}/shared:latest"})).status_code == 400


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/api/v1/repositories/my-app/tags", None),
        ("POST", "/api/v1/repositories/my-app/tags", {"tag_name": "x", "commit_id": "y"}),
        ("GET", "/api/v1/repositories/my-app/tags/latest", None),
        ("PATCH", "/api/v1/repositories/my-app/tags/latest", {"description": "x"}),
        ("DELETE", "/api/v1/repositories/my-app/tags/latest", None),
        ("GET", "/api/v1/repositories/my-app/tags/latest/history", None),
        ("GET", "/api/v1/public/repositories/acme/my-app/tags", None),
        ("GET", "/api/v1/public/repositories/acme/my-app/tags/latest", None),
        ("GET", "/api/v1/commit_tags", None),
        ("POST", "/api/v1/commit_tags", {"tag_name": "x", "commit_id": "y"}),
        ("GET", "/api/v1/commit_tags/x", None),
        ("PATCH", "/api/v1/commit_tags/x", {"description": "x"}),
        ("DELETE", "/api/v1/commit_tags/x", None),
        ("POST", "/api/v1/repositories/fork", {"source_org": "a", "source_repo": "b", "source_tag": "c"}),
        ("POST", "/api/v1/vm/branch/by_ref/my-app/latest", None),
        ("POST", "/api/v1/vm/branch/by_tag/x", None),
    ],
)
@pytest.mark.parametrize("header", [None, "Bearer vers_wrong"])
async def test_tag_paths_need_a_valid_key(platform: Platform, method: str, path: str, body: object, header: str | None) -> None:
    headers = {"Authorization": header} if header else {}
    async with platform.client(**headers) as http:
        answer = await http.request(method, path, json=body)
    assert answer.status_code == 401


async def test_other_org_cannot_see_or_change_private_tags(platform: Platform, commits: Commits, other_org: Org) -> None:
    http = commits.http
    await new_repo(http, "private-tags")
    await http.post("/api/v1/repositories/private-tags/tags", json={"tag_name": "latest", "commit_id": commits.first})
    await http.post("/api/v1/commit_tags", json={"tag_name": "private-legacy", "commit_id": commits.first})
    async with platform.client(other_org) as other:
        for method, path, body in (
            ("GET", "/api/v1/repositories/private-tags/tags", None),
            ("GET", "/api/v1/repositories/private-tags/tags/latest", None),
            ("PATCH", "/api/v1/repositories/private-tags/tags/latest", {"description": "mine now"}),
            ("DELETE", "/api/v1/repositories/private-tags/tags/latest", None),
            ("GET", "/api/v1/repositories/private-tags/tags/latest/history", None),
            ("GET", "/api/v1/commit_tags/private-legacy", None),
            ("DELETE", "/api/v1/commit_tags/private-legacy", None),
            ("POST", "/api/v1/vm/branch/by_ref/private-tags/latest", None),
            ("POST", "/api/v1/vm/branch/by_tag/private-legacy", None),
        ):
            assert (await other.request(method, path, json=body)).status_code == 404, path
    assert (await http.get("/api/v1/repositories/private-tags/tags/latest")).json()["description"] == ""
    await http.delete("/api/v1/commit_tags/private-legacy")


async def test_typical_workflow_release_tagging_and_rollback(commits: Commits) -> None:
    """repositories.md, "Typical Workflows" and "Release tagging", over REST with real VMs."""
    http = commits.http
    await new_repo(http, "release-app")
    await new_repo(http, "internal-tools")
    for repo in ("release-app", "internal-tools"):  # one commit, tagged in two repositories
        await http.post(f"/api/v1/repositories/{repo}/tags", json={"tag_name": "latest", "commit_id": commits.first})
    await http.post("/api/v1/repositories/release-app/tags", json={"tag_name": "known-good", "commit_id": commits.first})
    dev = (await http.post("/api/v1/vm/from_commit", json={"ref": "release-app:latest"})).json()["vm_id"]
    assert await version_of(http, dev) == "1"
    # after a successful release build
    await http.post("/api/v1/repositories/release-app/tags", json={"tag_name": "v1.4.2", "commit_id": commits.second})
    await http.patch("/api/v1/repositories/release-app/tags/latest", json={"commit_id": commits.second})
    newer = (await http.post("/api/v1/vm/from_commit", json={"ref": "release-app:latest"})).json()["vm_id"]
    assert await version_of(http, newer) == "2"
    assert (await http.get("/api/v1/repositories/internal-tools/tags/latest")).json()["commit_id"] == commits.first
    # roll back latest in a pinch: the previous commit is one history lookup away
    history = (await http.get("/api/v1/repositories/release-app/tags/latest/history")).json()["events"]
    previous = history[0]["old_commit_id"]
    await http.patch("/api/v1/repositories/release-app/tags/latest", json={"commit_id": previous})
    rolled_back = (await http.post("/api/v1/vm/from_commit", json={"ref": "release-app:latest"})).json()["vm_id"]
    assert await version_of(http, rolled_back) == "1"
    assert await version_of(http, dev) == "1", "moving a tag touches no VM"
    for vm in (dev, newer, rolled_back):
        await http.delete(f"/api/v1/vm/{vm}")

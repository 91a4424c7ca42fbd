"""Read-then-write under concurrency on PostgreSQL, whose READ COMMITTED transactions run side by side (SQLite's
writes run one at a time): many clients at once through the REST API of a running platform. A quota lets
exactly its limit through; moves of one tag leave a history where each move starts where the one before ended."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections import Counter

import httpx
import pytest

from services.common.db import Database
from services.orchestrator.models import CommitRow
from tests.conftest import Org, Platform

CLIENTS = 30
SHAPE = {"vcpu_count": 1, "mem_size_mib": 128, "fs_size_mib": 1024, "image_name": "default", "kernel_path": "k", "initramfs_path": "i"}


@pytest.fixture
def platform(postgres_platform: Platform) -> Platform:
    return postgres_platform


async def _limit(platform: Platform, org: Org, **limits: int) -> None:
    async with platform.client(Authorization=f"Bearer {platform.admin_key}") as admin:
        answer = await admin.patch(f"/api/v1/admin/orgs/{org.name}/limits", json=limits)
    assert answer.status_code == 200, answer.text
    await asyncio.sleep(platform.settings.auth_cache_seconds + 0.1)  # the services learn the limits with the caller's key


async def _commits(platform: Platform, org: Org, count: int) -> list[str]:
    """Commits of the org, as rows: what the tags name (no VM needs to run for these tests)."""
    ids = [str(uuid.uuid4()) for _ in range(count)]
    db = Database(platform.settings.database_url("orchestrator"))
    async with db.write() as session:
        for number, commit_id in enumerate(ids):
            session.add(
                CommitRow(id=commit_id, org_id=org.id, name=f"c{number}", layer_id=f"layer-{commit_id}", ram_format="file", **SHAPE)
            )
    await db.close()
    return ids


async def _at_once(platform: Platform, org: Org, requests: list[tuple[str, str, dict[str, str]]]) -> list[httpx.Response]:
    async with platform.client(org) as http:
        return list(await asyncio.gather(*(http.request(method, path, json=body) for method, path, body in requests)))


async def test_repository_quota_lets_exactly_its_limit_through(platform: Platform) -> None:
    org = await platform.new_org("quota")
    await _limit(platform, org, max_repositories=7)
    answers = await _at_once(platform, org, [("POST", "/api/v1/repositories", {"name": f"repo-{n}"}) for n in range(CLIENTS)])
    assert Counter(answer.status_code for answer in answers) == {201: 7, 429: CLIENTS - 7}
    async with platform.client(org) as http:
        assert len((await http.get("/api/v1/repositories")).json()["repositories"]) == 7


async def test_tag_quota_lets_exactly_its_limit_through(platform: Platform) -> None:
    org = await platform.new_org("tags")
    (commit,) = await _commits(platform, org, 1)
    async with platform.client(org) as http:
        assert (await http.post("/api/v1/repositories", json={"name": "app"})).status_code == 201
    await _limit(platform, org, max_tags=5)
    answers = await _at_once(
        platform, org, [("POST", "/api/v1/repositories/app/tags", {"tag_name": f"v{n}", "commit_id": commit}) for n in range(CLIENTS)]
    )
    assert Counter(answer.status_code for answer in answers) == {201: 5, 429: CLIENTS - 5}, [
        a.text for a in answers if a.status_code >= 500
    ]


async def test_concurrent_moves_of_one_tag_make_one_chain(platform: Platform) -> None:
    org = await platform.new_org("moves")
    commits = await _commits(platform, org, 4)
    async with platform.client(org) as http:
        assert (await http.post("/api/v1/repositories", json={"name": "app"})).status_code == 201
        assert (await http.post("/api/v1/repositories/app/tags", json={"tag_name": "latest", "commit_id": commits[0]})).status_code == 201
    targets = [commits[1 + n % 3] for n in range(CLIENTS)]
    answers = await _at_once(
        platform, org, [("PATCH", "/api/v1/repositories/app/tags/latest", {"commit_id": target}) for target in targets]
    )
    assert [answer.status_code for answer in answers] == [200] * CLIENTS, [answer.text for answer in answers if answer.status_code != 200]
    async with platform.client(org) as http:
        events = (await http.get("/api/v1/repositories/app/tags/latest/history", params={"page_size": 100})).json()["events"]
        final = (await http.get("/api/v1/repositories/app/tags/latest")).json()["commit_id"]
    assert len(events) == CLIENTS + 1 and events[-1]["action"] == "created"
    assert Counter(event["new_commit_id"] for event in events[:-1]) == Counter(targets), "a move is missing from the history"
    assert final == events[0]["new_commit_id"]
    for newer, older in itertools.pairwise(events):
        assert newer["old_commit_id"] == older["new_commit_id"], "two moves started from the same commit"

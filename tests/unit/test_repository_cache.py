"""The tagging service's cache of the registry's repository answers (services/tagging/repositories.py): an answer
is reused for its TTL by the same org only, a refusal is never kept, forgetting an org takes effect at once (even
for a lookup in flight then), and a TTL of 0 asks every time. Time is a clock the test moves."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable

import pytest

from services.common.errors import NotFound
from services.tagging.repositories import RecentRepositories
from vers.registry.v1 import registry_pb2

TTL = 1.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Registry:
    """Answers GetRepository for each org's own repositories, counting what it is asked."""

    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], str] = {}
        self.asked: Counter[tuple[str, str]] = Counter()

    def asker(self, org_id: str, name: str) -> Callable[[], Awaitable[registry_pb2.Repository]]:
        async def ask() -> registry_pb2.Repository:
            self.asked[(org_id, name)] += 1
            repo_id = self.repos.get((org_id, name))
            if repo_id is None:
                raise NotFound(f"repository {name!r} not found in your organization")
            return registry_pb2.Repository(repo_id=repo_id, name=name)

        return ask


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def registry() -> Registry:
    registry = Registry()
    registry.repos[("org-a", "app")] = "repo-of-a"
    registry.repos[("org-b", "app")] = "repo-of-b"
    return registry


async def get(cache: RecentRepositories, registry: Registry, org_id: str, name: str = "app") -> str:
    return (await cache.get(org_id, name, registry.asker(org_id, name))).repo_id


async def test_an_answer_is_reused_until_it_lapses(clock: Clock, registry: Registry) -> None:
    cache = RecentRepositories(TTL, clock)
    assert [await get(cache, registry, "org-a") for _ in range(3)] == ["repo-of-a"] * 3
    assert registry.asked[("org-a", "app")] == 1
    clock.now += TTL + 0.01
    registry.repos[("org-a", "app")] = "repo-of-a-again"
    assert await get(cache, registry, "org-a") == "repo-of-a-again"
    assert registry.asked[("org-a", "app")] == 2


async def test_orgs_never_share_an_answer(clock: Clock, registry: Registry) -> None:
    cache = RecentRepositories(TTL, clock)
    assert await get(cache, registry, "org-a") == "repo-of-a"
    assert await get(cache, registry, "org-b") == "repo-of-b"
    with pytest.raises(NotFound):
        await get(cache, registry, "org-c")  # a third org with no such repository is asked about, and refused
    assert registry.asked == Counter({("org-a", "app"): 1, ("org-b", "app"): 1, ("org-c", "app"): 1})


async def test_a_refusal_is_not_kept(clock: Clock, registry: Registry) -> None:
    cache = RecentRepositories(TTL, clock)
    with pytest.raises(NotFound):
        await get(cache, registry, "org-a", "new")
    registry.repos[("org-a", "new")] = "made-since"
    assert await get(cache, registry, "org-a", "new") == "made-since"


async def test_forgetting_an_org_takes_effect_at_once(clock: Clock, registry: Registry) -> None:
    cache = RecentRepositories(TTL, clock)
    await get(cache, registry, "org-a")
    await get(cache, registry, "org-b")
    del registry.repos[("org-a", "app")]
    cache.forget_org("org-a")
    with pytest.raises(NotFound):
        await get(cache, registry, "org-a")
    assert await get(cache, registry, "org-b") == "repo-of-b"  # another org's answer stays
    assert registry.asked[("org-b", "app")] == 1


async def test_a_lookup_in_flight_when_the_org_is_forgotten_is_not_kept(clock: Clock, registry: Registry) -> None:
    cache = RecentRepositories(TTL, clock)
    answered, release = asyncio.Event(), asyncio.Event()

    async def slow() -> registry_pb2.Repository:
        answered.set()
        await release.wait()
        return registry_pb2.Repository(repo_id="before-deletion", name="app")

    lookup = asyncio.create_task(cache.get("org-a", "app", slow))
    await answered.wait()
    cache.forget_org("org-a")
    release.set()
    assert (await lookup).repo_id == "before-deletion"  # the caller that asked before gets its answer
    assert await get(cache, registry, "org-a") == "repo-of-a"  # but the next one asks again
    assert registry.asked[("org-a", "app")] == 1


async def test_a_ttl_of_zero_asks_every_time(clock: Clock, registry: Registry) -> None:
    cache = RecentRepositories(0, clock)
    for _ in range(3):
        await get(cache, registry, "org-a")
    assert registry.asked[("org-a", "app")] == 3

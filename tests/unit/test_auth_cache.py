"""The bearer-token cache in front of the registry (services/common/auth.py CachedResolver): a resolved token
is trusted for its TTL, a refused one is remembered longer, and at most NEGATIVE_CACHE_ENTRIES refusals are kept,
the least recently seen dropped first. Time is a clock the test moves."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest

from services.common import auth
from services.common.auth import CachedResolver, Principal
from services.common.errors import Unauthenticated, Unavailable
from services.common.quotas import OrgLimits
from services.common.settings import Settings

TTL = 5.0
NEGATIVE_TTL = 30.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


class Registry:
    """Answers as the registry's Authenticate would, counting the tokens it is asked about."""

    def __init__(self, known: set[str]) -> None:
        self.known = known
        self.asked: Counter[str] = Counter()
        self.down = False

    async def resolve(self, token: str) -> Principal:
        self.asked[token] += 1
        if self.down:
            raise Unavailable("cannot check the API key: registry answered UNAVAILABLE")
        if token not in self.known:
            raise Unauthenticated(f"invalid API key {token[:4]}…")
        return Principal(f"org-of-{token}", "acme", f"key-of-{token}", "ci", False, token)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(auth, "time", SimpleNamespace(monotonic=clock.monotonic))  # auth.py's clock only
    return clock


@pytest.fixture
def registry() -> Registry:
    return Registry({"good", "other"})


@pytest.fixture
def cached(registry: Registry, clock: Clock) -> CachedResolver:
    return CachedResolver(registry, TTL, NEGATIVE_TTL)


async def refused(resolver: CachedResolver, token: str) -> str:
    with pytest.raises(Unauthenticated) as error:
        await resolver.resolve(token)
    return error.value.message


async def test_a_resolved_token_is_trusted_for_the_ttl(cached: CachedResolver, registry: Registry, clock: Clock) -> None:
    first = await cached.resolve("good")
    clock.now += TTL - 0.1
    assert await cached.resolve("good") == first
    assert registry.asked["good"] == 1
    clock.now += 0.1  # expired: asked again
    assert await cached.resolve("good") == first
    assert registry.asked["good"] == 2


async def test_tokens_are_cached_each_on_its_own(cached: CachedResolver, registry: Registry) -> None:
    assert (await cached.resolve("good")).org_id == "org-of-good"
    assert (await cached.resolve("other")).org_id == "org-of-other"
    assert (await cached.resolve("good")).org_id == "org-of-good"
    assert registry.asked == Counter({"good": 1, "other": 1})


async def test_a_refused_token_is_refused_again_without_asking_until_it_expires(
    cached: CachedResolver, registry: Registry, clock: Clock
) -> None:
    message = await refused(cached, "bad")
    assert message == "invalid API key bad…"
    clock.now += NEGATIVE_TTL - 0.1
    assert await refused(cached, "bad") == message
    assert registry.asked["bad"] == 1
    registry.known.add("bad")  # a key made since: seen once the refusal expires
    clock.now += 0.1
    assert (await cached.resolve("bad")).key_id == "key-of-bad"
    assert registry.asked["bad"] == 2


async def test_refusals_are_not_remembered_with_a_zero_negative_ttl(registry: Registry, clock: Clock) -> None:
    uncached = CachedResolver(registry, TTL, 0)
    await refused(uncached, "bad")
    await refused(uncached, "bad")
    assert registry.asked["bad"] == 2


async def test_a_registry_that_cannot_answer_is_asked_again_next_time(cached: CachedResolver, registry: Registry) -> None:
    registry.down = True
    for _ in range(2):
        with pytest.raises(Unavailable):
            await cached.resolve("good")
    registry.down = False
    assert (await cached.resolve("good")).org_id == "org-of-good"
    assert registry.asked["good"] == 3


async def test_refusals_kept_are_bounded_and_the_least_recently_seen_goes_first(
    cached: CachedResolver, registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(auth, "NEGATIVE_CACHE_ENTRIES", 3)
    for token in ("bad-1", "bad-2", "bad-3"):
        await refused(cached, token)
    await refused(cached, "bad-1")  # seen again: now the most recent
    await refused(cached, "bad-4")  # one too many: bad-2, the least recently seen, is dropped
    assert registry.asked == Counter({"bad-1": 1, "bad-2": 1, "bad-3": 1, "bad-4": 1})
    for token in ("bad-1", "bad-3", "bad-4"):
        await refused(cached, token)
    assert sum(registry.asked.values()) == 4  # all three still remembered
    await refused(cached, "bad-2")
    assert registry.asked["bad-2"] == 2


async def test_the_negative_ttl_defaults_to_the_setting(registry: Registry, clock: Clock) -> None:
    default = CachedResolver(registry, TTL)
    await refused(default, "bad")
    clock.now += Settings().auth_negative_cache_seconds - 0.1
    await refused(default, "bad")
    assert registry.asked["bad"] == 1
    clock.now += 0.1
    await refused(default, "bad")
    assert registry.asked["bad"] == 2


class EnrichingRegistry(Registry):
    """The registry's answer for a service token: the org's name and limits, when it can be asked."""

    limits: OrgLimits | None = OrgLimits(1, 2, 3, 4, 5, 6, 7, 8, 9, 10)

    async def service_principal(self, principal: Principal) -> Principal:
        self.asked[principal.token] += 1
        return Principal(principal.org_id, "acme", "platform", "platform service", False, principal.token, True, self.limits)


async def test_a_service_principal_is_enriched_once_per_ttl_when_limits_are_known(clock: Clock) -> None:
    registry = EnrichingRegistry(set())
    cached = CachedResolver(registry, TTL, NEGATIVE_TTL)
    bare = Principal("org-1", "", "platform", "platform service", False, "vers-svc.org-1.sig", is_service=True)
    assert (await cached.service_principal(bare)).limits == registry.limits
    assert (await cached.service_principal(bare)).org_name == "acme"
    assert registry.asked[bare.token] == 1
    clock.now += TTL
    await cached.service_principal(bare)
    assert registry.asked[bare.token] == 2
    registry.limits = None  # the registry could not say: not kept, asked again next time
    other = Principal("org-2", "", "platform", "platform service", False, "vers-svc.org-2.sig", is_service=True)
    await cached.service_principal(other)
    await cached.service_principal(other)
    assert registry.asked[other.token] == 2


async def test_a_service_principal_stays_as_it_is_without_an_enriching_registry(cached: CachedResolver) -> None:
    bare = Principal("org-1", "", "platform", "platform service", False, "vers-svc.org-1.sig", is_service=True)
    assert await cached.service_principal(bare) is bare

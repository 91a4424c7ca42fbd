"""A key revoked in the process that caches it (the registry's own CachedResolver) stops working there at once,
whatever is left of its TTL, even when its lookup was in flight at the revocation; other keys stay trusted."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from services.common.auth import CachedResolver, Principal
from services.common.errors import Unauthenticated

TTL = 60.0  # far longer than any test: what lapses here is forgotten, not expired


class Registry:
    """Answers as the registry's store would, counting the tokens it is asked about."""

    def __init__(self, known: set[str]) -> None:
        self.known = known
        self.asked: Counter[str] = Counter()
        self.hold: asyncio.Event | None = None
        self.holding = asyncio.Event()

    async def resolve(self, token: str) -> Principal:
        self.asked[token] += 1
        if token not in self.known:
            raise Unauthenticated("invalid or revoked API key")
        principal = Principal(f"org-of-{token}", "acme", f"key-of-{token}", "ci", False, token)
        if self.hold is not None:
            self.holding.set()
            await self.hold.wait()
        return principal


@pytest.fixture
def registry() -> Registry:
    return Registry({"good", "other"})


async def test_a_revoked_key_stops_working_at_once(registry: Registry) -> None:
    cached = CachedResolver(registry, TTL, 0.0)
    await cached.resolve("good")
    await cached.resolve("other")
    registry.known.discard("good")
    cached.forget_key("key-of-good")
    with pytest.raises(Unauthenticated):
        await cached.resolve("good")
    assert (await cached.resolve("other")).key_id == "key-of-other"
    assert registry.asked == Counter({"good": 2, "other": 1})  # the other key is still answered from memory


async def test_a_lookup_in_flight_at_the_revocation_is_not_remembered(registry: Registry) -> None:
    cached = CachedResolver(registry, TTL, 0.0)
    registry.hold = asyncio.Event()
    lookup = asyncio.create_task(cached.resolve("good"))
    await registry.holding.wait()
    registry.known.discard("good")
    cached.forget_key("key-of-good")
    registry.hold.set()
    assert (await lookup).key_id == "key-of-good"  # the call that was checked before the revocation goes on
    registry.hold = None
    with pytest.raises(Unauthenticated):
        await cached.resolve("good")  # but the next one asks again, and is refused

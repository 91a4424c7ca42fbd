"""The registry's answers about the caller's repositories, kept for a moment so that reading a tag asks the
registry once in a while instead of on every call.

Only reads use it (a tag get, a tag list, a tag's history): what they take from the answer is the repository's
id and name. Every write (a tag made, moved or deleted) asks the registry afresh, since it also acts on the
repository's policy (its immutable tags). Entries are keyed by the caller's org, which the interceptor has
verified before any servicer runs, and the repository's name: one org's answer is never another's.

How stale an answer can be: VERS_REPOSITORY_CACHE_SECONDS at most (1 s by default; 0 turns the cache off).
A repository's deletion reaches this process as DeleteRepositoryTags, which forgets the org's answers at once,
including one whose lookup was in flight then; another tagging process (several replicas) forgets them when
they lapse. Within that bound a tag read may still find a repository whose deletion has just begun; its tags
go with it, so such a read answers what was there a moment before.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from vers.registry.v1 import registry_pb2

MAX_ENTRIES = 10_000


class RecentRepositories:
    def __init__(self, ttl_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl_seconds
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str], tuple[float, registry_pb2.Repository]] = OrderedDict()
        # Bumped by every `forget_org`: an answer asked for before it is not kept after it.
        self._generation = 0

    async def get(self, org_id: str, repo_name: str, ask: Callable[[], Awaitable[registry_pb2.Repository]]) -> registry_pb2.Repository:
        """The org's repository: a recent answer, or `ask`'s (the registry's), kept for `ttl` seconds.
        A refusal (not found, say) is never kept."""
        if self.ttl <= 0:
            return await ask()
        key = (org_id, repo_name)
        hit = self._entries.get(key)
        if hit is not None and hit[0] > self._clock():
            return hit[1]
        generation = self._generation
        repo = await ask()
        if generation == self._generation:
            self._entries[key] = (self._clock() + self.ttl, repo)
            self._entries.move_to_end(key)
            while len(self._entries) > MAX_ENTRIES:
                self._entries.popitem(last=False)
        return repo

    def forget_org(self, org_id: str) -> None:
        """Drop what is known of the org's repositories (one of them is going away)."""
        self._generation += 1
        for key in [key for key in self._entries if key[0] == org_id]:
            del self._entries[key]

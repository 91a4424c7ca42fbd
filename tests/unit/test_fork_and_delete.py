"""A repository a fork has made or chosen cannot be deleted before the fork tags it: the tag would be left
on a repository that is gone. The registry's store decides it, in transactions serialized on the name."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from services.common.db import Database
from services.common.errors import Conflict
from services.common.migrations import migrate
from services.common.quotas import OrgLimits
from services.common.settings import Settings
from services.registry.store import FORK, RegistryStore


@pytest_asyncio.fixture
async def store(tmp_path: Path) -> AsyncIterator[RegistryStore]:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}")
    await migrate(db, "registry")
    yield RegistryStore(db, OrgLimits.defaults(Settings()))
    await db.close()


async def test_a_repository_a_fork_is_tagging_is_not_deleted_until_the_fork_ends(store: RegistryStore) -> None:
    org, _ = await store.create_org("forker")
    source = {"source_org": "acme", "source_repo": "base", "source_tag": "latest", "repo_name": "mine", "tag_name": "v1"}
    saga = await store.begin_saga(FORK, org.id, "started", source)
    await store.fork_repository(saga.id, org.id, "mine")
    with pytest.raises(Conflict, match="a fork into repository 'mine' is under way"):
        await store.begin_repository_deletion(org.id, "mine")
    await store.finish_fork(saga.id)
    deletion = await store.begin_repository_deletion(org.id, "mine")  # the fork landed: the delete goes ahead
    assert deletion.org_id == org.id


async def test_another_repository_of_the_org_is_deleted_while_a_fork_runs(store: RegistryStore) -> None:
    org, _ = await store.create_org("busy")
    await store.create_repository(org.id, "other", "")
    saga = await store.begin_saga(FORK, org.id, "started", {"repo_name": "mine", "tag_name": "v1"})
    await store.fork_repository(saga.id, org.id, "mine")
    assert (await store.begin_repository_deletion(org.id, "other")).org_id == org.id

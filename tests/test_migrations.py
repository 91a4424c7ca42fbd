"""Schema migrations, on SQLite and PostgreSQL: each service's newest revision is exactly its models, and a
database the version before migrations made, with data in it, is adopted by a platform that then serves it."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, MetaData, Table

from services.common.audit import AuditEventRow
from services.common.auth import hash_token
from services.common.db import Database, execute_sql
from services.common.migrations import BASELINE, migrate, script_directory
from services.common.settings import SERVICES
from services.orchestrator.images_api import IMAGE_TABLES
from services.orchestrator.models import TABLES as ORCHESTRATOR_TABLES
from services.registry.models import TABLES as REGISTRY_TABLES
from services.tagging.models import TABLES as TAGGING_TABLES
from tests import conftest
from tests.conftest import BACKENDS, Platform, discard
from tests.postgres import TempPostgres

# What each service's models say its database holds.
MODELS: dict[str, list[Table]] = {
    "registry": REGISTRY_TABLES,
    "tagging": TAGGING_TABLES,
    "orchestrator": [*ORCHESTRATOR_TABLES, *IMAGE_TABLES, AuditEventRow.__table__],  # type: ignore[attr-defined]
}


@pytest.fixture(params=list(BACKENDS))
def new_database(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[str], str]:
    """Makes an empty database of the backend and gives its URL."""

    def make(name: str) -> str:
        if request.param == "sqlite":
            return f"sqlite+aiosqlite:///{tmp_path / name}.db"
        server: TempPostgres = request.getfixturevalue("postgres")
        return server.create_database(f"{name}_{uuid.uuid4().hex[:8]}")

    return make


def _differences(connection: Connection, tables: list[Table]) -> list[object]:
    metadata = MetaData()
    for table in tables:
        table.to_metadata(metadata)
    return list(compare_metadata(MigrationContext.configure(connection), metadata))


@pytest.mark.parametrize("service", SERVICES)
async def test_the_newest_revision_is_the_models(service: str, new_database: Callable[[str], str]) -> None:
    db = Database(new_database(service))
    try:
        await migrate(db, service)
        await migrate(db, service)  # a second start finds nothing to do
        async with db.read() as session:
            differences = await (await session.connection()).run_sync(_differences, MODELS[service])
    finally:
        await db.close()
    assert differences == [], f"the {service} models differ from its migrations: add a revision (README, PostgreSQL)"


async def _as_the_previous_version_made_it(url: str, service: str) -> Database:
    """The database as the version before migrations left it: its tables (revision 0001), no alembic_version."""
    db = Database(url)
    baseline = script_directory(service).get_revision(BASELINE)
    assert baseline is not None
    async with db.write() as session:
        await (await session.connection()).run_sync(baseline.module.create)
    return db


TOKEN = "vers_" + "k" * 43
COMMIT, VM = "c0000000-0000-4000-8000-000000000001", "d0000000-0000-4000-8000-000000000001"
NOW = "2026-11-20 10:00:00+00:00"
SHAPE = "1, 256, 1024, 'default', 'kernel', 'initramfs', 'nat'"
PREVIOUS_ROWS = {
    "registry": [
        f"INSERT INTO orgs (id, name, created_at, untagged_older_than_days, max_repositories) VALUES ('org-1', 'acme', '{NOW}', 0, 9)",
        f"INSERT INTO api_keys (id, org_id, label, token_hash, is_admin, created_at) VALUES "
        f"('key-1', 'org-1', 'laptop', '{hash_token(TOKEN)}', FALSE, '{NOW}')",
        "INSERT INTO repositories (id, org_id, name, description, is_public, created_at, immutable_tags, retention) VALUES "
        f"('repo-1', 'org-1', 'web', 'the site', FALSE, '{NOW}', '[]', '{{}}')",
        f"INSERT INTO audit_events (at, org_id, api_key_id, type, target, before, after) VALUES "
        f"('{NOW}', 'org-1', 'key-1', 'repository.create', 'web', '', '{{}}')",
    ],
    "tagging": [
        "INSERT INTO repo_tags (id, repo_id, repo_name, org_id, name, commit_id, description, created_at, updated_at) VALUES "
        f"('tag-1', 'repo-1', 'web', 'org-1', 'latest', '{COMMIT}', 'release', '{NOW}', '{NOW}')",
        "INSERT INTO tag_events (repo_id, tag_name, action, old_commit_id, new_commit_id, org_id, api_key_id, created_at) VALUES "
        f"('repo-1', 'latest', 'created', '', '{COMMIT}', 'org-1', 'key-1', '{NOW}')",
    ],
    "orchestrator": [
        f"INSERT INTO layers (id, parent_id, base_path, created_at) VALUES ('layer-1', NULL, '/nowhere/rootfs.qcow2', '{NOW}')",
        "INSERT INTO commits (vcpu_count, mem_size_mib, fs_size_mib, image_name, kernel_path, initramfs_path, network, id, org_id, "
        "name, description, created_at, layer_id, ram_format, checksums, size_bytes, is_public) VALUES "
        f"({SHAPE}, '{COMMIT}', 'org-1', 'first', 'made before the upgrade', '{NOW}', 'layer-1', 'file', '{{}}', 4096, FALSE)",
        "INSERT INTO vms (vcpu_count, mem_size_mib, fs_size_mib, image_name, kernel_path, initramfs_path, network, id, org_id, state, "
        "created_at, labels, layer_id, ram_mode, ram_source, pid) VALUES "
        f"({SHAPE}, '{VM}', 'org-1', 'dead', '{NOW}', '{{\"team\": \"web\"}}', 'layer-1', 'shared', '', 0)",
    ],
}


@pytest_asyncio.fixture
async def upgraded(new_database: Callable[[str], str], tmp_path: Path) -> AsyncIterator[Platform]:
    """A platform started on databases of the previous version holding an org, its key, a repository, a tag and
    its history, a commit and a VM."""
    urls = {f"{service}_database_url": new_database(service) for service in SERVICES}
    for service in SERVICES:
        db = await _as_the_previous_version_made_it(urls[f"{service}_database_url"], service)
        async with db.write() as session:
            for statement in PREVIOUS_ROWS[service]:
                await execute_sql(session, statement)
        await db.close()
    platform = await Platform.start(conftest.test_settings(tmp_path / "data").model_copy(update=urls))
    yield platform
    await platform.stop()
    discard(platform.settings.data_dir)


async def test_data_of_the_previous_version_reads_back_after_the_upgrade(upgraded: Platform) -> None:
    async with upgraded.client(Authorization=f"Bearer {TOKEN}") as http:
        who = (await http.get("/api/v1/whoami")).json()
        assert who["org"]["name"] == "acme" and who["limits"]["max_repositories"] == 9, who
        repositories = (await http.get("/api/v1/repositories")).json()["repositories"]
        assert [(r["name"], r["description"]) for r in repositories] == [("web", "the site")]
        tag = await http.get("/api/v1/repositories/web/tags/latest")
        assert tag.status_code == 200 and tag.json()["commit_id"] == COMMIT, tag.text
        history = (await http.get("/api/v1/repositories/web/tags/latest/history")).json()["events"]
        assert [(e["action"], e["new_commit_id"]) for e in history] == [("created", COMMIT)]
        commit = await http.get(f"/api/v1/commits/{COMMIT}")
        assert commit.status_code == 200 and commit.json()["name"] == "first", commit.text
        vm = await http.get(f"/api/v1/vm/{VM}/status")
        assert vm.status_code == 200 and (vm.json()["state"], vm.json()["labels"]) == ("dead", {"team": "web"}), vm.text
        audit = (await http.get("/api/v1/audit", params={"type": "repository"})).json()["events"]
        assert [(e["type"], e["target"]) for e in audit] == [("repository.create", "web")]
        # and the upgraded databases take new rows
        assert (await http.post("/api/v1/repositories", json={"name": "api"})).status_code == 201


async def test_a_database_made_before_a_column_existed_gets_it_with_its_default(tmp_path: Path) -> None:
    """Older still: a `vms` table without the `network` column (added while the previous version's start-up
    added missing columns itself) is given it, then stamped and upgraded."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"
    old = Database(url)
    async with old.write() as session:
        await execute_sql(session,
            "CREATE TABLE vms (id VARCHAR PRIMARY KEY, org_id VARCHAR NOT NULL, state VARCHAR NOT NULL, "
            "vcpu_count INTEGER NOT NULL, mem_size_mib INTEGER NOT NULL, fs_size_mib INTEGER NOT NULL, "
            "image_name VARCHAR NOT NULL, kernel_path VARCHAR NOT NULL, initramfs_path VARCHAR NOT NULL, "
            "created_at DATETIME NOT NULL, deleted_at DATETIME, labels VARCHAR NOT NULL, layer_id VARCHAR NOT NULL, "
            "ram_mode VARCHAR NOT NULL, ram_source VARCHAR NOT NULL, parent_commit_id VARCHAR, grandparent_vm_id VARCHAR, "
            "pid INTEGER NOT NULL)",
        )  # fmt: skip
        await execute_sql(session,
            "INSERT INTO vms VALUES ('vm-1', 'org', 'sleeping', 1, 256, 1024, 'default', 'k', 'i', "
            "'2026-11-01 00:00:00', NULL, '{}', 'layer', 'shared', '', NULL, NULL, 0)",
        )  # fmt: skip
    await old.close()

    upgraded = Database(url)
    await migrate(upgraded, "orchestrator")
    async with upgraded.read() as session:
        row = (await execute_sql(session, "SELECT id, network FROM vms")).one()
        tables = {name for (name,) in await execute_sql(session, "SELECT name FROM sqlite_master WHERE type = 'table'")}
    await upgraded.close()
    assert tuple(row) == ("vm-1", "")
    assert {"commits", "layers", "alembic_version"} <= tables


async def test_a_database_of_a_newer_version_is_refused_by_name(tmp_path: Path) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'newer.db'}")
    await migrate(db, "tagging")
    async with db.write() as session:
        await execute_sql(session, "UPDATE alembic_version SET version_num = '9999'")
    with pytest.raises(RuntimeError, match="schema revision 9999, which this version does not know"):
        await migrate(db, "tagging")
    await db.close()

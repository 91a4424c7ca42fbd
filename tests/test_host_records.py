"""The orchestrator's records of several hosts, without VMs: each host agent sees only its own VMs at start-up,
claims those whose disks it holds, heartbeats keep a host up, and a silent one is marked dead with its live VMs."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
import pytest_asyncio
from cryptography.fernet import Fernet

from services.common.db import Database
from services.common.errors import FailedPrecondition
from services.common.migrations import migrate
from services.common.timestamps import utcnow
from services.orchestrator.app import check_role
from services.orchestrator.engine import CACHE_EVICTION_SECONDS, Engine
from services.orchestrator.envvars import KEY_FILE, EnvVars
from services.orchestrator.hosts import HostTable
from services.orchestrator.models import HostRow, LayerRow, OperationRow, VmRow, VmState
from services.orchestrator.store import OrchestratorStore
from tests.conftest import test_settings as settings_in
from vers.orchestrator.v1 import hosts_pb2

ORG = "00000000-0000-0000-0000-0000000000aa"


@pytest_asyncio.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'orchestrator.db'}")
    await migrate(database, "orchestrator")
    yield database
    await database.close()


def store_of(db: Database, host: str) -> OrchestratorStore:
    return OrchestratorStore(db, max_vcpus=64, max_memory_mib=65536, host_id=host)


async def add_vm(store: OrchestratorStore, state: VmState = VmState.RUNNING) -> VmRow:
    layer = LayerRow(id=str(uuid.uuid4()))
    vm = VmRow(
        id=str(uuid.uuid4()), org_id=ORG, state=state, layer_id=layer.id, ram_mode="shared", vcpu_count=1, mem_size_mib=128,
        fs_size_mib=1024, image_name="default", kernel_path="", initramfs_path="",
    )  # fmt: skip
    await store.add_vms(ORG, [vm], [layer], OperationRow(id=str(uuid.uuid4()), vm_id=vm.id, kind="create"))
    return vm


def status(host: str, address: str, instance: str = "one") -> hosts_pb2.HostStatus:
    return hosts_pb2.HostStatus(host_id=host, address=address, instance=instance, room=hosts_pb2.HostRoom(memory_free_mib=512))


async def test_each_host_reconciles_only_its_own_vms(db: Database) -> None:
    a, b = store_of(db, "a"), store_of(db, "b")
    on_a, on_b = await add_vm(a), await add_vm(b)
    assert {vm.id for vm in await a.live_vms()} == {on_a.id}
    assert {vm.id for vm in await b.all_vms()} == {on_b.id}
    assert {op.vm_id for op in await a.operations()} == {on_a.id}


async def test_a_host_claims_the_vms_whose_disks_it_holds(db: Database) -> None:
    """A VM of a single-host platform (host "") is the first host agent's that holds its writable layer."""
    single = store_of(db, "")
    before = await add_vm(single)
    other = await add_vm(single, VmState.SLEEPING)
    agent = store_of(db, "node-1")
    assert await agent.claim_vms({before.layer_id, "some-frozen-layer"}) == [before.id]
    assert {vm.id for vm in await agent.live_vms()} == {before.id}
    assert {vm.id for vm in await single.all_vms()} == {other.id}


async def test_heartbeats_keep_a_host_up_and_a_silent_one_dies_with_its_live_vms(db: Database) -> None:
    table = HostTable(db, dead_after=5)
    await table.beat(status("a", "10.0.0.1:50054"))
    a = store_of(db, "a")
    running, sleeping = await add_vm(a), await add_vm(a, VmState.SLEEPING)
    assert [row.id for row in await table.live()] == ["a"]
    assert await table.sweep() == []
    async with db.write() as session:  # its last heartbeat, long ago
        row = await session.get(HostRow, "a")
        assert row is not None
        row.heartbeat_at = utcnow() - timedelta(seconds=60)
        session.add(row)
    assert await table.live() == []
    assert await table.sweep() == ["a"]
    assert (await a.get_vm(ORG, running.id)).state == VmState.DEAD
    assert (await a.get_vm(ORG, sleeping.id)).state == VmState.SLEEPING  # its memory is on a's disk: it waits for a
    await table.beat(status("a", "10.0.0.1:50054", instance="two"))  # a's agent started again
    assert [row.state for row in await table.hosts()] == ["up"]


async def test_a_live_hosts_name_is_not_taken_by_another_agent(db: Database) -> None:
    table = HostTable(db, dead_after=5)
    await table.beat(status("a", "10.0.0.1:50054"))
    with pytest.raises(FailedPrecondition, match="another VERS_HOST_ID"):
        await table.beat(status("a", "10.6.6.6:50054", instance="impostor"))
    await table.beat(status("a", "10.0.0.1:50054", instance="restarted"))  # the same agent, started again
    assert [row.address for row in await table.hosts()] == ["10.0.0.1:50054"]


async def test_a_host_lets_go_of_its_copies_of_what_the_store_no_longer_has(db: Database, tmp_path: Path) -> None:
    """Copies of a commit and of a layer another host deleted go once untouched for a while; what rows name stays."""
    store = tmp_path / "store"
    store.mkdir()
    settings = settings_in(tmp_path / "host").model_copy(update={"commit_store": str(store)})
    engine = Engine(settings, store_of(db, "a"))
    for folder in (engine.layout.commits, engine.layout.layers):
        folder.mkdir(parents=True)
    kept = await add_vm(store_of(db, "a"))
    old = time.time() - CACHE_EVICTION_SECONDS - 60
    deleted_commit, deleted_layer = engine.layout.commit_folder("gone"), engine.layout.layer_file("gone")
    fresh = engine.layout.commit_folder("being-copied")
    for path in (deleted_commit, fresh):
        path.mkdir()
    for path in (deleted_layer, engine.layout.layer_file(kept.layer_id)):
        path.write_bytes(b"qcow2")
    for path in (deleted_commit, deleted_layer, engine.layout.layer_file(kept.layer_id)):
        os.utime(path, (old, old))
    await engine.evict_cache()
    assert not deleted_commit.exists() and not deleted_layer.exists()
    assert fresh.exists() and engine.layout.layer_file(kept.layer_id).exists()


def test_a_role_of_several_hosts_needs_what_they_share(tmp_path: Path) -> None:
    """An agent with its own database, secret, key or commits would fail later in ways that look like damage."""
    alone = settings_in(tmp_path).model_copy(update={"orchestrator_role": "host"})
    with pytest.raises(RuntimeError) as refused:
        check_role(alone)
    for name in ("ORCHESTRATOR_DATABASE_URL", "VERS_SERVICE_SECRET", "VERS_COMMIT_STORE", "VERS_ENV_VARS_KEY"):
        assert name in str(refused.value)
    shared = {
        "orchestrator_database_url": "postgresql+asyncpg://vers@/orchestrator",
        "service_secret": "s" * 64,
        "commit_store": str(tmp_path),
        "env_vars_key": "k" * 44,
    }
    check_role(alone.model_copy(update=shared))
    check_role(settings_in(tmp_path))  # one host: nothing to share


def test_the_shared_environment_key_must_be_the_one_values_were_stored_with(db: Database, tmp_path: Path) -> None:
    settings = settings_in(tmp_path)
    (tmp_path / KEY_FILE).write_bytes(Fernet.generate_key())
    with pytest.raises(RuntimeError, match="not the key in"):
        EnvVars(settings.model_copy(update={"env_vars_key": Fernet.generate_key().decode()}), db).check_key()
    with pytest.raises(RuntimeError, match="not a Fernet key"):
        EnvVars(settings.model_copy(update={"env_vars_key": "secret"}), db).check_key()
    same = (tmp_path / KEY_FILE).read_text().strip()
    EnvVars(settings.model_copy(update={"env_vars_key": same}), db).check_key()


async def test_a_dead_host_is_removed_and_its_sleeping_vms_die_with_it(db: Database) -> None:
    table = HostTable(db, dead_after=5)
    await table.beat(status("gone", "10.0.0.9:50054"))
    store = store_of(db, "gone")
    sleeping = await add_vm(store, VmState.SLEEPING)
    with pytest.raises(FailedPrecondition, match="only a dead host is removed"):
        await table.remove("gone")
    async with db.write() as session:
        row = await session.get(HostRow, "gone")
        assert row is not None
        row.heartbeat_at = utcnow() - timedelta(seconds=60)
        session.add(row)
    assert await table.sweep() == ["gone"]
    assert (await store.get_vm(ORG, sleeping.id)).state == VmState.SLEEPING
    assert await table.remove("gone") == [sleeping.id]
    assert (await store.get_vm(ORG, sleeping.id)).state == VmState.DEAD
    assert await table.hosts() == []
    assert await table.remove("gone") == []  # forgotten already: nothing to do

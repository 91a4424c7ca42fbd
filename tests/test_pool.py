"""The pool of booted root VMs (VERS_ROOT_POOL_SIZE): a new root VM of the default shape is a VM the pool booted
before, taken by one organization for good and then indistinguishable from a fresh one (the org's variables in
its environment and its console's, its limits applied); other shapes boot as before; the pool refills behind,
gives way when a request needs its room, and leaves nothing behind when the engine stops."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import pytest_asyncio

from services.common.db import Database
from services.common.errors import NotFound, ResourceExhausted
from services.common.migrations import migrate
from services.orchestrator.engine import Engine
from services.orchestrator.machine import find_processes
from services.orchestrator.models import VmRow, VmState
from services.orchestrator.store import OrchestratorStore
from services.orchestrator.vmconfig import VmConfig
from tests import conftest

pytestmark = pytest.mark.vm

ORG, OTHER = "org-pooled", "org-other"
# The console shell's environment, read from the guest's own /proc: the processes reading the console.
CONSOLE_ENV = 'for f in /proc/[0-9]*/fd/0; do [ "$f" -ef /dev/hvc0 ] && tr "\\0" "\\n" < "${f%/fd/0}/environ"; done; true'


async def start(settings_dir: Path, **changes: object) -> tuple[Engine, Database]:
    settings = conftest.test_settings(settings_dir).model_copy(update={"root_pool_size": 1, **changes})
    db = Database(settings.database_url("orchestrator"))
    await migrate(db, "orchestrator")
    engine = Engine(settings, OrchestratorStore(db, max_vcpus=64, max_memory_mib=65536))
    await engine.start()
    return engine, db


@asynccontextmanager
async def running(settings_dir: Path, **changes: object) -> AsyncIterator[Engine]:
    """An engine as `start` makes it, stopped afterwards with every QEMU under its run folder, its data removed."""
    engine, db = await start(settings_dir, **changes)
    try:
        yield engine
    finally:
        conftest.kill_vms_under(engine.layout.run)
        await engine.close()
        await db.close()
        conftest.discard(engine.settings.data_dir)


@pytest_asyncio.fixture
async def engine(images: Path, tmp_path: Path) -> AsyncIterator[Engine]:
    async with running(tmp_path / "data") as engine:
        yield engine


async def pool_ready(engine: Engine, count: int = 1) -> list[str]:
    """The ids of the pool's VMs once it holds `count`."""
    async with asyncio.timeout(180):
        while engine.pool.ready < count:
            await asyncio.sleep(0.2)
    return [pooled.vm_id for pooled in engine.pool._pooled]


async def run(engine: Engine, vm: VmRow, script: str) -> str:
    result = await engine.machine(vm).agent.exec(["sh", "-c", script])
    assert result.exit_code == 0, result
    return result.stdout.decode()


async def test_a_new_root_vm_is_a_booted_one_of_the_pool_made_the_orgs_own(engine: Engine) -> None:
    await engine.env_vars.set(ORG, {"GREETING": "from-acme"}, replace=False)
    [pooled_id] = await pool_ready(engine)
    # The pool's VM waited long enough for its console to start without any organization's variables (vers-init
    # waits 30 s for them; told here they are written, it starts the console at once).
    pooled = engine.pool._pooled[0]
    await pooled.machine.agent.exec(["sh", "-c", "touch /run/vers/environment-ready; sleep 1"])
    assert "GREETING" not in (await pooled.machine.agent.exec(["sh", "-c", CONSOLE_ENV])).stdout.decode()

    vm = await engine.create_root(ORG, VmConfig(labels={"team": "a"}), wait_boot=True)
    assert vm.id == pooled_id and vm.state == VmState.RUNNING and vm.org_id == ORG
    assert engine.pool.ready == 0  # taken for good
    assert "GREETING='from-acme'" in await run(engine, vm, "cat /etc/environment")
    async with asyncio.timeout(30):  # the console started again with them
        while "GREETING=from-acme" not in await run(engine, vm, CONSOLE_ENV):
            await asyncio.sleep(0.5)
    row = await engine.store.get_vm(ORG, vm.id)
    assert row.labels == '{"team": "a"}' and row.image_name == "default"

    # Another org gets another VM: the pool's next, never this one.
    [next_id] = await pool_ready(engine)
    other = await engine.create_root(OTHER, VmConfig(), wait_boot=True)
    assert other.id == next_id != vm.id
    assert "GREETING" not in await run(engine, other, "cat /etc/environment; " + CONSOLE_ENV)

    # A shape other than the default boots as before, and the pool's VM stays.
    [kept] = await pool_ready(engine)
    bigger = await engine.create_root(ORG, VmConfig(mem_size_mib=384), wait_boot=True)
    assert bigger.id != kept and [p.vm_id for p in engine.pool._pooled] == [kept]
    for each in (vm, other, bigger):
        await engine.delete_vm(each)


async def test_an_org_at_its_limit_is_refused_and_the_pooled_vm_stays(engine: Engine) -> None:
    [pooled_id] = await pool_ready(engine)
    # the org may run 128 MiB at most: a default VM (256 MiB) is refused
    engine.store.default_limits = engine.store.default_limits.replace(max_memory_mib=128)
    with pytest.raises(ResourceExhausted):
        await engine.create_root(ORG, VmConfig(), wait_boot=True)
    assert [p.vm_id for p in engine.pool._pooled] == [pooled_id]
    assert await engine.store.vm(pooled_id) is None  # no row of it was kept


async def test_the_pool_gives_way_to_a_request_and_waits_for_room(images: Path, tmp_path: Path) -> None:
    # Room for the reserve and two 256 MiB VMs: the pool fills (its VM and one beside it fit), and a VM of
    # 512 MiB fits only once the pool's VM is let go; then the pool has no room to boot another.
    async with running(tmp_path / "data", host_reserve_memory_mib=1024, host_memory_mib=1024 + 512) as engine:
        [pooled_id] = await pool_ready(engine)
        pid = find_processes(engine.layout.run)[pooled_id]
        big = await engine.create_root(ORG, VmConfig(mem_size_mib=512), wait_boot=False)
        assert engine.pool.ready == 0
        async with asyncio.timeout(30):
            while pooled_id in find_processes(engine.layout.run) or engine.layout.run_folder(pooled_id).exists():
                await asyncio.sleep(0.2)
        assert not Path(f"/proc/{pid}").exists() or pooled_id not in find_processes(engine.layout.run)
        await asyncio.sleep(2)
        assert engine.pool.ready == 0 and engine.pool.memory_mib == 0  # no room for another beside the VM
        await engine.delete_vm(big)


async def test_a_stop_leaves_nothing_of_the_pool(images: Path, tmp_path: Path) -> None:
    engine, db = await start(tmp_path / "data")
    [pooled_id] = await pool_ready(engine)
    layer = engine.layout.layer_file(engine.pool._pooled[0].layer_id)
    assert layer.exists()
    await engine.close()
    await db.close()
    assert pooled_id not in find_processes(engine.layout.run)
    assert not layer.exists() and not engine.layout.run_folder(pooled_id).exists()
    conftest.discard(engine.settings.data_dir)


async def branch_pool_ready(engine: Engine, commit_id: str) -> str:
    """The id of the QEMU waiting for a branch of the commit, once there is one."""
    async with asyncio.timeout(60):
        while not (waiting := [p.vm_id for p in engine.branch_pool._pooled if p.key == commit_id]):
            await asyncio.sleep(0.1)
    return waiting[0]


async def test_a_branch_takes_a_qemu_waiting_for_its_commit(images: Path, tmp_path: Path) -> None:
    async def no_tags(org_id: str, commit_id: str) -> None:
        return None  # no tagging service here: no tag names the commits

    async with running(tmp_path / "data", root_pool_size=0, branch_pool_size=1, branch_pool_commits=1) as engine:
        engine.reserve_deletion = no_tags
        base = await engine.create_root(ORG, VmConfig(), wait_boot=True)
        await run(engine, base, "(i=0; while :; do i=$((i+1)); echo $i > /run/counter; sleep 0.1; done) >/dev/null 2>&1 &")
        await asyncio.sleep(0.5)
        first, _ = await engine.commit(base, "first", "", keep_paused=False)
        second, _ = await engine.commit(base, "second", "", keep_paused=False)
        [cold] = await engine.restore(ORG, first)  # the commit is branched: a QEMU starts to wait for the next
        waiting = await branch_pool_ready(engine, first.id)
        assert await engine.store.vm(waiting) is None  # no row: nobody's VM until taken
        [warm] = await engine.restore(ORG, first)
        assert warm.id == waiting and warm.parent_commit_id == first.id
        counted = int(await run(engine, warm, "cat /run/counter"))
        await asyncio.sleep(0.5)
        assert int(await run(engine, warm, "cat /run/counter")) > counted  # the commit's process runs on in it

        # One commit at a time (VERS_BRANCH_POOL_COMMITS=1): branching another lets the first's QEMU go.
        again = await branch_pool_ready(engine, first.id)
        [other] = await engine.restore(ORG, second)
        await branch_pool_ready(engine, second.id)
        assert engine.branch_pool._count(first.id) == 0
        async with asyncio.timeout(30):
            while again in find_processes(engine.layout.run):
                await asyncio.sleep(0.1)

        # A deleted commit's waiting QEMU goes with it, and its layer file.
        pending = engine.branch_pool._pooled[0]
        for vm in (cold, warm, other):
            await engine.delete_vm(vm)
        await engine.delete_commit(ORG, second.id)
        assert engine.branch_pool.ready == 0
        async with asyncio.timeout(30):
            while pending.vm_id in find_processes(engine.layout.run) or engine.layout.layer_file(pending.layer_id).exists():
                await asyncio.sleep(0.1)
        await engine.delete_vm(base)


async def test_a_branch_refused_as_its_commit_goes_leaves_no_waiting_qemu(images: Path, tmp_path: Path) -> None:
    """A branch that took the QEMU processes waiting for its commit, then found the commit being deleted (its row
    read a moment before the deletion began), stops them: none runs on unknown to the pool."""
    async with running(tmp_path / "data", root_pool_size=0, branch_pool_size=2, branch_pool_commits=1) as engine:
        base = await engine.create_root(ORG, VmConfig(), wait_boot=True)
        commit, _ = await engine.commit(base, "going", "", keep_paused=False)
        [cold] = await engine.restore(ORG, commit)
        async with asyncio.timeout(60):
            while engine.branch_pool._count(commit.id) < 2:
                await asyncio.sleep(0.1)
        waiting = [(pooled.vm_id, pooled.layer_id) for pooled in engine.branch_pool._pooled]
        await engine.delete_vm(cold)
        await engine.store.begin_commit_deletion(ORG, commit.id)
        with pytest.raises(NotFound):
            await engine.restore(ORG, commit, count=2)
        assert engine.branch_pool.ready == 0 and engine.branch_pool.memory_mib == 0
        async with asyncio.timeout(30):
            while any(vm_id in find_processes(engine.layout.run) or engine.layout.layer_file(layer).exists() for vm_id, layer in waiting):
                await asyncio.sleep(0.1)
        await engine.delete_vm(base)

"""The engine keeps one record per VM it has in hand, and none of a VM once it is gone: a record is made when
a VM's QEMU starts (or a change or a connection takes the VM up) and dropped when the QEMU has ended and
nothing holds the record, whether the VM was deleted, died or went to sleep."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio

from services.common.db import Database
from services.common.migrations import migrate
from services.orchestrator.engine import Engine
from services.orchestrator.models import VmState
from services.orchestrator.store import OrchestratorStore
from services.orchestrator.supervisor import Supervisor
from services.orchestrator.vmconfig import VmConfig
from tests import conftest

ORG = "org-supervised"


async def test_a_record_goes_when_the_last_holder_lets_go() -> None:
    supervisor = Supervisor()
    with supervisor.hold("vm-1", ORG) as first:
        with supervisor.hold("vm-1", ORG) as second:
            assert second is first  # one lock for every change of the VM
        assert "vm-1" in supervisor
    assert len(supervisor) == 0


@pytest_asyncio.fixture
async def engine(images: Path, tmp_path: Path) -> AsyncIterator[Engine]:
    settings = conftest.test_settings(tmp_path / "data")
    db = Database(settings.database_url("orchestrator"))
    await migrate(db, "orchestrator")
    engine = Engine(settings, OrchestratorStore(db, max_vcpus=64, max_memory_mib=65536))
    await engine.start()
    yield engine
    conftest.kill_vms_under(engine.layout.run)
    await engine.close()
    await db.close()
    conftest.discard(settings.data_dir)


async def test_no_record_is_left_of_a_deleted_or_dead_vm(engine: Engine) -> None:
    config = VmConfig(mem_size_mib=128, network="none")
    deleted = await engine.create_root(ORG, config, wait_boot=False)
    died = await engine.create_root(ORG, config, wait_boot=False)
    assert deleted.id in engine.supervisor and died.id in engine.supervisor

    await engine.delete_vm(deleted)
    assert deleted.id not in engine.supervisor

    os.kill(int((engine.layout.run_folder(died.id) / "qemu.pid").read_text()), signal.SIGKILL)
    async with asyncio.timeout(30):
        while (await engine.store.get_vm(ORG, died.id)).state != VmState.DEAD:
            await asyncio.sleep(0.05)
    assert len(engine.supervisor) == 0

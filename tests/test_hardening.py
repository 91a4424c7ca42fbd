"""A hostile guest against its host: QEMU runs as its own unprivileged user under seccomp (no new processes:
states go through descriptors the orchestrator opens), commits, branches and sleeps still work, and what a
guest writes to its serial port stays bounded."""

from __future__ import annotations

import asyncio
import os
import pwd
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests import conftest
from tests.conftest import Platform, kill_vms_under
from tests.test_vms import new_vm, out

SERIAL_LIMIT = 64 * 1024


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def hardened(images: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Platform]:
    """A platform of its own, whose serial logs are cut at SERIAL_LIMIT."""
    settings = conftest.test_settings(tmp_path_factory.mktemp("vers-hardened")).model_copy(update={"serial_log_max_bytes": SERIAL_LIMIT})
    platform = await Platform.start(settings)
    yield platform
    kill_vms_under(platform.settings.vm_run_dir)
    await asyncio.sleep(0.3)
    await platform.stop()


def status_of(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def private(path: Path) -> bool:
    return stat.S_IMODE(path.stat().st_mode) & 0o077 == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="QEMU changes user only when the platform runs as root")
async def test_qemu_runs_unprivileged_under_seccomp_and_still_commits_branches_and_sleeps(hardened: Platform) -> None:
    qemu_user = pwd.getpwnam(hardened.settings.qemu_user)  # scripts/bootstrap.sh makes it
    org = await hardened.new_org("hardened")
    async with hardened.client(org) as http:
        vm = await new_vm(http)
        status = status_of(hardened.vm_pid(vm))
        assert status["Uid"].split() == [str(qemu_user.pw_uid)] * 4, status["Uid"]
        assert status["Gid"].split()[0] == str(qemu_user.pw_gid)
        assert status["Seccomp"] == "2"  # filter mode
        assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0
        run = hardened.settings.vm_run_dir / vm
        assert private(run) and all(private(path) for path in run.iterdir() if not path.is_socket())

        await out(http, vm, "echo before > /root/mark")
        committed = await http.post(f"/api/v1/vm/{vm}/commit", json={"name": "hardened"})
        assert committed.status_code == 201, committed.text
        commit_id = committed.json()["commit_id"]
        commit_folder = hardened.settings.data_dir / "commits" / commit_id
        assert {path.name for path in commit_folder.iterdir()} >= {"state"}
        await out(http, vm, "echo after > /root/mark")  # the VM writes to its new layer

        answer = await http.post(f"/api/v1/vm/branch/by_commit/{commit_id}")
        assert answer.status_code == 201, answer.text
        branch = answer.json()["vms"][0]["vm_id"]
        assert await out(http, branch, "cat /root/mark") == "before\n"
        assert status_of(hardened.vm_pid(branch))["Uid"].split()[0] == str(qemu_user.pw_uid)
        assert await out(http, vm, "cat /root/mark") == "after\n"

        # a second commit freezes the layer the first one left the VM on
        second = await http.post(f"/api/v1/vm/{vm}/commit", json={"name": "again"})
        assert second.status_code == 201, second.text

        slept = await http.patch(f"/api/v1/vm/{vm}/state", json={"state": "Sleeping"})
        assert (slept.status_code, slept.json()["state"]) == (200, "sleeping"), slept.text
        woke = await http.patch(f"/api/v1/vm/{vm}/state", json={"state": "Running"})
        assert (woke.status_code, woke.json()["state"]) == (200, "running"), woke.text
        assert await out(http, vm, "echo $(( 6 * 7 )) && cat /root/mark") == "42\nafter\n"
        assert status_of(hardened.vm_pid(vm))["Uid"].split()[0] == str(qemu_user.pw_uid)


async def test_a_guest_writing_to_its_serial_port_forever_stays_within_the_log_limit(hardened: Platform) -> None:
    org = await hardened.new_org("serial")
    async with hardened.client(org) as http:
        vm = await new_vm(http)
        written = 8_000_000  # ~100 times the limit (20 MB takes minutes under TCG)
        answer = await http.post(
            f"/api/v1/vm/{vm}/exec",
            json={"command": ["sh", "-c", f"head -c {written} /dev/zero | tr '\\0' x > /dev/ttyS0"], "timeout_secs": 600},
        )
        assert answer.status_code == 200 and answer.json()["exit_code"] == 0, answer.text
        log = hardened.settings.vm_run_dir / vm / "serial.log"
        await asyncio.sleep(2.5)  # the log is checked every second
        size = log.stat().st_size
        assert 0 < size <= SERIAL_LIMIT, size
        assert log.read_bytes().endswith(b"x" * 1000)  # the newest output is what is kept
        assert await out(http, vm, "echo still here") == "still here\n"

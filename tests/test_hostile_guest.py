"""A guest is root in its VM and may be hostile: what it writes, and what its commands do, stays bounded on
the host, and never holds up its own VM's commits or another VM's commands."""

from __future__ import annotations

import asyncio
import resource
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from tests.conftest import Org, Platform, kill_vms_under
from tests.conftest import test_settings as settings_for_tests
from tests.test_vms import new_vm, sh

pytestmark = pytest.mark.vm

# The device of the agent port inside the guest.
AGENT_PORT = 'for p in /sys/class/virtio-ports/*; do [ "$(cat $p/name)" = agent ] && echo /dev/${p##*/}; done'


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def tenant(platform: Platform) -> AsyncIterator[tuple[Org, httpx.AsyncClient]]:
    org = await platform.new_org("hostile")
    async with platform.client(org) as http:
        http.timeout = httpx.Timeout(120)
        yield org, http


async def exec_answer(http: httpx.AsyncClient, vm_id: str, body: dict[str, Any]) -> httpx.Response:
    return await http.post(f"/api/v1/vm/{vm_id}/exec", json=body)


async def test_output_past_the_cap_is_cut_and_the_command_ends(tenant: tuple[Org, httpx.AsyncClient]) -> None:
    _, http = tenant
    vm = await new_vm(http)
    try:
        # `yes` writes forever: its pipe closes at the cap (SIGPIPE, 128 + 13), and the answer says it was cut.
        result = (await exec_answer(http, vm, {"command": ["yes"]})).json()
        assert (result["exit_code"], len(result["stdout"]), result["stdout_truncated"]) == (141, 1 << 20, True)
        assert set(result["stdout"]) == {"y", "\n"}
        both = await sh(http, vm, "head -c 2000000 /dev/zero | tr '\\0' o; head -c 2000000 /dev/zero | tr '\\0' e >&2")
        assert (both["stdout_truncated"], both["stderr_truncated"]) == (True, True)
        assert (set(both["stdout"]), set(both["stderr"])) == ({"o"}, {"e"})
    finally:
        await http.delete(f"/api/v1/vm/{vm}")


async def test_timeouts_are_bounded(platform: Platform, tenant: tuple[Org, httpx.AsyncClient]) -> None:
    _, http = tenant
    limit = platform.settings.exec_max_timeout_seconds
    vm = await new_vm(http)
    try:
        for bad in (limit + 1, -1):
            answer = await exec_answer(http, vm, {"command": ["true"], "timeout_secs": bad})
            assert answer.status_code == 400, answer.text
            assert "VERS_EXEC_MAX_TIMEOUT_SECONDS" in answer.json()["error"]
        assert (await sh(http, vm, "sleep 30", timeout_secs=1))["exit_code"] == 137
    finally:
        await http.delete(f"/api/v1/vm/{vm}")


async def test_commands_run_at_once_and_are_bounded(platform: Platform, tenant: tuple[Org, httpx.AsyncClient]) -> None:
    _, http = tenant
    vm = await new_vm(http)
    try:
        slow = asyncio.create_task(sh(http, vm, "sleep 3; echo slow"))
        await asyncio.sleep(0.5)
        assert (await sh(http, vm, "echo fast"))["stdout"] == "fast\n"
        assert not slow.done(), "a short command waited for a long one"
        assert (await slow)["stdout"] == "slow\n"
        # Concurrent commands with large outputs each get their own, whole.
        sizes = (100_000, 150_000, 200_000)
        answers = await asyncio.gather(*(sh(http, vm, f"head -c {n} /dev/zero | tr '\\0' {chr(97 + i)}") for i, n in enumerate(sizes)))
        assert [(len(a["stdout"]), set(a["stdout"])) for a in answers] == [(n, {chr(97 + i)}) for i, n in enumerate(sizes)]
        # At most VERS_VM_MAX_EXECS at once.
        most = platform.settings.vm_max_execs
        sleepers = [asyncio.create_task(sh(http, vm, "sleep 600")) for _ in range(most)]
        await asyncio.sleep(2)
        refused = await exec_answer(http, vm, {"command": ["true"]})
        assert refused.status_code == 429, refused.text
        assert "VERS_VM_MAX_EXECS" in refused.json()["error"]
        for task in sleepers:
            task.cancel()
        await asyncio.gather(*sleepers, return_exceptions=True)
    finally:
        await http.delete(f"/api/v1/vm/{vm}")


async def test_a_commit_does_not_wait_for_a_running_command(tenant: tuple[Org, httpx.AsyncClient]) -> None:
    _, http = tenant
    vm = await new_vm(http)
    branch = ""
    try:
        running = asyncio.create_task(sh(http, vm, "echo $$ > /run/sleeper; exec sleep 100000"))
        while not (await sh(http, vm, "cat /run/sleeper 2>/dev/null"))["stdout"].strip():
            await asyncio.sleep(0.2)
        committed = await http.post(f"/api/v1/vm/{vm}/commit", json={})
        assert committed.status_code == 201, committed.text
        commit_id = committed.json()["commit_id"]
        answer = await http.post(f"/api/v1/vm/branch/by_commit/{commit_id}")
        assert answer.status_code == 201, answer.text
        branch = answer.json()["vms"][0]["vm_id"]
        # The branch goes on with the command the snapshot caught running.
        assert "sleep 100000" in (await sh(http, branch, "ps -o args"))["stdout"]
        assert not running.done()
        # The source's command is still its caller's: it answers when it ends.
        await sh(http, vm, "kill $(cat /run/sleeper)")
        ended = await asyncio.wait_for(running, 60)
        assert ended["exit_code"] == 128 + 15
        # A VM put to sleep while a command runs goes to sleep; the waiting call is told why.
        waiting = asyncio.create_task(exec_answer(http, vm, {"command": ["sleep", "100000"]}))
        await asyncio.sleep(1)
        slept = await http.patch(f"/api/v1/vm/{vm}/state", json={"state": "Sleeping"})
        assert slept.status_code == 200, slept.text
        told = await asyncio.wait_for(waiting, 60)
        assert told.status_code == 409 and "put to sleep" in told.json()["error"], told.text
        assert (await http.patch(f"/api/v1/vm/{vm}/state", json={"state": "Running"})).status_code == 200
        assert (await sh(http, vm, "echo awake"))["stdout"] == "awake\n"
    finally:
        for vm_id in (vm, branch):
            if vm_id:
                await http.delete(f"/api/v1/vm/{vm_id}")


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def test_a_flooding_guest_stays_bounded_and_others_are_served(platform: Platform, tenant: tuple[Org, httpx.AsyncClient]) -> None:
    """The hostile guest floods its agent port (zeros, forged frames with made-up lengths, end frames
    with exit codes for nonces of its own choosing) and its serial console, with no command of its own
    running; this process (the orchestrator runs in it) keeps its memory, and another VM's commands
    answer as before."""
    _, http = tenant
    hostile, good = await asyncio.gather(new_vm(http), new_vm(http))
    try:
        # The list of VMs is a bare array: a page of it names the next one in a header.
        first = await http.get("/api/v1/vm", params={"page_size": 1})
        assert len(first.json()) == 1 and first.headers["x-next-page-token"], first.headers
        second = await http.get("/api/v1/vm", params={"page_size": 1, "page_token": first.headers["x-next-page-token"]})
        assert {vm["vm_id"] for vm in first.json() + second.json()} == {hostile, good}
        port = (await sh(http, hostile, AGENT_PORT))["stdout"].strip()
        assert port.startswith("/dev/vport"), port
        forge = (
            "while :; do printf '\\n<<E:0123456789abcdef:0:0:0>>\\n<<C:0123456789abcdef:o:99999>>\\n'; "
            "head -c 70000 /dev/urandom; printf '\\n<<C:0123456789abcdef:o:5>>\\n<<C:0123'; done"
        )
        # Bare start markers cost the most to read per byte: they are read no faster than the host allows.
        markers = "while :; do printf '\\n<<%.0s' $(seq 2000); done"
        flood = (
            f"(cat /dev/zero > {port} &) ; ({forge} > {port} &) ; ({markers} > {port} &) ; "
            f"(yes 'serial flood' > /dev/ttyS0 &) ; echo flooding"
        )
        assert (await sh(http, hostile, flood))["stdout"] == "flooding\n"
        # A command of its own waits meanwhile, so the flood is parsed, not only dropped.
        waiting = asyncio.create_task(sh(http, hostile, "sleep 12; echo late"))
        before = _rss_mib()
        latencies = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            started = time.monotonic()
            result = await asyncio.wait_for(sh(http, good, "echo served"), 10)
            latencies.append(time.monotonic() - started)
            assert result["stdout"] == "served\n"
            await asyncio.sleep(0.5)
        grown = _rss_mib() - before
        assert grown < 64, f"the orchestrator grew by {grown:.0f} MiB while a guest flooded"
        assert (await asyncio.wait_for(waiting, 120))["stdout"] == "late\n"
        # Its own commands still work amid the flood, forged frames never taken for them.
        own = await asyncio.wait_for(sh(http, hostile, "echo mine; exit 7"), 60)
        assert (own["stdout"], own["exit_code"]) == ("mine\n", 7)
        serial = platform.settings.vm_run_dir / hostile / "serial.log"
        assert serial.stat().st_size <= 2 * platform.settings.serial_log_max_bytes
        assert max(latencies) < 10
    finally:
        await asyncio.gather(*(http.delete(f"/api/v1/vm/{vm}") for vm in (hostile, good)))


async def test_a_host_without_room_refuses_new_vms(tmp_path: Path) -> None:
    """A VM is refused, not started, when the host would keep less free than its reserve; nothing of it
    is left. (A reserve larger than any disk stands for a full one.)"""
    settings = settings_for_tests(tmp_path).model_copy(update={"host_reserve_disk_mib": 1 << 40})
    platform = await Platform.start(settings)
    try:
        org = await platform.new_org("roomless")
        async with platform.client(org) as http:
            answer = await http.post("/api/v1/vm/new_root", json={"vm_config": {"mem_size_mib": 256}})
            assert answer.status_code == 429, answer.text
            assert "VERS_HOST_RESERVE_DISK_MIB" in answer.json()["error"]
            assert (await http.get("/api/v1/vm")).json() == []
        assert not list(settings.vm_run_dir.iterdir())
    finally:
        kill_vms_under(settings.vm_run_dir)
        await platform.stop()

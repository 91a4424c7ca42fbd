"""Real VMs through the REST gateway: boot, exec, commit (disk + memory), copy-on-write branches."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import websockets
from websockets.asyncio.client import ClientConnection

from tests.conftest import Org, Platform

pytestmark = pytest.mark.vm

COUNTER = "(i=0; while :; do i=$((i+1)); echo $i > /run/counter; sleep 0.1; done) >/dev/null 2>&1 &"


async def sh(http: httpx.AsyncClient, vm_id: str, script: str, **extra: Any) -> dict[str, Any]:
    answer = await http.post(f"/api/v1/vm/{vm_id}/exec", json={"command": ["sh", "-c", script], **extra})
    assert answer.status_code == 200, answer.text
    return answer.json()


async def out(http: httpx.AsyncClient, vm_id: str, script: str) -> str:
    result = await sh(http, vm_id, script)
    assert result["exit_code"] == 0, result
    return result["stdout"]


async def new_vm(http: httpx.AsyncClient, **config: Any) -> str:
    answer = await http.post("/api/v1/vm/new_root?wait_boot=true", json={"vm_config": config})
    assert answer.status_code == 201, answer.text
    return answer.json()["vm_id"]


async def counter(http: httpx.AsyncClient, vm_id: str) -> int:
    """The guest counter; read again while it is not there yet, or when the read falls between the
    truncation and the write of a tick."""
    for _ in range(50):
        result = await sh(http, vm_id, "cat /run/counter")
        if result["exit_code"] == 0 and result["stdout"].strip():
            return int(result["stdout"])
        await asyncio.sleep(0.1)
    raise AssertionError(f"/run/counter cannot be read: {result}")


async def counter_above(http: httpx.AsyncClient, vm_id: str, value: int, within: float = 60) -> int:
    """The counter once it passes `value`, or as it is after `within` seconds: a loaded host slows the guest,
    so a running VM is told by its counter moving, not by how far it moved in a set time."""
    deadline = time.monotonic() + within
    while (seen := await counter(http, vm_id)) <= value and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return seen


def most_ticks(running: float) -> int:
    """The most the counter can move in `running` seconds of host time: one tick per 0.1 s of guest time,
    which never runs ahead of the host's, plus the ticks under way at either end."""
    return int(running * 10) + 3


@dataclass
class Booted:
    org: Org
    http: httpx.AsyncClient
    vm_id: str
    commit_id: str
    counter_before_commit: int


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def booted(platform: Platform) -> AsyncIterator[Booted]:
    """One root VM with a file and a running counter, committed once; shared by the tests below."""
    org = await platform.new_org("vmtest")
    async with platform.client(org) as http:
        vm_id = await new_vm(http)
        await out(http, vm_id, "echo from-parent > /root/before-commit && " + COUNTER)
        # read before the commit is asked for: the counter the commit holds is at least this
        before_commit = await counter_above(http, vm_id, 5)
        assert before_commit > 5, "the counter does not run"
        committed = await http.post(f"/api/v1/vm/{vm_id}/commit", json={"name": "with counter"})
        assert committed.status_code == 201, committed.text
        yield Booted(org, http, vm_id, committed.json()["commit_id"], before_commit)


async def test_exec_answers_stdout_stderr_and_exit_code(booted: Booted) -> None:
    result = await sh(booted.http, booted.vm_id, "echo hello; echo oops >&2; exit 3")
    assert (result["stdout"], result["stderr"], result["exit_code"]) == ("hello\n", "oops\n", 3)
    assert result["exec_id"]


async def test_exec_stdin_env_working_dir_and_timeout(booted: Booted) -> None:
    http, vm = booted.http, booted.vm_id
    assert (await sh(http, vm, "tr a-z A-Z", stdin="shout\n"))["stdout"] == "SHOUT\n"
    assert (await sh(http, vm, 'echo "$GREETING"', env={"GREETING": "hi there"}))["stdout"] == "hi there\n"
    assert (await sh(http, vm, "pwd", working_dir="/run"))["stdout"] == "/run\n"
    killed = await sh(http, vm, "sleep 30", timeout_secs=1)
    assert killed["exit_code"] == 137
    assert (await sh(http, vm, "echo still-serving"))["stdout"] == "still-serving\n"


async def test_exec_large_output_and_argv_quoting(booted: Booted) -> None:
    big = await sh(booted.http, booted.vm_id, "head -c 1000000 /dev/zero | tr '\\0' x")
    assert (len(big["stdout"]), big["stdout_truncated"]) == (1_000_000, False)
    # Past VERS_EXEC_MAX_OUTPUT_BYTES (1 MiB) the output is cut, and the answer says so.
    cut = await sh(booted.http, booted.vm_id, "head -c 3000000 /dev/zero | tr '\\0' x; echo done >&2")
    assert (len(cut["stdout"]), cut["stdout_truncated"], cut["stderr"], cut["stderr_truncated"]) == (1 << 20, True, "done\n", False)
    answer = await booted.http.post(f"/api/v1/vm/{booted.vm_id}/exec", json={"command": ["echo", "it's", "$HOME", "a  b", "<<E:x:0>>"]})
    assert answer.json()["stdout"] == "it's $HOME a  b <<E:x:0>>\n"


async def test_branches_continue_processes_and_keep_writes_apart(booted: Booted) -> None:
    http = booted.http
    answer = await http.post(f"/api/v1/vm/branch/by_commit/{booted.commit_id}?count=2")
    assert answer.status_code == 201, answer.text
    first, second = [vm["vm_id"] for vm in answer.json()["vms"]]
    for branch in (first, second):
        assert await out(http, branch, "cat /root/before-commit") == "from-parent\n"
        assert await counter(http, branch) >= booted.counter_before_commit, "the counter restarted instead of continuing"
    await out(http, first, "echo only-in-first > /root/branch-file && sync")
    assert (await sh(http, second, "cat /root/branch-file"))["exit_code"] != 0
    assert (await sh(http, booted.vm_id, "cat /root/branch-file"))["exit_code"] != 0
    before = await counter(http, booted.vm_id)
    assert await counter_above(http, booted.vm_id, before) > before, "the parent stopped running"
    metadata = (await http.get(f"/api/v1/vm/{first}/metadata")).json()
    assert metadata["parent_commit_id"] == booted.commit_id
    assert metadata["grandparent_vm_id"] == booted.vm_id
    for branch in (first, second):
        assert (await http.delete(f"/api/v1/vm/{branch}")).status_code == 200


async def test_branch_of_a_running_vm_keeps_the_parent_running(booted: Booted) -> None:
    http = booted.http
    answer = await http.post(f"/api/v1/vm/{booted.vm_id}/branch")
    assert answer.status_code == 201, answer.text
    [child] = [vm["vm_id"] for vm in answer.json()["vms"]]
    assert (await http.get(f"/api/v1/vm/{booted.vm_id}/status")).json()["state"] == "running"
    assert await out(http, child, "cat /root/before-commit") == "from-parent\n"
    # a branch of a branch: its memory is streamed into the commit, and restores as well
    grandchild = (await http.post(f"/api/v1/vm/branch/by_vm/{child}")).json()["vms"][0]["vm_id"]
    assert await out(http, grandchild, "cat /root/before-commit") == "from-parent\n"
    lineage = (
        await http.get(f"/api/v1/vm/commits/{(await http.get(f'/api/v1/vm/{grandchild}/metadata')).json()['parent_commit_id']}/parents")
    ).json()
    assert len(lineage) == 2
    assert lineage[1]["parent_vm_id"] == booted.vm_id
    for vm in (grandchild, child):
        await http.delete(f"/api/v1/vm/{vm}")


async def test_pause_and_resume(booted: Booted) -> None:
    http, vm = booted.http, booted.vm_id
    asked = time.monotonic()
    before_pause = await counter(http, vm)
    paused = await http.patch(f"/api/v1/vm/{vm}/state", json={"state": "Paused"})
    running = time.monotonic() - asked
    assert paused.status_code == 200
    assert paused.json()["state"] == "paused"
    assert (await http.get(f"/api/v1/vm/{vm}/status")).json()["state"] == "paused"
    refused = await http.post(f"/api/v1/vm/{vm}/exec", json={"command": ["true"]})
    assert refused.status_code == 400
    assert "paused" in refused.json()["error"]
    await asyncio.sleep(1.0)
    asked = time.monotonic()
    resumed = await http.patch(f"/api/v1/vm/{vm}/state", json={"state": "Running"})
    assert resumed.json()["state"] == "running"
    first = await counter(http, vm)
    running += time.monotonic() - asked
    # 1 s paused would be ~10 more ticks of a running guest; a stopped one moved only while it ran
    assert first - before_pause <= most_ticks(running), (before_pause, first, running)
    assert await counter_above(http, vm, first) > first, "the VM did not run again"


async def test_commit_keep_paused(booted: Booted) -> None:
    http, vm = booted.http, booted.vm_id
    answer = await http.post(f"/api/v1/vm/{vm}/commit?keep_paused=true", json={})
    assert answer.status_code == 201
    assert (await http.get(f"/api/v1/vm/{vm}/status")).json()["state"] == "paused"
    await http.patch(f"/api/v1/vm/{vm}/state", json={"state": "Running"})
    await http.delete(f"/api/v1/commits/{answer.json()['commit_id']}")


async def test_restore_from_commit_and_commit_in_use(booted: Booted) -> None:
    http = booted.http
    restored = await http.post("/api/v1/vm/from_commit", json={"commit_id": booted.commit_id})
    assert restored.status_code == 201, restored.text
    vm = restored.json()["vm_id"]
    assert await out(http, vm, "cat /root/before-commit") == "from-parent\n"
    in_use = await http.delete(f"/api/v1/commits/{booted.commit_id}")
    assert in_use.status_code == 409
    assert vm in in_use.json()["error"]
    assert (await http.delete(f"/api/v1/vm/{vm}")).status_code == 200

    own = (await http.post(f"/api/v1/vm/{booted.vm_id}/commit", json={"name": "short-lived"})).json()["commit_id"]
    user = (await http.post("/api/v1/vm/from_commit", json={"commit_id": own})).json()["vm_id"]
    assert (await http.delete(f"/api/v1/commits/{own}")).status_code == 409
    await http.delete(f"/api/v1/vm/{user}")
    assert (await http.delete(f"/api/v1/commits/{own}")).status_code == 204
    assert (await http.get(f"/api/v1/commits/{own}")).status_code == 404


async def test_commit_listing_get_and_lineage(booted: Booted) -> None:
    http = booted.http
    listed = (await http.get("/api/v1/commits", params={"limit": 1, "offset": 0})).json()
    assert listed["limit"] == 1 and listed["offset"] == 0 and listed["total"] >= 1
    assert len(listed["commits"]) == 1
    commit = (await http.get(f"/api/v1/commits/{booted.commit_id}")).json()
    assert set(commit) >= {
        "commit_id",
        "owner_id",
        "name",
        "description",
        "is_public",
        "created_at",
        "parent_vm_id",
        "grandparent_commit_id",
    }
    assert (commit["name"], commit["parent_vm_id"], commit["owner_id"]) == ("with counter", booted.vm_id, booted.org.id)
    parents = (await http.get(f"/api/v1/vm/commits/{booted.commit_id}/parents")).json()
    assert [entry["id"] for entry in parents] == [booted.commit_id]


async def test_other_org_sees_nothing(platform: Platform, booted: Booted, other_org: Org) -> None:
    vm, commit = booted.vm_id, booted.commit_id
    async with platform.client(other_org) as http:
        calls = [
            http.get(f"/api/v1/vm/{vm}/status"),
            http.get(f"/api/v1/vm/{vm}/metadata"),
            http.post(f"/api/v1/vm/{vm}/exec", json={"command": ["id"]}),
            http.post(f"/api/v1/vm/{vm}/commit", json={}),
            http.post(f"/api/v1/vm/{vm}/branch"),
            http.post(f"/api/v1/vm/branch/by_vm/{vm}"),
            http.patch(f"/api/v1/vm/{vm}/state", json={"state": "Paused"}),
            http.delete(f"/api/v1/vm/{vm}"),
            http.get(f"/api/v1/commits/{commit}"),
            http.post(f"/api/v1/vm/branch/by_commit/{commit}"),
            http.post(f"/api/v1/vm/{commit}/branch"),
            http.post("/api/v1/vm/from_commit", json={"commit_id": commit}),
            http.get(f"/api/v1/vm/commits/{commit}/parents"),
            http.delete(f"/api/v1/commits/{commit}"),
        ]
        for answer in await asyncio.gather(*calls):
            assert answer.status_code == 404, (answer.request.url, answer.text)
        assert vm not in [v["vm_id"] for v in (await http.get("/api/v1/vm")).json()]
        assert commit not in [c["commit_id"] for c in (await http.get("/api/v1/commits")).json()["commits"]]
    async with platform.client() as http:
        assert (await http.get(f"/api/v1/vm/{vm}/status")).status_code == 401
    assert (await booted.http.get(f"/api/v1/vm/{vm}/status")).json()["state"] == "running"


async def test_delete_removes_the_vm_and_its_disk(platform: Platform, booted: Booted) -> None:
    http = booted.http
    vm = (await http.post(f"/api/v1/vm/branch/by_commit/{booted.commit_id}")).json()["vms"][0]["vm_id"]
    pid = platform.vm_pid(vm)

    # the VM's own disk (the layer QEMU holds open for writing) and the commit's layer under it
    def flags(fd: Path) -> int:
        return int(re.search(r"flags:\s+(\d+)", (fd.parent.parent / "fdinfo" / fd.name).read_text())[1], 8)

    disk = next(
        Path(os.readlink(fd)) for fd in Path(f"/proc/{pid}/fd").iterdir() if os.readlink(fd).endswith(".qcow2") and flags(fd) & 3 == 2
    )
    info = subprocess.run(["qemu-img", "info", "-U", "--output=json", disk], capture_output=True, text=True, check=True)
    backing = disk.parent / json.loads(info.stdout)["backing-filename"]
    assert disk.parent == platform.settings.data_dir / "layers" and backing.exists()
    assert (await http.delete(f"/api/v1/vm/{vm}")).json() == {"vm_id": vm}
    assert not disk.exists(), "the VM's disk was left behind"
    assert backing.exists(), "the commit's layer went with the VM"
    assert not os.path.exists(f"/proc/{pid}")
    assert (await http.get(f"/api/v1/vm/{vm}/status")).status_code == 404
    assert vm not in [v["vm_id"] for v in (await http.get("/api/v1/vm")).json()]


async def test_a_killed_qemu_shows_as_dead(platform: Platform, booted: Booted) -> None:
    http = booted.http
    vm = (await http.post(f"/api/v1/vm/branch/by_commit/{booted.commit_id}")).json()["vms"][0]["vm_id"]
    os.kill(platform.vm_pid(vm), signal.SIGKILL)
    deadline = time.monotonic() + 30
    while (await http.get(f"/api/v1/vm/{vm}/status")).json()["state"] != "dead" and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert (await http.get(f"/api/v1/vm/{vm}/status")).json()["state"] == "dead"
    assert not (platform.settings.vm_run_dir / vm / "ram").exists()
    refused = await http.post(f"/api/v1/vm/{vm}/exec", json={"command": ["true"]})
    assert refused.status_code == 400 and "dead" in refused.json()["error"]
    assert (await http.delete(f"/api/v1/vm/{vm}")).status_code == 200


async def test_orchestrator_restart_adopts_running_vms(platform: Platform, booted: Booted) -> None:
    http = booted.http
    survivor, victim = [v["vm_id"] for v in (await http.post(f"/api/v1/vm/branch/by_commit/{booted.commit_id}?count=2")).json()["vms"]]
    await platform.running["orchestrator"].stop(0)
    os.kill(platform.vm_pid(victim), signal.SIGKILL)
    await platform.restart("orchestrator")
    states = {v["vm_id"]: v["state"] for v in (await http.get("/api/v1/vm")).json()}
    assert states[survivor] == "running"
    assert states[victim] == "dead"
    assert states[booted.vm_id] == "running"
    assert await out(http, survivor, "cat /root/before-commit") == "from-parent\n"
    assert await counter(http, booted.vm_id) > 0
    for vm in (survivor, victim):
        await http.delete(f"/api/v1/vm/{vm}")


async def test_damaged_commit_is_refused_clearly(platform: Platform, booted: Booted) -> None:
    http = booted.http
    vms_before = sorted(v["vm_id"] for v in (await http.get("/api/v1/vm")).json())
    commit = (await http.post(f"/api/v1/vm/{booted.vm_id}/commit", json={"name": "to damage"})).json()["commit_id"]
    state = platform.settings.data_dir / "commits" / commit / "state"
    original = state.read_bytes()
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0xFF
    state.write_bytes(bytes(damaged))
    answer = await http.post("/api/v1/vm/from_commit", json={"commit_id": commit})
    assert answer.status_code == 500
    assert answer.json()["code"] == "DATA_LOSS"
    assert "state file does not match its checksum" in answer.json()["error"]
    state.write_bytes(original)
    (platform.settings.data_dir / "commits" / commit / "ram").unlink()
    missing = await http.post(f"/api/v1/vm/branch/by_commit/{commit}")
    assert "file is missing" in missing.json()["error"]
    assert sorted(v["vm_id"] for v in (await http.get("/api/v1/vm")).json()) == vms_before, "a refused restore left a VM"
    assert (await http.delete(f"/api/v1/commits/{commit}")).status_code == 204


async def test_console_stream_over_grpc(platform: Platform, booted: Booted) -> None:
    import grpc

    from vers.orchestrator.v1 import orchestrator_pb2 as pb
    from vers.orchestrator.v1 import orchestrator_pb2_grpc

    answered = asyncio.Event()

    async def keystrokes() -> AsyncIterator[pb.ConnectRequest]:
        yield pb.ConnectRequest(vm_id=booted.vm_id)
        yield pb.ConnectRequest(input=b"echo console-$((6*7))\n")
        with contextlib.suppress(TimeoutError):  # the input stays open until the answer came, however slow
            await asyncio.wait_for(answered.wait(), 60)

    async with grpc.aio.insecure_channel(platform.settings.orchestrator_addr) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        seen = b""
        async for answer in stub.Connect(keystrokes(), metadata=booted.org.metadata):
            seen += answer.output
            if b"console-42" in seen:
                answered.set()
                break
    assert b"console-42" in seen


async def test_sleep_frees_the_vm_and_wakes_it_where_it_was(platform: Platform, org: Org) -> None:
    async with platform.client(org) as http:
        vm = await new_vm(http)
        await out(http, vm, "echo kept > /root/on-disk && echo in-ram > /run/in-ram && " + COUNTER)
        assert await counter_above(http, vm, 5) > 5, "the counter does not run"
        pid = platform.vm_pid(vm)
        asked = time.monotonic()
        counted = await counter(http, vm)
        slept = await http.patch(f"/api/v1/vm/{vm}/state", json={"state": "Sleeping"})
        running = time.monotonic() - asked
        assert (slept.status_code, slept.json()["state"]) == (200, "sleeping"), slept.text
        assert not Path(f"/proc/{pid}").exists()  # no QEMU, no memory
        assert not (platform.settings.vm_run_dir / vm / "ram").exists()
        refused = await http.post(f"/api/v1/vm/{vm}/exec", json={"command": ["true"]})
        assert refused.status_code == 400 and "is sleeping: wake it first" in refused.json()["error"]
        assert (await http.get(f"/api/v1/vm/{vm}/status")).json()["state"] == "sleeping"

        await platform.restart("orchestrator")  # sleeping outlives the service
        asked = time.monotonic()
        woke = await http.patch(f"/api/v1/vm/{vm}/state", json={"state": "Running"})
        assert (woke.status_code, woke.json()["state"]) == (200, "running"), woke.text
        assert await out(http, vm, "cat /root/on-disk /run/in-ram") == "kept\nin-ram\n"
        resumed = await counter(http, vm)
        running += time.monotonic() - asked
        assert counted <= resumed, "the counter restarted instead of going on"
        assert resumed - counted <= most_ticks(running), ("the VM ran while it slept", counted, resumed, running)
        assert await counter_above(http, vm, resumed) > resumed, "the VM did not run again"

        # A branch (its memory a private mapping of a commit) sleeps too, and "Paused" wakes it paused.
        branch = (await http.post(f"/api/v1/vm/{vm}/branch")).json()["vms"][0]["vm_id"]
        assert (await http.patch(f"/api/v1/vm/{branch}/state", json={"state": "Sleeping"})).json()["state"] == "sleeping"
        assert (await http.patch(f"/api/v1/vm/{branch}/state", json={"state": "Paused"})).json()["state"] == "paused"
        assert (await http.patch(f"/api/v1/vm/{branch}/state", json={"state": "Running"})).json()["state"] == "running"
        assert await out(http, branch, "cat /root/on-disk") == "kept\n"
        await http.patch(f"/api/v1/vm/{branch}/state", json={"state": "Sleeping"})
        assert (await http.delete(f"/api/v1/vm/{branch}")).status_code == 200
        assert not (platform.settings.data_dir / "sleeping" / branch).exists()


def console_url(platform: Platform, vm_id: str, query: str = "") -> str:
    return platform.url.replace("http://", "ws://") + f"/api/v1/vm/{vm_id}/console{query}"


async def read_until(socket: ClientConnection, wanted: bytes, timeout: float = 30) -> bytes:
    seen = b""
    async with asyncio.timeout(timeout):
        while wanted not in seen:
            frame = await socket.recv()
            assert isinstance(frame, bytes), frame
            seen += frame
    return seen


async def test_console_websocket_resizes_and_ends_when_the_shell_exits(platform: Platform, booted: Booted) -> None:
    async with websockets.connect(console_url(platform, booted.vm_id), additional_headers=booted.org.auth) as socket:
        await socket.send(json.dumps({"rows": 33, "cols": 101}))
        await socket.send(b"echo ws-$((6*7))\r")
        await read_until(socket, b"ws-42")
        for _ in range(60):  # the size is set through the agent, beside the typing: ask until it shows
            await socket.send(b"stty size\r")
            with contextlib.suppress(TimeoutError):
                await read_until(socket, b"33 101", timeout=1)
                break
        else:
            pytest.fail("the console never took the size 33x101")
        await socket.send(b"exit\r")
        with pytest.raises(websockets.ConnectionClosedOK):
            async with asyncio.timeout(30):
                while True:
                    await socket.recv()
    assert socket.close_code == 1000
    # A new shell waits for the next person.
    async with websockets.connect(console_url(platform, booted.vm_id), additional_headers=booted.org.auth) as socket:
        await socket.send(b"echo again-$((2+3))\r")
        await read_until(socket, b"again-5")


async def test_console_websocket_refuses_with_http_errors(platform: Platform, booted: Booted) -> None:
    stranger = await platform.new_org("console-stranger")
    cases = [
        (booted.vm_id, "", stranger.auth, 404, "NOT_FOUND"),
        (booted.vm_id, "", {"Authorization": "Bearer nope"}, 401, "UNAUTHENTICATED"),
        (booted.vm_id, "?rows=tall", booted.org.auth, 400, "INVALID_ARGUMENT"),
    ]
    for vm_id, query, headers, status, code in cases:
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(console_url(platform, vm_id, query), additional_headers=headers):
                pass
        assert refused.value.response.status_code == status
        assert json.loads(refused.value.response.body)["code"] == code
    async with websockets.connect(console_url(platform, booted.vm_id), additional_headers=booted.org.auth):
        with pytest.raises(websockets.InvalidStatus) as busy:
            async with websockets.connect(console_url(platform, booted.vm_id), additional_headers=booted.org.auth):
                pass
    assert "already connected" in json.loads(busy.value.response.body)["error"]


async def test_console_websocket_rejects_a_bad_frame(platform: Platform, booted: Booted) -> None:
    async with websockets.connect(console_url(platform, booted.vm_id), additional_headers=booted.org.auth) as socket:
        await socket.send(json.dumps({"rows": -1, "cols": 5}))
        with pytest.raises(websockets.ConnectionClosedError):
            async with asyncio.timeout(30):
                while True:
                    await socket.recv()
    assert socket.close_code == 1011
    assert "rows and cols must both be between 1 and" in socket.close_reason


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"vm_config": {"vcpu_count": 99}}, "vcpu_count must be between 1 and 16"),
        ({"vm_config": {"mem_size_mib": 16}}, "mem_size_mib must be between 128"),
        ({"vm_config": {"fs_size_mib": 10}}, "fs_size_mib must be between 96"),
        ({"vm_config": {"image_name": "nope"}}, "image 'nope' does not exist; images: "),
        ({"vm_config": {"kernel_name": "other.bin"}}, "kernel_name must be 'default.bin'"),
    ],
)
async def test_invalid_vm_config_is_400(platform: Platform, org: Org, body: dict[str, Any], message: str) -> None:
    async with platform.client(org) as http:
        answer = await http.post("/api/v1/vm/new_root", json=body)
        assert answer.status_code == 400
        assert message in answer.json()["error"]
        assert (await http.get("/api/v1/vm")).json() == []


async def test_org_limits_are_resource_exhausted(platform: Platform, org: Org) -> None:
    async with platform.client(org) as http:
        answer = await http.post("/api/v1/vm/new_root", json={"vm_config": {"mem_size_mib": 65536, "vcpu_count": 16}})
        assert answer.status_code == 429
        assert answer.json()["code"] == "RESOURCE_EXHAUSTED"
        assert "32768 MiB" in answer.json()["error"]
        assert (await http.get("/api/v1/vm")).json() == []


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "send exactly one of commit_id, tag_name or ref (got none)"),
        ({"commit_id": "x", "ref": "a:b"}, "(got commit_id, ref)"),
        ({"commit_id": "my-app:latest"}, 'not a valid ID (a UUID); to restore by repo:tag send {"ref": "my-app:latest"}'),
    ],
)
async def test_from_commit_body_rules(platform: Platform, org: Org, body: dict[str, Any], message: str) -> None:
    async with platform.client(org) as http:
        answer = await http.post("/api/v1/vm/from_commit", json=body)
    assert answer.status_code == 400
    assert message in answer.json()["error"]


async def test_branch_count_is_bounded(booted: Booted) -> None:
    answer = await booted.http.post(f"/api/v1/vm/branch/by_commit/{booted.commit_id}?count=99")
    assert answer.status_code == 400
    assert "count must be between 1 and 16" in answer.json()["error"]


async def test_the_official_sdk_drives_vms(platform: Platform, booted: Booted) -> None:
    from vers_sdk import BadRequestError, NotFoundError, VersSdkClient

    async with VersSdkClient(base_url=platform.url, api_key=booted.org.key, max_retries=0) as sdk:
        assert booted.vm_id in [vm["vm_id"] for vm in await sdk.list_vms()]
        assert (await sdk.vm_status(booted.vm_id))["state"] == "running"
        ran = await sdk.exec_vm(booted.vm_id, {"command": ["cat", "/root/before-commit"]})
        assert (ran["exit_code"], ran["stdout"]) == (0, "from-parent\n")
        [branch] = (await sdk.branch_by_commit(booted.commit_id))["vms"]
        metadata = await sdk.get_vm_metadata(branch["vm_id"])
        assert metadata["parent_commit_id"] == booted.commit_id
        assert (await sdk.update_vm_state(branch["vm_id"], {"state": "Paused"}))["state"] == "paused"
        await sdk.update_vm_state(branch["vm_id"], {"state": "Running"})
        commit = await sdk.commit_vm(branch["vm_id"], {"name": "from the sdk"})
        assert commit["commit_id"] in [c["commit_id"] for c in (await sdk.list_commits())["commits"]]
        lineage = await sdk.list_parent_commits(commit["commit_id"])
        assert [entry["id"] for entry in lineage] == [commit["commit_id"], booted.commit_id]
        restored = await sdk.restore_from_commit({"commit_id": commit["commit_id"]})
        assert (await sdk.exec_vm(restored["vm_id"], {"command": ["true"]}))["exit_code"] == 0
        with pytest.raises(BadRequestError):
            await sdk.restore_from_commit({"commit_id": "my-app:latest"})
        for vm in (restored["vm_id"], branch["vm_id"]):
            assert (await sdk.delete_vm(vm))["vm_id"] == vm
        await sdk.delete_commit(commit["commit_id"])
        with pytest.raises(NotFoundError):
            await sdk.vm_status(branch["vm_id"])

"""Streaming exec, reattaching after a dropped connection, and the VMs' exec logs (vm-api-more.md §1), through
the official SDK and its own httpx client on one VM; the exec log's bounds and offsets, and a session's
replay, as units."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from vers_sdk import NotFoundError, VersSdkClient
from vers_sdk import models as M

from services.orchestrator.execs import ExecLog, ExecSession
from tests.conftest import Org, Platform

pytestmark = pytest.mark.vm

# Output known byte for byte: lines of numbers, bytes that are not UTF-8, and a pause in the middle.
SCRIPT = "seq 1 30000; printf '\\000\\377\\n'; echo to-stderr >&2; sleep 1; seq 30001 31000; exit 3"
EXPECTED_STDOUT = (
    "".join(f"{n}\n" for n in range(1, 30001)).encode() + b"\x00\xff\n" + "".join(f"{n}\n" for n in range(30001, 31001)).encode()
)


class World:
    def __init__(self, platform: Platform, org: Org, sdk: VersSdkClient, vm_id: str) -> None:
        self.platform, self.org, self.sdk, self.vm_id = platform, org, sdk, vm_id

    def stream(self, path: str, body: dict[str, Any]) -> Any:
        return self.sdk._client.stream("POST", f"/api/v1/vm/{self.vm_id}/{path}", json=body, timeout=120)

    async def events(self, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
        async with self.stream(path, body) as answer:
            assert answer.status_code == 200, await answer.aread()
            assert answer.headers["content-type"].startswith("application/x-ndjson")
            return [json.loads(line) async for line in answer.aiter_lines() if line]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def world(platform: Platform) -> AsyncIterator[World]:
    org = await platform.new_org("streams")
    async with VersSdkClient(base_url=platform.url, api_key=org.key, max_retries=0) as sdk:
        made = await sdk.create_new_root_vm({"vm_config": {}}, M.CreateNewRootVmParams(wait_boot=True))
        yield World(platform, org, sdk, made["vm_id"])
        exec_log = platform.settings.data_dir.resolve() / "exec-logs" / made["vm_id"]
        assert exec_log.is_dir()  # in the data folder, not the run folder's tmpfs
        await sdk.delete_vm(made["vm_id"])
        assert not exec_log.exists()  # the VM's exec log goes with it


def output(events: list[dict[str, Any]], stream: str = "stdout") -> bytes:
    return b"".join(base64.b64decode(e["data_b64"]) for e in events if e["type"] == "chunk" and e["stream"] == stream)


async def test_stream_interrupted_and_resumed_from_its_cursor(world: World) -> None:
    exec_id = str(uuid.uuid4())
    async with world.stream("exec/stream", {"command": ["sh", "-c", SCRIPT], "exec_id": exec_id}) as answer:
        assert answer.headers["content-type"].startswith("application/x-ndjson")
        lines = answer.aiter_lines()
        first = json.loads(await anext(lines))
    # The connection is closed after the first chunk; the command goes on.
    assert set(first) == {"type", "exec_id", "cursor", "stream", "data_b64"}
    assert (first["type"], first["exec_id"], first["cursor"], first["stream"]) == ("chunk", exec_id, 1, "stdout")
    resumed = await world.events("exec/stream/attach", {"exec_id": exec_id, "cursor": first["cursor"]})
    exit_event = resumed[-1]
    assert exit_event == {
        "type": "exit", "exec_id": exec_id, "cursor": resumed[-2]["cursor"] + 1, "exit_code": 3,
        "stdout_truncated": False, "stderr_truncated": False,
    }  # fmt: skip
    together = [first, *resumed]
    assert [e["cursor"] for e in together] == list(range(1, len(together) + 1))  # no duplicates, none missed
    assert output(together) == EXPECTED_STDOUT
    assert output(together, "stderr") == b"to-stderr\n"
    assert all(e["exec_id"] == exec_id and e["stream"] in ("stdout", "stderr") for e in together[:-1])

    # With no cursor, everything kept is replayed; with from_latest, only the exit of a finished exec.
    assert await world.events("exec/stream/attach", {"exec_id": exec_id}) == together
    assert await world.events("exec/stream/attach", {"exec_id": exec_id, "from_latest": True}) == [exit_event]
    # The SDK reads a one-event answer: attach after the last chunk gives the exit object.
    assert await world.sdk.exec_vm_stream_attach(world.vm_id, {"exec_id": exec_id, "cursor": exit_event["cursor"] - 1}) == exit_event


async def test_output_arrives_as_written_and_from_latest_skips_the_past(world: World) -> None:
    exec_id = str(uuid.uuid4())
    async with world.stream("exec/stream", {"command": ["sh", "-c", "echo before; sleep 3; echo after"], "exec_id": exec_id}) as answer:
        lines = answer.aiter_lines()
        first = json.loads(await anext(lines))
        assert base64.b64decode(first["data_b64"]) == b"before\n"  # while the command still sleeps
        latest = await world.events("exec/stream/attach", {"exec_id": exec_id, "from_latest": True})
        rest = [json.loads(line) async for line in lines if line]
    assert output(latest) == b"after\n" and latest[-1]["type"] == "exit"
    assert latest == rest


async def test_sdk_exec_vm_stream_returns_the_exit_of_a_silent_command(world: World) -> None:
    answer = await world.sdk.exec_vm_stream(world.vm_id, {"command": ["sh", "-c", "exit 5"]})
    assert answer["type"] == "exit" and answer["exit_code"] == 5 and answer["cursor"] == 1
    assert uuid.UUID(answer["exec_id"])
    with pytest.raises(NotFoundError) as missing:
        await world.sdk.exec_vm_stream_attach(world.vm_id, {"exec_id": str(uuid.uuid4())})
    assert "no exec session" in missing.value.error_message


async def test_stdin_env_working_dir_and_a_running_id_taken(world: World, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    exec_id = str(uuid.uuid4())
    body = {
        "command": ["sh", "-c", "cat; echo \"$WHO in $(pwd)\"; sleep 2"], "stdin": "piped\n", "env": {"WHO": "secret-value-42"},
        "working_dir": "/tmp", "exec_id": exec_id,
    }  # fmt: skip
    async with world.stream("exec/stream", body) as answer:
        lines = answer.aiter_lines()
        first = json.loads(await anext(lines))
        again = await world.sdk._client.post(f"/api/v1/vm/{world.vm_id}/exec/stream", json=body)
        assert again.status_code == 409, again.text
        rest = [json.loads(line) async for line in lines if line]
    assert output([first, *rest]) == b"piped\nsecret-value-42 in /tmp\n"
    assert "secret-value-42" not in caplog.text


async def test_an_exec_id_runs_once_and_env_stays_off_command_lines(world: World) -> None:
    """A start retried with the id of one that already ran is refused (the client attaches to read it): a
    command never runs twice. The variables reach the command without passing through a command line,
    where any user of the guest reads them (/proc/PID/cmdline)."""
    exec_id = str(uuid.uuid4())
    every_command_line = "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline; echo; done"
    body = {"command": ["sh", "-c", every_command_line], "env": {"SEEN_NOWHERE": "value-on-no-command-line"}, "exec_id": exec_id}
    events = await world.events("exec/stream", body)
    assert events[-1]["type"] == "exit" and b"value-on-no-command-line" not in output(events)
    async with world.stream("exec/stream", body) as again:
        assert again.status_code == 409 and "already ran" in (await again.aread()).decode()
    replay = await world.events("exec/stream/attach", {"exec_id": exec_id})
    assert output(replay) == output(events)
    unary = await world.sdk._client.post(f"/api/v1/vm/{world.vm_id}/exec", json={"command": ["true"], "exec_id": "x" * 5000})
    error = unary.json()["error"]
    assert unary.status_code == 400 and error.startswith("exec_id 'xxxx") and "is not a valid ID (a UUID): leave it empty" in error
    assert len(unary.text) < 500


async def test_more_than_the_cap_is_cut_without_stalling(world: World) -> None:
    cap = world.platform.settings.exec_max_output_bytes
    streamed = asyncio.ensure_future(world.events("exec/stream", {"command": ["sh", "-c", 'yes abcdefg; echo "yes: $?" >&2']}))
    other = await world.sdk.exec_vm(world.vm_id, {"command": ["echo", "meanwhile"]})  # the platform answers meanwhile
    assert other["stdout"] == "meanwhile\n"
    events = await streamed
    assert len(output(events)) == cap and output(events) == (b"abcdefg\n" * (cap // 8 + 1))[:cap]
    assert output(events, "stderr") == b"yes: 141\n"  # its pipe was closed: SIGPIPE
    assert events[-1]["type"] == "exit" and events[-1]["exit_code"] == 0
    assert (events[-1]["stdout_truncated"], events[-1]["stderr_truncated"]) == (True, False)


async def test_vm_logs_pages_and_filters(world: World) -> None:
    await world.sdk.exec_vm(world.vm_id, {"command": ["sh", "-c", "echo unary-out; echo unary-err >&2"]})
    exec_id = str(uuid.uuid4())
    await world.events("exec/stream", {"command": ["sh", "-c", "echo streamed-out; echo streamed-err >&2"], "exec_id": exec_id})
    entries, offset, pages = [], 0, 0
    while True:
        page = await world.sdk.vm_logs(world.vm_id, M.VmLogsParams(offset=offset, max_entries=2))
        assert set(page) == {"entries", "eof", "next_offset"} and len(page["entries"]) <= 2
        entries += page["entries"]
        offset, pages = page["next_offset"], pages + 1
        if page["eof"]:
            break
    assert pages > 1
    for entry in entries:
        assert set(entry) == {"data_b64", "stream", "timestamp", "exec_id"} and entry["timestamp"].endswith("Z")
    seen = [(e["exec_id"], e["stream"], base64.b64decode(e["data_b64"])) for e in entries]
    assert (exec_id, "stdout", b"streamed-out\n") in seen and (exec_id, "stderr", b"streamed-err\n") in seen
    assert any(s == "stderr" and d == b"unary-err\n" for _, s, d in seen)
    errors = await world.sdk.vm_logs(world.vm_id, M.VmLogsParams(offset=0, max_entries=1000, stream="stderr"))
    assert {e["stream"] for e in errors["entries"]} == {"stderr"} and errors["eof"] is True
    # From the end: nothing new, and the same offset back.
    tail = await world.sdk.vm_logs(world.vm_id, M.VmLogsParams(offset=offset))
    assert (tail["entries"], tail["eof"], tail["next_offset"]) == ([], True, offset)


async def test_another_org_gets_404(world: World, other_org: Org) -> None:
    exec_id = (await world.sdk.exec_vm_stream(world.vm_id, {"command": ["true"]}))["exec_id"]
    async with VersSdkClient(base_url=world.platform.url, api_key=other_org.key, max_retries=0) as stranger:
        with pytest.raises(NotFoundError):
            await stranger.exec_vm_stream_attach(world.vm_id, {"exec_id": exec_id})
        with pytest.raises(NotFoundError):
            await stranger.vm_logs(world.vm_id)
        with pytest.raises(NotFoundError):
            await stranger.exec_vm_stream(world.vm_id, {"command": ["true"]})


# --- units: no VM ------------------------------------------------------------------------------------


def test_exec_log_keeps_its_newest_bytes_at_stable_offsets(tmp_path: Path) -> None:
    exec_log = ExecLog(tmp_path / "vm", max_bytes=256 * 1024)  # files of 64 KiB
    for n in range(400):
        exec_log.append("e", "stdout" if n % 2 else "stderr", f"entry {n:04d} ".encode() * 50)
    entries, eof, end = exec_log.read(0, 1000, "")
    first_kept = int(entries[0].data_b64.split()[1])
    assert first_kept > 0 and eof  # the oldest went
    assert [int(e.data_b64.split()[1]) for e in entries] == list(range(first_kept, 400))
    assert sum(p.stat().st_size for p in (tmp_path / "vm").iterdir()) <= 256 * 1024 + 64 * 1024
    # An offset from an earlier page still reads on from there; one inside an entry starts at the next.
    _page, eof, middle = exec_log.read(0, 10, "")
    assert not eof and [e.data_b64 for e in exec_log.read(middle, 5, "")[0]] == [e.data_b64 for e in entries[10:15]]
    assert exec_log.read(middle + 3, 1, "")[0][0].data_b64 == entries[11].data_b64
    only = exec_log.read(0, 1000, "stdout")[0]
    assert {e.stream for e in only} == {"stdout"}
    exec_log.append("e", "stdout", b"x" * 300_000)  # more than the bound at once: the newest kept whole
    assert b"".join(e.data_b64 for e in exec_log.read(0, 1000, "")[0]).endswith(b"x" * 300_000)
    assert exec_log.read(end + 10**6, 1, "")[0]  # an offset past the end starts again at the oldest
    exec_log.drop()
    assert not (tmp_path / "vm").exists() and exec_log.read(0, 10, "") == ([], True, 0)


async def test_session_replays_after_a_cursor_and_drops_the_oldest() -> None:
    session = ExecSession("id", "vm", budget=3 * (100 + 256))
    for n in range(5):
        session.chunk("stdout", bytes([n]) * 100)
    session.finish(0)
    replay = [e async for e in session.events()]
    assert [e.cursor for e in replay] == [4, 5, 6]  # the oldest went over the budget
    assert [e.cursor for e in [e async for e in session.events(after=4)]] == [5, 6]
    assert [e.type for e in [e async for e in session.events(from_latest=True)]] == ["exit"]
    assert [e async for e in session.events(after=6)] == [] and await session.wait() == 0

"""`vers exec` streaming its output as the command writes it (and resuming a dropped connection), with stdin
and the guest's exit code, and `vers logs` (-f, --stream), against the suite's platform on one VM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pexpect
import pytest
import pytest_asyncio

from tests.conftest import Org, Platform
from tests.launcher import VERS

pytestmark = pytest.mark.vm


class Cli:
    def __init__(self, platform: Platform, org: Org, config: Path, vm_id: str) -> None:
        self.vm_id = vm_id
        self.env = {**os.environ, "VERS_URL": platform.url, "VERS_API_KEY": org.key, "VERS_CONFIG_DIR": str(config)}

    async def start(self, *args: str, url: str = "") -> asyncio.subprocess.Process:
        env = {**self.env, "VERS_URL": url} if url else self.env
        return await asyncio.create_subprocess_exec(
            str(VERS), *args, env=env, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )

    async def run(self, *args: str, stdin: bytes = b"", url: str = "") -> tuple[int, bytes, bytes]:
        process = await self.start(*args, url=url)
        out, err = await asyncio.wait_for(process.communicate(stdin), 180)
        assert b"Traceback" not in err, err.decode()
        assert process.returncode is not None
        return process.returncode, out, err


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def cli(platform: Platform, tmp_path_factory) -> AsyncIterator[Cli]:  # type: ignore[no-untyped-def]
    org = await platform.new_org("cli-exec")
    async with platform.client(org) as http:
        answer = await http.post("/api/v1/vm/new_root?wait_boot=true", json={"vm_config": {}}, timeout=300)
        assert answer.status_code in (200, 201), answer.text
        vm_id = answer.json()["vm_id"]
        yield Cli(platform, org, tmp_path_factory.mktemp("cli-exec-config"), vm_id)
        await http.delete(f"/api/v1/vm/{vm_id}")


async def test_exec_prints_as_it_comes_and_exits_with_the_guest_code(cli: Cli) -> None:
    process = await cli.start("exec", cli.vm_id, "--", "echo first; sleep 3; echo second >&2; echo third; exit 7")
    assert process.stdout is not None
    first = await asyncio.wait_for(process.stdout.readline(), 60)
    assert first == b"first\n"
    assert process.returncode is None  # the command still sleeps: the first line came before its end
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert (process.returncode, out, err) == (7, b"third\n", b"second\n")

    # -i sends stdin, whole; several arguments run as they are; --timeout kills the command.
    assert await cli.run("exec", "-i", cli.vm_id, "--", "wc", "-c", stdin=b"x" * 100_000) == (0, b"100000\n", b"")
    code, out, _ = await cli.run("exec", "--timeout", "1", cli.vm_id, "--", "sleep 30; echo never")
    assert code != 0 and out == b""
    code, out, _ = await cli.run("exec", "--format", "json", cli.vm_id, "--", "echo json-out; exit 4")
    answer = json.loads(out)
    assert code == 4 and (answer["exit_code"], answer["stdout"], answer["stderr"]) == (4, "json-out\n", "")


async def test_exec_tty_runs_the_command_in_a_terminal_over_ssh(cli: Cli) -> None:
    """-t: a terminal for interactive programs, through OpenSSH and the VM's own key (as `vers connect --ssh`)."""
    child = pexpect.spawn(str(VERS), ["exec", "-t", cli.vm_id, "--", "tty; echo in-a-terminal; exit 5"], env=cli.env, timeout=180)
    try:
        await asyncio.to_thread(child.expect, "in-a-terminal")
        assert b"/dev/pts/" in child.before, child.before
        await asyncio.to_thread(child.expect, pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 5


async def test_exec_resumes_after_the_connection_drops(cli: Cli, platform: Platform) -> None:
    """Through a proxy that cuts the first streamed answer after its first bytes: the output is whole, once."""
    gateway_port = int(platform.url.rsplit(":", 1)[1])
    cut = {"done": False, "connections": 0}

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, limit: int | None) -> None:
        sent = 0
        try:
            while data := await reader.read(65536):
                if limit is not None and sent + len(data) > limit:
                    writer.write(data[: limit - sent])
                    await writer.drain()
                    break
                sent += len(data)
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def accept(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", gateway_port)
        # The first connection that streams an exec is cut once the first events have passed.
        limit = None if cut["done"] else 400
        cut["done"] = True
        cut["connections"] += 1
        await asyncio.gather(relay(client_reader, upstream_writer, None), relay(upstream_reader, client_writer, limit))

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        code, out, err = await cli.run(
            "exec", cli.vm_id, "--", "for i in $(seq 1 40); do echo line-$i; sleep 0.05; done", url=f"http://127.0.0.1:{port}"
        )
    finally:
        server.close()
    assert cut["connections"] >= 2  # it was cut, and attached to again
    assert (code, out) == (0, "".join(f"line-{i}\n" for i in range(1, 41)).encode()), err


async def test_logs_prints_pages_filters_and_follows(cli: Cli) -> None:
    await cli.run("exec", cli.vm_id, "--", "echo log-out; echo log-err >&2")
    code, out, err = await cli.run("logs", cli.vm_id)
    assert code == 0 and b"log-out\n" in out and b"log-err\n" in err and b"log-err" not in out
    code, out, err = await cli.run("logs", cli.vm_id, "--stream", "stderr")
    assert code == 0 and b"log-out" not in out + err and b"log-err\n" in err
    code, out, _ = await cli.run("logs", "--format", "json", cli.vm_id)
    entries = json.loads(out)["entries"]
    assert {"exec_id", "stream", "timestamp", "data"} <= set(entries[0])
    assert any(e["stream"] == "stdout" and e["data"] == "log-out\n" for e in entries)

    follower = await cli.start("logs", "-f", cli.vm_id, "--stream", "stdout")
    assert follower.stdout is not None
    await cli.run("exec", cli.vm_id, "--", "echo followed-line")
    seen = b""
    while b"followed-line\n" not in seen:
        seen += await asyncio.wait_for(follower.stdout.readline(), 60)
    follower.send_signal(signal.SIGINT)
    await asyncio.wait_for(follower.communicate(), 30)
    assert follower.returncode == 130

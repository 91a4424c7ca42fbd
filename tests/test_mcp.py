"""`vers mcp serve` driven by the official `mcp` client, as a coding agent would: over stdio (the server a
subprocess of the client) on real VMs, the rollback workflow (commit, break, branch from the commit, kill
the broken VM) included; and over streamable HTTP, where the bearer token is required."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.types import CallToolResult

from tests.conftest import Org, Platform

pytestmark = pytest.mark.vm

VERS = Path(sys.executable).parent / "vers"
TOOLS = {"run", "branch", "commit", "exec", "copy", "status", "kill", "tag"}
MISSING_VM = "00000000-0000-4000-8000-000000000000"
LISTENING = re.compile(r"^✓ MCP server at (?P<url>http://\S+) ")


def serve_env(platform: Platform, org: Org, config: Path) -> dict[str, str]:
    return {"VERS_URL": platform.url, "VERS_API_KEY": org.key, "VERS_CONFIG_DIR": str(config)}


def result(answer: CallToolResult) -> dict[str, Any]:
    assert not answer.is_error, answer.content
    assert answer.structured_content is not None
    return answer.structured_content


def error_text(answer: CallToolResult) -> str:
    assert answer.is_error, answer
    return " ".join(getattr(block, "text", "") for block in answer.content)


def tree_digest(root: Path) -> dict[str, tuple[str, int]]:
    """Every file under root: its sha256 and its permission bits."""
    return {
        str(path.relative_to(root)): (hashlib.sha256(path.read_bytes()).hexdigest(), stat.S_IMODE(path.stat().st_mode))
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


async def test_stdio_tools_and_the_rollback_workflow(platform: Platform, org: Org, tmp_path: Path) -> None:
    server = StdioServerParameters(command=str(VERS), args=["mcp", "serve"], env=serve_env(platform, org, tmp_path / "config"))
    async with Client(server) as agent:
        assert "commit" in (agent.instructions or "") and "branch" in (agent.instructions or "")
        listed = {tool.name: tool for tool in (await agent.list_tools()).tools}
        assert set(listed) == TOOLS
        exec_schema = listed["exec"].input_schema
        assert set(exec_schema["required"]) == {"vm", "command"}
        assert {"stdin", "timeout_secs", "working_dir", "env"} <= set(exec_schema["properties"])
        assert {option.get("type") for option in exec_schema["properties"]["command"]["anyOf"]} == {"array", "string"}
        assert listed["branch"].input_schema["required"] == ["source"]
        assert listed["branch"].input_schema["properties"]["count"]["minimum"] == 1
        assert set(listed["commit"].input_schema["required"]) == {"vm"}
        assert set(listed["copy"].input_schema["required"]) == {"source", "destination"}
        assert set(listed["tag"].input_schema["required"]) == {"reference", "commit_id"}
        assert "required" not in listed["status"].input_schema
        assert {"memory_mib", "vcpus", "disk_mib", "image", "alias"} <= set(listed["run"].input_schema["properties"])
        assert set(listed["exec"].output_schema["properties"]) >= {"exit_code", "stdout", "stderr"}
        assert listed["status"].annotations.read_only_hint and listed["kill"].annotations.destructive_hint

        started = result(await agent.call_tool("run", {"alias": "dev"}))
        dev = started["vm_id"]
        assert started == {"vm_id": dev, "alias": "dev", "state": "running"}

        ran = result(await agent.call_tool("exec", {"vm": "dev", "command": "echo hello; echo oops >&2; exit 3"}))
        assert (ran["exit_code"], ran["stdout"], ran["stderr"]) == (3, "hello\n", "oops\n")
        piped = result(await agent.call_tool("exec", {"vm": dev[:8], "command": ["cat"], "stdin": "through stdin"}))
        assert (piped["exit_code"], piped["stdout"]) == (0, "through stdin")
        result(await agent.call_tool("exec", {"vm": "dev", "command": "echo known-good > /root/state"}))

        # Before the risky step: commit. The step breaks the VM; roll back by branching the commit.
        committed = result(await agent.call_tool("commit", {"vm": "dev", "name": "before the risky step"}))
        assert committed["vm_id"] == dev
        broken = result(await agent.call_tool("exec", {"vm": "dev", "command": "rm /root/state && cat /root/state"}))
        assert broken["exit_code"] != 0
        branched = result(await agent.call_tool("branch", {"source": committed["commit_id"], "alias": "restored"}))
        assert branched["source"] == committed["commit_id"] and len(branched["vms"]) == 1
        restored = branched["vms"][0]["vm_id"]
        assert branched["vms"][0]["alias"] == "restored" and restored != dev
        one = result(await agent.call_tool("status", {"vm": "restored"}))["vms"]
        assert [(vm["vm_id"], vm["alias"], vm["state"], vm["parent_commit_id"]) for vm in one] == [
            (restored, "restored", "running", committed["commit_id"])
        ]
        assert one[0]["memory_mib"] > 0 and one[0]["vcpus"] > 0
        back = result(await agent.call_tool("exec", {"vm": "restored", "command": ["cat", "/root/state"]}))
        assert (back["exit_code"], back["stdout"]) == (0, "known-good\n")

        assert result(await agent.call_tool("kill", {"vm": "dev"})) == {"vm_id": dev, "killed": True}
        everything = result(await agent.call_tool("status", {}))["vms"]
        assert [(vm["vm_id"], vm["alias"], vm["state"]) for vm in everything] == [(restored, "restored", "running")]
        assert "no VM 'dev'" in error_text(await agent.call_tool("exec", {"vm": "dev", "command": "true"}))

        # Name the known-good state; the tag moves on a second call.
        tagged = result(
            await agent.call_tool("tag", {"reference": "workspace:good", "commit_id": committed["commit_id"], "create_repository": True})
        )
        assert tagged == {"reference": "workspace:good", "commit_id": committed["commit_id"], "previous_commit_id": None, "created": True}
        again = result(await agent.call_tool("commit", {"vm": "restored"}))
        moved = result(await agent.call_tool("tag", {"reference": "workspace:good", "commit_id": again["commit_id"]}))
        assert (moved["created"], moved["commit_id"], moved["previous_commit_id"]) == (False, again["commit_id"], committed["commit_id"])
        assert "REPO:TAG" in error_text(await agent.call_tool("tag", {"reference": "no-colon", "commit_id": again["commit_id"]}))

        await _copy_both_ways(agent, tmp_path)

        result(await agent.call_tool("kill", {"vm": "restored"}))
        assert result(await agent.call_tool("status", {}))["vms"] == []


async def _copy_both_ways(agent: Client, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.txt").write_text("alpha\n")
    (tree / "sub" / "run.sh").write_bytes(os.urandom(70_000))
    (tree / "sub" / "run.sh").chmod(0o755)
    up = result(await agent.call_tool("copy", {"source": str(tree), "destination": "restored:/root/tree"}))
    assert up["direction"] == "to_vm"
    listed = result(
        await agent.call_tool("exec", {"vm": "restored", "command": "cat /root/tree/a.txt && stat -c %a /root/tree/sub/run.sh"})
    )
    assert listed["stdout"] == "alpha\n755\n"
    down = result(await agent.call_tool("copy", {"source": "restored:/root/tree", "destination": str(tmp_path / "back")}))
    assert down["direction"] == "from_vm"
    assert tree_digest(tmp_path / "back") == tree_digest(tree)
    refused = error_text(await agent.call_tool("copy", {"source": "restored:/no/such/file", "destination": str(tmp_path / "x")}))
    assert "/no/such/file" in refused
    absent = error_text(await agent.call_tool("copy", {"source": str(tmp_path / "absent"), "destination": "restored:/root/"}))
    assert f"no {tmp_path / 'absent'} on this machine" in absent


@contextlib.asynccontextmanager
async def http_server(platform: Platform, org: Org, config: Path, *args: str) -> AsyncIterator[tuple[str, list[str]]]:
    """`vers mcp serve --http --port 0 ARGS`: its URL and the lines it printed on starting."""
    process = await asyncio.create_subprocess_exec(
        str(VERS),
        "mcp",
        "serve",
        "--http",
        "--port",
        "0",
        *args,
        env={"PATH": os.environ["PATH"], "HOME": str(config), **serve_env(platform, org, config)},
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        lines = [(await asyncio.wait_for(process.stdout.readline(), 60)).decode()]
        listening = LISTENING.match(lines[0])
        assert listening, lines
        if "--token" not in args:
            lines.append((await asyncio.wait_for(process.stdout.readline(), 10)).decode())
        yield listening["url"], lines
    finally:
        process.terminate()
        await process.wait()


async def test_http_needs_the_token_and_tool_errors_carry_the_api_message(platform: Platform, org: Org, tmp_path: Path) -> None:
    async with http_server(platform, org, tmp_path, "--token", "s3cret-token-for-the-test") as (url, _):
        probe = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
        async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-token-for-the-test"}):
                refused = await http.post(url, json=probe, headers={"Accept": "application/json, text/event-stream", **headers})
                assert refused.status_code == 401, refused.text
                assert refused.headers["www-authenticate"].startswith("Bearer")
                assert "bearer token" in refused.json()["error"]

        authorized = httpx2.AsyncClient(headers={"Authorization": "Bearer s3cret-token-for-the-test"}, timeout=60)
        async with authorized, Client(streamable_http_client(url, http_client=authorized)) as agent:
            assert {tool.name for tool in (await agent.list_tools()).tools} == TOOLS
            assert result(await agent.call_tool("status", {})) == {"vms": []}
            missing = error_text(await agent.call_tool("exec", {"vm": MISSING_VM, "command": "true"}))
            assert f"VM '{MISSING_VM}' not found in your organization (HTTP 404)" in missing
            kill_missing = error_text(await agent.call_tool("kill", {"vm": MISSING_VM}))
            assert "not found in your organization (HTTP 404)" in kill_missing
            assert "exactly one side is a VM" in error_text(await agent.call_tool("copy", {"source": "a", "destination": "b"}))

    # With no token given, the server makes one and prints it; that one works and nothing else does.
    async with http_server(platform, org, tmp_path) as (url, lines):
        made = lines[1].removeprefix("  Token: ").strip()
        assert lines[1].startswith("  Token: ") and len(made) >= 32
        async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
            assert (await http.post(url, json={}, headers={"Authorization": "Bearer s3cret-token-for-the-test"})).status_code == 401
        authorized = httpx2.AsyncClient(headers={"Authorization": f"Bearer {made}"}, timeout=60)
        async with authorized, Client(streamable_http_client(url, http_client=authorized)) as agent:
            assert {tool.name for tool in (await agent.list_tools()).tools} == TOOLS


async def test_serve_refuses_bad_credentials_and_stdio_options(platform: Platform, tmp_path: Path) -> None:
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "VERS_URL": platform.url,
        "VERS_API_KEY": "vers_wrong",
        "VERS_CONFIG_DIR": str(tmp_path),
    }
    wrong = await asyncio.create_subprocess_exec(
        str(VERS), "mcp", "serve", env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(wrong.communicate(), 60)
    assert (wrong.returncode, out) == (1, b"")
    assert err.decode().startswith("Error: ") and "(HTTP 401)" in err.decode()

    mixed = await asyncio.create_subprocess_exec(
        str(VERS),
        "mcp",
        "serve",
        "--token",
        "abc",
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(mixed.communicate(), 60)
    assert mixed.returncode == 2 and "go with --http" in err.decode()

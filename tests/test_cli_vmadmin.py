"""`vers label`, `resize`, `info`, `alias`, `checkout`, `status` with sizes, `branch --checkout` and
`vers --version`, run as a user runs them, against the session's platform: one VM and one branch of it."""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Org, Platform
from tests.launcher import STARTED, VERS

pytestmark = pytest.mark.vm

DISK_MIB = 128


class Terminal:
    """Someone at a terminal: their own config folder, the platform's URL and their org's key."""

    def __init__(self, platform: Platform, org: Org, config: Path) -> None:
        self.env = {
            "PATH": str(VERS.parent) + ":/usr/bin:/bin",
            "VERS_URL": platform.url,
            "VERS_API_KEY": org.key,
            "VERS_CONFIG_DIR": str(config),
            "HOME": str(config),
        }

    async def vers(self, *args: str, expect: int = 0, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        result = await asyncio.to_thread(
            subprocess.run, [str(VERS), *args], env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == expect, f"vers {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        assert "Traceback" not in result.stderr, result.stderr
        return result

    async def json(self, *args: str, expect: int = 0) -> Any:
        return json.loads((await self.vers(*args, "--format", "json", expect=expect)).stdout)


async def test_vm_admin_commands(platform: Platform, org: Org, tmp_path: Path) -> None:
    me = Terminal(platform, org, tmp_path / "config")
    vm = STARTED.search((await me.vers("run", "--fs-size", str(DISK_MIB))).stdout)["vm"]  # type: ignore[index]

    # labels: set, list, remove, replace
    labelled = await me.vers("label", vm, "team=web", "tier=1")
    assert labelled.stdout == f"✓ Labelled VM {vm}\n  Labels: team=web, tier=1\n"
    listed = await me.vers("label", vm)
    assert [word for word in listed.stdout.split() if "─" not in word] == ["KEY", "VALUE", "team", "web", "tier", "1"]
    assert await me.json("label", vm, "--remove", "tier", "env=dev") == {"vm_id": vm, "labels": {"team": "web", "env": "dev"}}
    assert (await me.json("label", vm, "--replace", "team=api"))["labels"] == {"team": "api"}
    assert "not KEY=VALUE" in (await me.vers("label", vm, "oops", expect=2)).stderr
    assert "--replace" in (await me.vers("label", vm, "--replace", "--remove", "team", expect=2)).stderr

    # aliases and the current VM
    assert (await me.vers("alias", vm, "dev")).stdout == f"✓ dev → VM {vm}\n"
    assert (await me.json("alias")) == {"dev": vm}
    assert "not valid" in (await me.vers("alias", vm, "bad/name", expect=2)).stderr
    unknown = await me.vers("alias", "00000000-0000-0000-0000-000000000000", "ghost", expect=1)
    assert "not found" in unknown.stderr and "ghost" not in (await me.json("alias"))

    # resize, then sizes in status and info
    resized = await me.vers("resize", "dev", "--size", "192")
    assert resized.stdout == f"✓ Resized the disk of VM {vm} to 192 MiB\n"
    shrink = await me.vers("resize", "dev", "--size", "100", expect=1)
    assert "must be more than the current 192 MiB" in shrink.stderr and "HTTP 400" in shrink.stderr
    assert "--size" in (await me.vers("resize", "dev", expect=2)).stderr
    df = await me.vers("exec", "dev", "--", "df -m / | tail -1")
    assert int(df.stdout.split()[1]) > DISK_MIB

    # a commit, and a branch made current with --checkout
    commit = (await me.json("commit", "dev", "--name", "grown"))["commit_id"]
    kept = await me.json("branch", "dev", "--vm-alias", "side")
    side = kept["vms"][0]["vm_id"]
    assert kept["current_vm_id"] == vm  # without --checkout the current VM stays
    branched = await me.vers("branch", commit, "--checkout")
    assert branched.stdout.splitlines()[-1].startswith("✓ Switched to VM ")
    current = branched.stdout.splitlines()[-1].removeprefix("✓ Switched to VM ")
    assert (await me.json("checkout"))["vm_id"] == current
    assert "--checkout makes one VM" in (await me.vers("branch", "--count", "2", "--checkout", expect=2)).stderr

    info = await me.json("info")  # the current VM: the branch made by --checkout
    assert info["vm"]["vm_id"] == current
    assert (info["vm"]["fs_size_mib"], info["vm"]["parent_commit_id"], info["vm"]["grandparent_vm_id"]) == (192, commit, vm)
    assert next(step["id"] for step in info["lineage"]) == commit
    text = (await me.vers("info", current)).stdout
    for line in (
        "Disk:",
        "192 MiB",
        "Memory:",
        "vCPUs:",
        "Network:",
        "IP:",
        f"Parent commit:  {commit}",
        f"Grandparent VM: {vm}",
        "Lineage:",
        commit,
    ):
        assert line in text, text
    root = (await me.vers("info", "dev")).stdout
    assert "a root VM" in root and "Labels:" + " " * 9 + "team=api" in root

    switched = await me.vers("checkout", "side")
    assert switched.stdout == f"✓ Switched to VM {side} (side), running\n"
    assert (await me.json("checkout"))["vm_id"] == side

    status = await me.vers("status")
    rows = {line.split()[0]: line for line in status.stdout.splitlines()[1:] if line.strip() and "─" not in line}
    assert "MEMORY" in status.stdout and "DISK" in status.stdout
    assert "192 MiB" in rows[vm] and "256 MiB" in rows[vm]
    assert f"{side} *" in status.stdout  # the current VM is marked
    sizes = {v["vm_id"]: (v["mem_size_mib"], v["fs_size_mib"]) for v in await me.json("status")}
    assert sizes[vm] == sizes[side] == (256, 192)
    assert "Disk:" in (await me.vers("status", "dev")).stdout

    for vm_id in (current, side, vm):
        await me.vers("kill", vm_id)


async def test_version_names_the_cli_and_the_server(platform: Platform, org: Org, tmp_path: Path) -> None:
    me = Terminal(platform, org, tmp_path / "config")
    mine = importlib.metadata.version("vers-platform")
    shown = (await me.vers("--version")).stdout.splitlines()
    assert shown[0] == f"vers {mine} (CLI)"
    assert shown[1].startswith(f"server: orchestrator {mine} (git ") and shown[1].endswith(f" at {platform.url}")
    # no key is needed, and a server that does not answer is said, not an error
    assert (await me.vers("--version", env={"VERS_API_KEY": ""})).stdout.splitlines()[1].startswith("server: orchestrator")
    gone = await me.vers("--version", env={"VERS_URL": "http://127.0.0.1:9"})
    assert gone.stdout.splitlines()[1].startswith("server: could not reach http://127.0.0.1:9")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["label", "vm", "a=b", "--replace", "--remove", "a"], "--replace"),
        (["resize", "vm"], "--size"),
        (["resize", "vm", "--size", "0"], "--size"),
        (["alias", "vm"], "give the alias too"),
        (["branch", "vm", "--count", "2", "--checkout"], "--checkout makes one VM"),
    ],
)
def test_bad_arguments_fail_before_any_request(tmp_path: Path, args: list[str], message: str) -> None:
    env = {"PATH": "/usr/bin:/bin", "VERS_URL": "http://127.0.0.1:9", "VERS_API_KEY": "vers_x", "VERS_CONFIG_DIR": str(tmp_path)}
    result = subprocess.run([str(VERS), *args], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and message in result.stderr, result.stderr

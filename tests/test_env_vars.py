"""The org's environment variables: the official SDK's list/set/delete, names and values checked, the limit;
on a real VM they are in /etc/environment, in every exec (the org's current ones, under the request's own)
and in the console's shell; a branch keeps what its commit had. Values never reach a log record of the
platform nor the data folder in plaintext (only the guests' own disks and memory hold them)."""

from __future__ import annotations

import logging
import stat
import subprocess
import uuid
from pathlib import Path

import pytest
import pytest_asyncio
import vers_sdk
import websockets

from tests.conftest import Org, Platform
from tests.test_vms import console_url, new_vm, out, read_until

pytestmark = pytest.mark.vm

# Loggers of the test's own clients, not of the platform.
TEST_CLIENTS = ("httpx", "httpcore", "websockets.client")
# Both kinds of quotes, and what a shell would expand: written in shell quoting.
TRICKY = 'it\'s a "quoted" $HOME `x` \\ value'


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def team(platform: Platform) -> Org:
    return await platform.new_org("envs")


def sdk(platform: Platform, org: Org) -> vers_sdk.VersSdkClient:
    return vers_sdk.VersSdkClient(base_url=platform.url, api_key=org.key, max_retries=0)


async def test_set_upsert_replace_delete_and_what_is_refused(platform: Platform, org: Org, other_org: Org) -> None:
    client = sdk(platform, org)
    assert (await client.list_env_vars()).get("vars", {}) == {}
    assert (await client.set_env_vars({"vars": {"A": "1", "B": "two words"}}))["vars"] == {"A": "1", "B": "two words"}
    upserted = await client.set_env_vars({"vars": {"B": "3", "C_": ""}, "replace": False})
    assert upserted["vars"] == {"A": "1", "B": "3", "C_": ""}
    assert (await client.list_env_vars())["vars"] == {"A": "1", "B": "3", "C_": ""}
    long_name = "N" * 256
    replaced = await client.set_env_vars({"vars": {"D": "x" * 8192, long_name: "y"}, "replace": True})
    assert replaced["vars"] == {"D": "x" * 8192, long_name: "y"}
    assert await client.delete_env_var(long_name) == {"key": long_name}
    with pytest.raises(vers_sdk.NotFoundError):
        await client.delete_env_var(long_name)  # deleting a variable that is not set: 404

    async with platform.client(org) as http:
        for variables in ({"1A": "v"}, {"A-B": "v"}, {"": "v"}, {"N" * 257: "v"}, {"OK": "x" * 8193}, {"OK": "a\x00b"}):
            answer = await http.put("/api/v1/env_vars", json={"vars": variables})
            assert answer.status_code == 400, (variables, answer.text)
            assert "x" * 100 not in answer.json()["error"], "a value is never echoed"
        assert (await http.put("/api/v1/env_vars", json={"replace": True})).status_code == 400  # vars is required
        assert (await http.delete("/api/v1/env_vars/not-a-name")).status_code == 400
        many = {f"V{i}": str(i) for i in range(platform.settings.org_max_env_vars + 1)}
        refused = await http.put("/api/v1/env_vars", json={"vars": many})
        assert refused.status_code == 429 and "VERS_ORG_MAX_ENV_VARS" in refused.json()["error"], refused.text
        assert (await http.put("/api/v1/env_vars", json={"vars": many, "replace": True})).status_code == 429
    assert (await client.list_env_vars())["vars"] == {"D": "x" * 8192}, "a refused set changes nothing"
    assert (await sdk(platform, other_org).list_env_vars()).get("vars", {}) == {}
    await client.close()


def guest_storage(platform: Platform) -> set[Path]:
    """Folders that hold what guests wrote, as they wrote it: their disks and memory (the engine's layers,
    commits and sleeping VMs) and their commands' output (the VMs' exec logs: this test prints the values)."""
    data = platform.settings.data_dir.resolve()
    return {data / "layers", data / "commits", data / "sleeping", data / "exec-logs"}


async def test_vms_execs_and_consoles_get_them_and_nothing_logs_them(
    platform: Platform, team: Org, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # every record of the services in this process, at every level
    secret, rotated = f"s3cr3t-{uuid.uuid4().hex}", f"r0tated-{uuid.uuid4().hex}"
    client = sdk(platform, team)
    await client.set_env_vars({"vars": {"VERS_TEST_SECRET": secret, "TRICKY": TRICKY, "SPACED": "two words"}})
    key = platform.settings.data_dir / "env-vars.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600

    async with platform.client(team) as http:
        vm = await new_vm(http, mem_size_mib=128)
        env = await out(http, vm, "env")
        assert f"VERS_TEST_SECRET={secret}\n" in env and f"TRICKY={TRICKY}\n" in env, env
        mine = await http.post(f"/api/v1/vm/{vm}/exec", json={"command": ["sh", "-c", 'printf %s "$SPACED"'], "env": {"SPACED": "mine"}})
        assert mine.json()["stdout"] == "mine", "the request's own variables win"
        # /etc/environment: private, and read by a shell's `.` as set
        assert await out(http, vm, "stat -c %a /etc/environment") == "600\n"
        read = 'env -i sh -c \'. /etc/environment; printf "%s|%s|%s" "$VERS_TEST_SECRET" "$TRICKY" "$SPACED"\''
        assert await out(http, vm, read) == f"{secret}|{TRICKY}|two words"

        # the console's shell has them
        async with websockets.connect(console_url(platform, vm), additional_headers=team.auth) as socket:
            await socket.send(b"printf '<%s>\\n' \"$VERS_TEST_SECRET\"\r")
            await read_until(socket, f"<{secret}>".encode())
            await socket.send(b"printf '[%s]\\n' \"$TRICKY\"\r")
            await read_until(socket, f"[{TRICKY}]".encode())

        # changed: execs get the current value at once; the VM's /etc/environment is what it booted with,
        # and a branch keeps that file as its commit had it
        await client.set_env_vars({"vars": {"VERS_TEST_SECRET": rotated}})
        assert await out(http, vm, 'printf %s "$VERS_TEST_SECRET"') == rotated
        branched = await http.post(f"/api/v1/vm/{vm}/branch")
        assert branched.status_code == 201, branched.text
        branch = branched.json()["vms"][0]["vm_id"]
        assert f"VERS_TEST_SECRET='{secret}'" in await out(http, branch, "cat /etc/environment")
        assert await out(http, branch, 'printf %s "$VERS_TEST_SECRET"') == rotated
        await client.delete_env_var("SPACED")
        assert await out(http, branch, 'printf %s "${SPACED-unset}"') == "unset"
        for gone in (branch, vm):
            assert (await http.delete(f"/api/v1/vm/{gone}")).status_code == 200
    await client.close()

    # the test's own clients (httpx, the console's WebSocket client) log what they send and receive: not the platform's
    platform_records = [r for r in caplog.records if not r.name.startswith(TEST_CLIENTS)]
    assert any(r.name.startswith("aiosqlite") for r in platform_records), "the services' debug records were captured"
    logged = [record for record in platform_records if any(s in record.getMessage() for s in (secret, rotated, TRICKY))]
    assert not logged, [record.getMessage()[:200] for record in logged]
    # nothing of the platform's own holds a value in plaintext (the database, its journal, the key file...).
    # Read by another process: closing a file this process opened on a database drops every POSIX lock this
    # process holds on it, and the platform's own SQLite connections live in this process.
    data = platform.settings.data_dir.resolve()
    excluded = [f"--exclude-dir={folder.name}" for folder in guest_storage(platform)]
    for value in (secret, rotated):
        found = subprocess.run(["grep", "-rlF", *excluded, "--", value, str(data)], capture_output=True, text=True)
        assert found.returncode == 1 and not found.stdout, f"{found.stdout.strip()} hold(s) a value in plaintext"

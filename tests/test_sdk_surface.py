"""The rest of the official SDK's surface (vm-api-more.md §12), driven by `vers-sdk` 1.20.0 unchanged: one
test per method, each checking the answer's fields, on one VM of one org. The five image methods have a module of
their own (test_images_api.py, with the same check that each has its test). The features' own modules test each
one in depth."""

from __future__ import annotations

import base64
import inspect
import json
import sys
import uuid
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from vers_sdk import BadRequestError, NotFoundError, VersSdkClient
from vers_sdk import models as M

from tests.conftest import Org, Platform

pytestmark = pytest.mark.vm

# vm-api-more.md §12, in its order; the images' methods (20-24) are in test_images_api.py.
METHODS = (
    "exec_vm_stream", "exec_vm_stream_attach", "vm_logs", "read_file_vm", "write_file_vm", "upsert_vm_labels",
    "replace_vm_labels", "delete_vm_label", "resize_vm_disk", "ssh_key", "update_commit", "list_public_commits",
    "list_domains", "create_domain", "get_domain", "delete_domain", "list_env_vars", "set_env_vars", "delete_env_var",
    "deploy_handler", "version_handler",
)  # fmt: skip


class World:
    def __init__(self, platform: Platform, org: Org, sdk: VersSdkClient, vm_id: str) -> None:
        self.platform, self.org, self.sdk, self.vm_id = platform, org, sdk, vm_id


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def world(platform: Platform) -> AsyncIterator[World]:
    org = await platform.new_org("surface")
    async with VersSdkClient(base_url=platform.url, api_key=org.key, max_retries=0) as sdk:
        made = await sdk.create_new_root_vm({"vm_config": {}}, M.CreateNewRootVmParams(wait_boot=True))
        yield World(platform, org, sdk, made["vm_id"])
        await sdk.delete_vm(made["vm_id"])


def test_every_method_of_the_spec_is_here_and_in_the_sdk() -> None:
    tested = {name.removeprefix("test_") for name, _ in inspect.getmembers(sys.modules[__name__], inspect.iscoroutinefunction)}
    for method in METHODS:
        assert callable(getattr(VersSdkClient, method)), method
        assert method in tested, f"no test_{method}"


async def test_exec_vm_stream(world: World) -> None:
    # The SDK reads the whole body as one JSON document: a command with no output streams one event.
    exit_event = await world.sdk.exec_vm_stream(world.vm_id, {"command": ["true"]})
    assert exit_event["type"] == "exit" and exit_event["exit_code"] == 0
    assert uuid.UUID(exit_event["exec_id"]) and exit_event["cursor"] == 1


async def test_exec_vm_stream_attach(world: World) -> None:
    exec_id = str(uuid.uuid4())
    lines = []
    async with world.sdk._client.stream(
        "POST", f"/api/v1/vm/{world.vm_id}/exec/stream", json={"command": ["sh", "-c", "echo one; echo two >&2"], "exec_id": exec_id}
    ) as answer:
        assert answer.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) async for line in answer.aiter_lines() if line]
    assert lines[-1]["type"] == "exit" and lines[-1]["exit_code"] == 0
    assert {line["exec_id"] for line in lines} == {exec_id}
    assert [line["cursor"] for line in lines] == list(range(1, len(lines) + 1))
    resumed = await world.sdk.exec_vm_stream_attach(world.vm_id, {"exec_id": exec_id, "cursor": lines[-2]["cursor"]})
    assert resumed == lines[-1]
    with pytest.raises(NotFoundError):
        await world.sdk.exec_vm_stream_attach(world.vm_id, {"exec_id": str(uuid.uuid4())})


async def test_vm_logs(world: World) -> None:
    await world.sdk.exec_vm(world.vm_id, {"command": ["sh", "-c", "echo logged-out; echo logged-err >&2"]})
    logs = await world.sdk.vm_logs(world.vm_id, M.VmLogsParams(offset=0, max_entries=1000))
    assert set(logs) >= {"entries", "eof", "next_offset"} and logs["eof"] is True
    seen = {(e["stream"], base64.b64decode(e["data_b64"])) for e in logs["entries"]}
    assert ("stdout", b"logged-out\n") in seen and ("stderr", b"logged-err\n") in seen
    assert all(e["timestamp"] and e["exec_id"] for e in logs["entries"])
    only_err = await world.sdk.vm_logs(world.vm_id, M.VmLogsParams(stream="stderr", max_entries=1000))
    assert {e["stream"] for e in only_err["entries"]} == {"stderr"}
    after = await world.sdk.vm_logs(world.vm_id, M.VmLogsParams(offset=logs["next_offset"]))
    assert after["entries"] == [] and after["eof"] is True


async def test_write_file_vm(world: World) -> None:
    content = bytes(range(256))
    written = await world.sdk.write_file_vm(
        world.vm_id, {"path": "/srv/sdk/blob.bin", "content_b64": base64.b64encode(content).decode(), "mode": 0o600, "create_dirs": True}
    )
    assert written == {} or isinstance(written, dict)
    mode = await world.sdk.exec_vm(world.vm_id, {"command": ["stat", "-c", "%a %s", "/srv/sdk/blob.bin"]})
    assert mode["stdout"].split() == ["600", "256"]


async def test_read_file_vm(world: World) -> None:
    await world.sdk.exec_vm(world.vm_id, {"command": ["sh", "-c", "printf 'hello\\000world' > /tmp/read-me"]})
    answer = await world.sdk.read_file_vm(world.vm_id, M.ReadFileVmParams(path="/tmp/read-me"))
    assert base64.b64decode(answer["content_b64"]) == b"hello\x00world"
    with pytest.raises(NotFoundError):
        await world.sdk.read_file_vm(world.vm_id, M.ReadFileVmParams(path="/tmp/no-such-file"))
    with pytest.raises(BadRequestError):
        await world.sdk.read_file_vm(world.vm_id)


async def test_upsert_vm_labels(world: World) -> None:
    await world.sdk.upsert_vm_labels(world.vm_id, {"labels": {"team": "core", "tier": "dev"}})
    await world.sdk.upsert_vm_labels(world.vm_id, {"labels": {"tier": "prod"}})
    assert (await world.sdk.vm_status(world.vm_id))["labels"] == {"team": "core", "tier": "prod"}
    with pytest.raises(BadRequestError):
        await world.sdk.upsert_vm_labels(world.vm_id, {})


async def test_replace_vm_labels(world: World) -> None:
    await world.sdk.replace_vm_labels(world.vm_id, {"labels": {"only": "this"}})
    assert (await world.sdk.vm_status(world.vm_id))["labels"] == {"only": "this"}


async def test_delete_vm_label(world: World) -> None:
    await world.sdk.replace_vm_labels(world.vm_id, {"labels": {"a": "1", "b": "2"}})
    await world.sdk.delete_vm_label(world.vm_id, "a")
    assert (await world.sdk.vm_status(world.vm_id))["labels"] == {"b": "2"}


async def test_resize_vm_disk(world: World) -> None:
    before = await world.sdk.exec_vm(world.vm_id, {"command": ["df", "-m", "/"]})
    size_before = int(before["stdout"].splitlines()[1].split()[1])
    await world.sdk.resize_vm_disk(world.vm_id, {"fs_size_mib": size_before + 512}, M.ResizeVmDiskParams(skip_wait_boot=False))
    after = await world.sdk.exec_vm(world.vm_id, {"command": ["df", "-m", "/"]})
    assert int(after["stdout"].splitlines()[1].split()[1]) >= size_before + 400
    with pytest.raises(BadRequestError):
        await world.sdk.resize_vm_disk(world.vm_id, {"fs_size_mib": 64})


async def test_ssh_key(world: World) -> None:
    key = await world.sdk.ssh_key(world.vm_id)
    assert key["ssh_port"] == 22 and key["ssh_private_key"].startswith("-----BEGIN OPENSSH PRIVATE KEY-----")


async def test_update_commit(world: World) -> None:
    commit_id = (await world.sdk.commit_vm(world.vm_id, {"name": "surface"}))["commit_id"]
    info = await world.sdk.update_commit(commit_id, {"is_public": False, "name": "renamed", "description": None})
    assert info["commit_id"] == commit_id and info["name"] == "renamed" and info["is_public"] is False
    assert set(info) >= {"commit_id", "created_at", "is_public", "name", "owner_id", "description", "parent_vm_id", "grandparent_commit_id"}


async def test_list_public_commits(world: World) -> None:
    commit_id = (await world.sdk.commit_vm(world.vm_id, {"name": "shared"}))["commit_id"]
    await world.sdk.update_commit(commit_id, {"is_public": True})
    listed = await world.sdk.list_public_commits()
    assert set(listed) >= {"commits", "limit", "offset", "total"}
    mine = [c for c in listed["commits"] if c["commit_id"] == commit_id]
    assert mine and mine[0]["is_public"] is True and mine[0]["owner_id"] == world.org.id


async def test_create_domain(world: World) -> None:
    name = f"surface-{uuid.uuid4().hex[:8]}"
    made = await world.sdk.create_domain({"domain": name, "vm_id": world.vm_id})
    assert made["domain"].startswith(name) and made["vm_id"] == world.vm_id and uuid.UUID(made["domain_id"])


async def test_list_domains(world: World) -> None:
    listed = await world.sdk.list_domains(M.ListDomainsParams(vm_id=world.vm_id))
    assert isinstance(listed, list) and all(d["vm_id"] == world.vm_id for d in listed)


async def test_get_domain(world: World) -> None:
    made = await world.sdk.create_domain({"domain": f"get-{uuid.uuid4().hex[:8]}", "vm_id": world.vm_id})
    assert (await world.sdk.get_domain(made["domain_id"]))["domain_id"] == made["domain_id"]


async def test_delete_domain(world: World) -> None:
    made = await world.sdk.create_domain({"domain": f"del-{uuid.uuid4().hex[:8]}", "vm_id": world.vm_id})
    assert (await world.sdk.delete_domain(made["domain_id"]))["domain_id"] == made["domain_id"]
    with pytest.raises(NotFoundError):
        await world.sdk.get_domain(made["domain_id"])


async def test_set_env_vars(world: World) -> None:
    answer = await world.sdk.set_env_vars({"vars": {"SURFACE_A": "1", "SURFACE_B": "two words"}, "replace": True})
    assert answer == {"vars": {"SURFACE_A": "1", "SURFACE_B": "two words"}}
    answer = await world.sdk.set_env_vars({"vars": {"SURFACE_A": "one"}})
    assert answer["vars"] == {"SURFACE_A": "one", "SURFACE_B": "two words"}
    seen = await world.sdk.exec_vm(world.vm_id, {"command": ["sh", "-c", 'echo "$SURFACE_A|$SURFACE_B"']})
    assert seen["stdout"] == "one|two words\n"
    with pytest.raises(BadRequestError):
        await world.sdk.set_env_vars({"vars": {"1BAD": "x"}})


async def test_list_env_vars(world: World) -> None:
    await world.sdk.set_env_vars({"vars": {"LISTED": "yes"}})
    assert (await world.sdk.list_env_vars())["vars"]["LISTED"] == "yes"


async def test_delete_env_var(world: World) -> None:
    await world.sdk.set_env_vars({"vars": {"GONE": "soon"}})
    await world.sdk.delete_env_var("GONE")
    assert "GONE" not in (await world.sdk.list_env_vars())["vars"]


async def test_deploy_handler(world: World) -> None:
    # The clone cannot reach anything from here (guests' DNS goes nowhere in the suite): the deploy is
    # accepted, its VM made, and its session's exit event says the clone failed.
    answer = await world.sdk.deploy_handler({"repo": "example/app", "name": f"surface-{uuid.uuid4().hex[:6]}"})
    assert answer["status"] == "deploying" and uuid.UUID(answer["project_id"]) and uuid.UUID(answer["vm_id"])
    events = []
    async with world.sdk._client.stream(
        "POST", f"/api/v1/vm/{answer['vm_id']}/exec/stream/attach", json={"exec_id": answer["project_id"]}, timeout=600
    ) as stream:
        events = [json.loads(line) async for line in stream.aiter_lines() if line]
    assert events[-1]["type"] == "exit" and events[-1]["exit_code"] != 0
    await world.sdk.delete_vm(answer["vm_id"])
    with pytest.raises(BadRequestError):
        await world.sdk.deploy_handler({"repo": "--upload-pack=evil"})


async def test_version_handler(world: World) -> None:
    version = await world.sdk.version_handler()
    assert version["executable_name"] == "orchestrator"
    assert version["workspace_version"] and version["git_hash"]

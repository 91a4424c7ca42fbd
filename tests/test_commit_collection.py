"""The orchestrator's side of registry governance, with real VMs: the bytes a commit holds alone and shares
with others, the collection of commits (a dry run that lists exactly what a real run deletes and frees, none
that a VM stands on), the secret scan of a commit's disk and memory, and the audit entries of deletions."""

from __future__ import annotations

import json
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from services.common.auth import ServiceCredential
from tests.conftest import Org, Platform
from vers.common.v1 import governance_pb2
from vers.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc

pytestmark = pytest.mark.vm

SMALL_VM = {"vm_config": {"mem_size_mib": 128}}
# An OpenSSH private key's shape with a random body: what a guest that made itself a key pair holds.
PLANTED_KEY = (
    "k=/root/id_ed25519; { echo '-----BEGIN OPENSSH PRIVATE KEY-----'; head -c 300 /dev/urandom | base64 | tr -d '\\n' "
    "| fold -w 70; echo; echo '-----END OPENSSH PRIVATE KEY-----'; } > $k && chmod 600 $k && sync"
)


async def new_vm(http: httpx.AsyncClient) -> str:
    answer = await http.post("/api/v1/vm/new_root?wait_boot=true", json=SMALL_VM)
    assert answer.status_code == 201, answer.text
    return str(answer.json()["vm_id"])


async def sh(http: httpx.AsyncClient, vm_id: str, script: str) -> str:
    answer = await http.post(f"/api/v1/vm/{vm_id}/exec", json={"command": ["sh", "-c", script]})
    assert answer.status_code == 200, answer.text
    assert answer.json()["exit_code"] == 0, answer.json()
    return str(answer.json()["stdout"])


async def commit(http: httpx.AsyncClient, vm_id: str, name: str = "") -> str:
    answer = await http.post(f"/api/v1/vm/{vm_id}/commit", json={"name": name})
    assert answer.status_code == 201, answer.text
    return str(answer.json()["commit_id"])


async def branch(http: httpx.AsyncClient, commit_id: str) -> str:
    answer = await http.post(f"/api/v1/vm/branch/by_commit/{commit_id}", json={})
    assert answer.status_code == 201, answer.text
    return str(answer.json()["vms"][0]["vm_id"])


async def write_file(http: httpx.AsyncClient, vm_id: str, name: str, mib: int) -> None:
    await sh(http, vm_id, f"head -c {mib * 1024 * 1024} /dev/urandom > /root/{name} && sync")


def rows(platform: Platform, query: str, *args: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(platform.settings.data_dir / "orchestrator.db") as db:
        return db.execute(query, args).fetchall()


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512 if path.exists() else 0


def folder_bytes(platform: Platform, commit_id: str) -> int:
    return sum(allocated(path) for path in (platform.settings.data_dir / "commits" / commit_id).iterdir())


def layer_bytes(platform: Platform, commit_id: str) -> int:
    """Allocated bytes of the layer the commit froze."""
    [(layer_id,)] = rows(platform, "SELECT layer_id FROM commits WHERE id = ?", commit_id)
    return allocated(platform.settings.data_dir / "layers" / f"{layer_id}.qcow2")


def stored_bytes(platform: Platform) -> int:
    """What the data folder's commits and layers take on disk."""
    data = platform.settings.data_dir
    return sum(allocated(path) for folder in (data / "commits", data / "layers") for path in folder.rglob("*") if path.is_file())


async def sizes(http: httpx.AsyncClient, commit_id: str) -> tuple[int, int]:
    answer = await http.get(f"/api/v1/commits/{commit_id}")
    assert answer.status_code == 200, answer.text
    return int(answer.json()["bytes_alone"]), int(answer.json()["bytes_shared"])


def internal(platform: Platform, org: Org) -> tuple[str, tuple[tuple[str, str], ...]]:
    """The orchestrator's address, and the platform's service credential acting for the org."""
    settings = platform.settings
    return settings.addr("orchestrator"), ServiceCredential.load(settings.service_secret, settings.service_secret_file).metadata(org.id)


async def test_a_commit_holds_alone_what_nothing_else_stands_on(platform: Platform, org: Org) -> None:
    async with platform.client(org) as http:
        vm = await new_vm(http)
        await write_file(http, vm, "first", 3)
        first = await commit(http, vm)  # freezes the root layer; the VM goes on on a layer above it
        await write_file(http, vm, "second", 5)
        second = await commit(http, vm)  # freezes the layer with `second`
        # While the VM runs, its chain passes through both frozen layers: each commit holds only its memory.
        assert await sizes(http, second) == (folder_bytes(platform, second), layer_bytes(platform, second) + layer_bytes(platform, first))
        assert layer_bytes(platform, second) >= 5 * 1024 * 1024

        child = await branch(http, second)  # a branch stands on the second commit's chain
        assert (await http.delete(f"/api/v1/vm/{vm}")).status_code == 200
        # The VM is gone: nothing but the second commit stands on its layer any more; the branch still does.
        child_commit = await commit(http, child)
        assert (await http.delete(f"/api/v1/vm/{child}")).status_code == 200
        only_second = layer_bytes(platform, second)
        shared_root = layer_bytes(platform, first)
        assert await sizes(http, first) == (folder_bytes(platform, first), shared_root)
        # The branch's commit froze the branch's own layer and stands on the second commit's chain: the second
        # commit's layer is now shared with it, the branch's layer is its own.
        assert await sizes(http, second) == (folder_bytes(platform, second), only_second + shared_root)
        assert await sizes(http, child_commit) == (
            folder_bytes(platform, child_commit) + layer_bytes(platform, child_commit),
            only_second + shared_root,
        )
        listed = (await http.get("/api/v1/commits")).json()["commits"]
        listed = {c["commit_id"]: (int(c["bytes_alone"]), int(c["bytes_shared"])) for c in listed}
        assert listed[child_commit] == await sizes(http, child_commit)

        # Deleting the branch's commit frees exactly what it held alone; the second commit then holds its layer alone.
        alone, _ = await sizes(http, child_commit)
        before = stored_bytes(platform)
        assert (await http.delete(f"/api/v1/commits/{child_commit}")).status_code == 204
        assert before - stored_bytes(platform) == alone
        assert await sizes(http, second) == (folder_bytes(platform, second) + only_second, shared_root)

        # The deletion is in the audit log, with the key that asked for it.
        address, as_org = internal(platform, org)
        async with grpc.aio.insecure_channel(address) as channel:
            stub = orchestrator_pb2_grpc.OrchestratorInternalServiceStub(channel)
            audit = await stub.ListAuditEvents(orchestrator_pb2.ListAuditEventsRequest(type="commit"), metadata=as_org)
        [event] = audit.events
        assert (event.type, event.target, event.org_id, event.after) == ("commit.delete", child_commit, org.id, "")
        assert event.api_key_id and json.loads(event.before) == {"name": f"commit of {child}"}
        for commit_id in (first, second):
            assert (await http.delete(f"/api/v1/commits/{commit_id}")).status_code == 204


async def test_collection_frees_what_its_dry_run_said_and_keeps_what_a_vm_stands_on(platform: Platform, org: Org, other_org: Org) -> None:
    async with platform.client(org) as http, platform.client(other_org) as other:
        vm = await new_vm(http)
        made = []
        for index in range(4):
            await write_file(http, vm, f"file-{index}", 2 + index)
            made.append(await commit(http, vm, f"c{index}"))
        young, used, chained, last = made
        child = await branch(http, used)  # stands on `used` (restored from it) and on the root layer
        await write_file(http, child, "child", 2)
        protected = await commit(http, child, "protected")
        assert (await http.delete(f"/api/v1/vm/{vm}")).status_code == 200
        foreign_vm = await new_vm(other)
        foreign = await commit(other, foreign_vm)
        assert (await other.delete(f"/api/v1/vm/{foreign_vm}")).status_code == 200

        request = orchestrator_pb2.CollectCommitsRequest(
            candidates=[
                governance_pb2.RetentionCandidate(commit_id=young, reason="keep-last", min_age_days=1),  # too young
                *(governance_pb2.RetentionCandidate(commit_id=c, reason="keep-last") for c in (used, last, chained, protected)),
                governance_pb2.RetentionCandidate(commit_id=foreign, reason="keep-last"),  # another org's
                governance_pb2.RetentionCandidate(commit_id=str(uuid.uuid4()), reason="keep-last"),  # none such
            ],
            protected_commit_ids=[protected],
            untagged_older_than_days=1,  # none is that old
            dry_run=True,
        )
        address, as_org = internal(platform, org)
        async with grpc.aio.insecure_channel(address) as channel:
            stub = orchestrator_pb2_grpc.OrchestratorInternalServiceStub(channel)
            # The branch is paused while the disk is measured: nothing but the collection changes it.
            assert (await http.patch(f"/api/v1/vm/{child}/state", json={"state": "Paused"})).status_code == 200
            before = stored_bytes(platform)
            dry = await stub.CollectCommits(request, metadata=as_org)
            assert [c.commit_id for c in dry.commits] == [chained, last]  # oldest first
            # `chained` froze a layer only `last` stands on besides it: that layer is counted once, with it.
            assert dry.commits[0].bytes_freed == folder_bytes(platform, chained) + layer_bytes(platform, chained)
            assert dry.commits[1].bytes_freed == folder_bytes(platform, last) + layer_bytes(platform, last)
            assert dry.bytes_freed == sum(c.bytes_freed for c in dry.commits)
            assert stored_bytes(platform) == before and (await http.get(f"/api/v1/commits/{last}")).status_code == 200

            request.dry_run = False
            real = await stub.CollectCommits(request, metadata=as_org)
            assert real.commits == dry.commits
            assert before - stored_bytes(platform) == dry.bytes_freed == real.bytes_freed
            audit = await stub.ListAuditEvents(orchestrator_pb2.ListAuditEventsRequest(type="commit.delete"), metadata=as_org)
            reason = {"reason": "keep-last"}
            assert [(e.target, json.loads(e.after), e.api_key_id) for e in audit.events] == [(chained, reason, ""), (last, reason, "")]
            assert len((await stub.CollectCommits(request, metadata=as_org)).commits) == 0

            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.CollectCommits(request, metadata=org.metadata)  # an org's own key is not the platform
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED

        for gone in (chained, last):
            assert (await http.get(f"/api/v1/commits/{gone}")).status_code == 404
        for kept in (young, used, protected):
            assert (await http.get(f"/api/v1/commits/{kept}")).status_code == 200
        assert (await other.get(f"/api/v1/commits/{foreign}")).status_code == 200
        # The branch still runs on its chain, and its source still restores.
        assert (await http.patch(f"/api/v1/vm/{child}/state", json={"state": "Running"})).status_code == 200
        assert (await sh(http, child, "wc -c < /root/file-1")).strip() == str(3 * 1024 * 1024)
        again = await branch(http, used)
        files = (await sh(http, again, "ls /root")).split()
        assert {"file-0", "file-1"} <= set(files) and "file-2" not in files
        for vm_id in (child, again):
            assert (await http.delete(f"/api/v1/vm/{vm_id}")).status_code == 200


async def test_scan_finds_a_private_key_once_per_rule_set_and_a_fork_waits_for_a_clean_or_forced_scan(
    platform: Platform, org: Org, other_org: Org
) -> None:
    secrets = pytest.importorskip("services.orchestrator.secrets")
    async with platform.client(org) as http, platform.client(other_org) as forker:
        vm = await new_vm(http)
        await sh(http, vm, PLANTED_KEY)
        body = (await sh(http, vm, "sed -n 2p /root/id_ed25519")).strip()
        dirty = await commit(http, vm)
        assert (await http.delete(f"/api/v1/vm/{vm}")).status_code == 200
        # Public before the tag existed: nothing was scanned when it was made public.
        assert (await http.post("/api/v1/repositories", json={"name": "demo"})).status_code == 201
        assert (await http.patch("/api/v1/repositories/demo/visibility", json={"is_public": True})).status_code == 200
        assert (await http.post("/api/v1/repositories/demo/tags", json={"tag_name": "latest", "commit_id": dirty})).status_code == 201
        fork = {"source_org": org.name, "source_repo": "demo", "source_tag": "latest"}

        refused = await forker.post("/api/v1/repositories/fork", json=fork)
        assert refused.status_code == 409, refused.text
        message = refused.json()["error"]
        assert "secret scan" in message and "publish it again" in message, message
        assert "id_ed25519" not in refused.text and "findings" not in refused.json(), refused.text
        [(scanned_at,)] = rows(platform, "SELECT scanned_at FROM secret_scans WHERE commit_id = ?", dirty)  # scanned by the fork

        address, as_org = internal(platform, org)
        async with grpc.aio.insecure_channel(address) as channel:
            stub = orchestrator_pb2_grpc.OrchestratorInternalServiceStub(channel)
            request = orchestrator_pb2.ScanCommitsRequest(commit_ids=[dirty, dirty])
            first, second = await stub.ScanCommits(request, metadata=as_org), await stub.ScanCommits(request, metadata=as_org)
            on_disk = [f for f in first.findings if f.where == "disk" and f.path == "/root/id_ed25519"]
            assert on_disk and all(f.commit_id == dirty for f in first.findings), first.findings
            assert all(body[10:40] not in f.excerpt for f in first.findings)  # redacted
            assert first == second
            scans = rows(platform, "SELECT rules_version, scanned_at, forced_at FROM secret_scans WHERE commit_id = ?", dirty)
            assert scans == [(secrets.RULES_VERSION, scanned_at, None)]  # kept, not scanned again

            purpose = "repository demo made public"
            forcing = orchestrator_pb2.ScanCommitsRequest(commit_ids=[dirty], force=True, purpose=purpose)
            forced = await stub.ScanCommits(forcing, metadata=as_org)
            assert forced.findings == first.findings
            [(forced_at, noted)] = rows(platform, "SELECT forced_at, purpose FROM secret_scans WHERE commit_id = ?", dirty)
            assert forced_at is not None and noted == purpose

            with pytest.raises(grpc.aio.AioRpcError) as foreign:
                await stub.ScanCommits(request, metadata=internal(platform, other_org)[1])
            assert foreign.value.code() == grpc.StatusCode.NOT_FOUND

        # Published despite its findings, by its owner's choice: it forks.
        forked = await forker.post("/api/v1/repositories/fork", json=fork)
        assert forked.status_code == 201, forked.text
        assert (await forker.delete(f"/api/v1/vm/{forked.json()['vm_id']}")).status_code == 200

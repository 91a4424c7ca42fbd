"""Publishing commits, on real VMs: the official SDK's update_commit and list_public_commits, the secret scan
that refuses a commit holding a key, another org branching and restoring a public commit by id (its VMs in
its own quotas, the commit read-only for it, its owner's private lineage hidden, its deletion refused while
they stand on it), unpublishing, and `vers commit publish|unpublish|history|delete`."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import vers_sdk

from tests.conftest import Org, Platform
from tests.test_governance import private_key
from tests.test_vms import new_vm, out, sh

pytestmark = pytest.mark.vm

VERS = Path(sys.executable).parent / "vers"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def owner(platform: Platform) -> Org:
    return await platform.new_org("publisher")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def brancher(platform: Platform) -> Org:
    return await platform.new_org("brancher")


def sdk(platform: Platform, org: Org) -> vers_sdk.VersSdkClient:
    return vers_sdk.VersSdkClient(base_url=platform.url, api_key=org.key, max_retries=0)


async def commit(http: httpx.AsyncClient, vm: str, name: str) -> str:
    answer = await http.post(f"/api/v1/vm/{vm}/commit", json={"name": name, "description": f"{name} of {vm}"})
    assert answer.status_code == 201, answer.text
    return answer.json()["commit_id"]


async def vers(platform: Platform, org: Org, config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The `vers` binary against the platform of this process (whose loop goes on serving meanwhile)."""
    env = {**os.environ, "VERS_URL": platform.url, "VERS_API_KEY": org.key, "VERS_CONFIG_DIR": str(config)}
    result = await asyncio.to_thread(subprocess.run, [VERS, *args], env=env, capture_output=True, text=True, timeout=300)
    assert "Traceback" not in result.stderr, result.stderr
    return result


async def status(call: Any) -> int:
    """The HTTP status an SDK call fails with."""
    with pytest.raises(vers_sdk.APIError) as failed:
        await call
    return failed.value.status  # type: ignore[return-value]


async def test_a_public_commit_is_branched_by_other_orgs_and_stays_its_owners(
    platform: Platform, owner: Org, brancher: Org, tmp_path: Path
) -> None:
    async with platform.client(owner) as mine, platform.client(brancher) as theirs:
        # the owner's lineage: a private commit (the branch's), then the VM branched from it, committed
        root = await new_vm(mine, mem_size_mib=128)
        branched = await mine.post(f"/api/v1/vm/{root}/branch")
        assert branched.status_code == 201, branched.text
        vm = branched.json()["vms"][0]["vm_id"]
        private_parent = (await mine.get(f"/api/v1/vm/{vm}/metadata")).json()["parent_commit_id"]
        assert (await mine.delete(f"/api/v1/vm/{root}")).status_code == 200
        await out(mine, vm, "echo made-by-the-owner > /root/marker; sync")
        clean = await commit(mine, vm, "clean")
        await out(mine, vm, "mkdir -p /root/.ssh")
        planted = await sh(mine, vm, "cat > /root/.ssh/deploy_key; sync", stdin=private_key())
        assert planted["exit_code"] == 0, planted
        leaky = await commit(mine, vm, "leaky")

        # SDK: update_commit answers the CommitInfo; absent name and description stay
        owner_sdk = sdk(platform, owner)
        info = await owner_sdk.update_commit(clean, {"is_public": True, "name": "base image"})
        assert info["commit_id"] == clean and info["is_public"] is True and info["name"] == "base image"
        assert info["owner_id"] == owner.id and info["description"] == f"clean of {vm}" and info["created_at"]
        assert info["parent_vm_id"] == vm and info["grandparent_commit_id"] == private_parent
        info = await owner_sdk.update_commit(clean, {"is_public": True, "description": "trunk", "name": None})
        assert (info["name"], info["description"], info["is_public"]) == ("base image", "trunk", True)
        assert (await mine.patch(f"/api/v1/commits/{clean}", json={"name": "x" * 1000, "is_public": True})).status_code == 400
        assert (await mine.patch(f"/api/v1/commits/{clean}", json={"name": "no is_public"})).status_code == 400

        # the planted key refuses publishing, with the findings; the commit stays private
        refused = await mine.patch(f"/api/v1/commits/{leaky}", json={"is_public": True})
        assert refused.status_code == 409, refused.text
        findings = refused.json()["findings"]
        assert any(f["path"] == "/root/.ssh/deploy_key" and f["commit_id"] == leaky for f in findings), findings
        assert (await mine.get(f"/api/v1/commits/{leaky}")).json()["is_public"] is False

        # every org's public commits, newest first; the page's bounds
        listed = await sdk(platform, brancher).list_public_commits()
        assert (listed["limit"], listed["offset"]) == (50, 0) and listed["total"] >= 1
        shown = [c for c in listed["commits"] if c["commit_id"] == clean]
        assert shown and shown[0]["is_public"] is True and shown[0]["owner_id"] == owner.id
        # what is private to the owner is not shown to others: its VM, its private parent
        assert shown[0]["parent_vm_id"] == "" and shown[0]["grandparent_commit_id"] == ""
        assert leaky not in {c["commit_id"] for c in listed["commits"]}
        for bad in ({"limit": 101}, {"limit": -1}, {"offset": -1}):
            assert (await theirs.get("/api/v1/commits/public", params=bad)).status_code == 400, bad
        assert (await theirs.get("/api/v1/commits/public", params={"limit": 100})).json()["limit"] == 100

        # another org branches it by id: its VM, in its quotas, with the owner's files
        their_sdk = sdk(platform, brancher)
        [b1] = [vm_["vm_id"] for vm_ in (await their_sdk.branch_by_commit(clean))["vms"]]
        assert await out(theirs, b1, "cat /root/marker") == "made-by-the-owner\n"
        metadata = (await theirs.get(f"/api/v1/vm/{b1}/metadata")).json()
        assert metadata["owner_id"] == brancher.id and metadata["parent_commit_id"] == clean and metadata["grandparent_vm_id"] == ""
        assert b1 in {v["vm_id"] for v in (await theirs.get("/api/v1/vm")).json()}
        assert b1 not in {v["vm_id"] for v in (await mine.get("/api/v1/vm")).json()}
        restored = (await their_sdk.restore_from_commit({"commit_id": clean}))["vm_id"]
        assert (await theirs.delete(f"/api/v1/vm/{restored}")).status_code == 200
        [b3] = [vm_["vm_id"] for vm_ in (await their_sdk.branch_vm(clean))["vms"]]
        assert (await theirs.delete(f"/api/v1/vm/{b3}")).status_code == 200

        # read-only for them: not found to read, change, delete or tag, as a missing commit is
        assert (await theirs.get(f"/api/v1/commits/{clean}")).status_code == 404
        assert await status(their_sdk.update_commit(clean, {"is_public": False})) == 404
        assert (await theirs.delete(f"/api/v1/commits/{clean}")).status_code == 404
        assert (await theirs.post("/api/v1/repositories", json={"name": "theirs"})).status_code == 201
        tagged = await theirs.post("/api/v1/repositories/theirs/tags", json={"tag_name": "stolen", "commit_id": clean})
        assert tagged.status_code == 404, tagged.text
        assert (await theirs.post("/api/v1/commit_tags", json={"tag_name": "stolen", "commit_id": clean})).status_code == 404
        assert (await mine.get(f"/api/v1/commits/{clean}")).json()["name"] == "base image"

        # lineage: theirs goes back to the public commit and no further; the owner sees its own
        their_commit = await commit(theirs, b1, "on top")
        chain = (await theirs.get(f"/api/v1/vm/commits/{their_commit}/parents")).json()
        assert [c["id"] for c in chain] == [their_commit, clean], chain
        assert chain[1]["grandparent_commit_id"] == "" and chain[1]["parent_vm_id"] == ""
        assert [c["id"] for c in (await mine.get(f"/api/v1/vm/commits/{clean}/parents")).json()] == [clean, private_parent]
        assert (await theirs.get(f"/api/v1/vm/commits/{leaky}/parents")).status_code == 404

        # the owner cannot delete it under their VM (which is not named to the owner)
        in_use = await mine.delete(f"/api/v1/commits/{clean}")
        assert in_use.status_code == 409 and "other organizations" in in_use.json()["error"] and b1 not in in_use.text

        # unpublished: no new branches, the VM made before runs on
        assert (await owner_sdk.update_commit(clean, {"is_public": False}))["is_public"] is False
        assert await status(their_sdk.branch_by_commit(clean)) == 404
        assert await status(their_sdk.restore_from_commit({"commit_id": clean})) == 404
        assert await status(their_sdk.branch_vm(clean)) == 404
        assert clean not in {c["commit_id"] for c in (await their_sdk.list_public_commits())["commits"]}
        assert await out(theirs, b1, "cat /root/marker") == "made-by-the-owner\n"

        audit = (await mine.get("/api/v1/audit", params={"page_size": 1000})).json()
        events = [(e["type"], e["target"]) for e in audit["events"] if e["target"] == clean]
        assert events == [("commit.update", clean), ("commit.publish", clean), ("commit.update", clean), ("commit.unpublish", clean)], (
            events
        )

        # the CLI: refused with the findings table, published, its history, unpublished, deleted
        config = tmp_path / "config"
        refusal = await vers(platform, owner, config, "commit", "publish", leaky)
        assert refusal.returncode == 1 and "/root/.ssh/deploy_key" in refusal.stdout and "RULE" in refusal.stdout, refusal
        assert refusal.stderr.startswith("Error: making commit") and "(HTTP 409)" in refusal.stderr
        published = await vers(platform, owner, config, "commit", "publish", clean)
        assert published.returncode == 0 and published.stdout == f"✓ Published commit {clean}: any organization can branch it by its ID\n"
        history = await vers(platform, owner, config, "commit", "history", clean)
        assert history.returncode == 0 and [line.split()[0] for line in history.stdout.splitlines()[2:]] == [clean, private_parent]
        from_vm = await vers(platform, brancher, tmp_path / "their-config", "commit", "history", b1)
        assert from_vm.returncode == 0 and clean in from_vm.stdout and private_parent not in from_vm.stdout, from_vm
        unpublished = await vers(platform, owner, config, "commit", "unpublish", clean, "--format", "json")
        assert unpublished.returncode == 0 and '"is_public": false' in unpublished.stdout.replace("False", "false"), unpublished.stdout

        # their VM gone, the owner deletes it; the commit made on top of it still starts (its own memory, the layers kept)
        assert (await theirs.delete(f"/api/v1/vm/{b1}")).status_code == 200
        deleted = await vers(platform, owner, config, "commit", "delete", clean, leaky, private_parent)
        assert deleted.returncode == 1, deleted
        assert deleted.stdout == f"✓ Deleted commit {clean}\n✓ Deleted commit {leaky}\n"
        assert f"Error: {private_parent}:" in deleted.stderr and vm in deleted.stderr  # the owner's VM stands on it
        again = (await their_sdk.restore_from_commit({"commit_id": their_commit}))["vm_id"]
        assert await out(theirs, again, "cat /root/marker") == "made-by-the-owner\n"
        for gone, http in ((again, theirs), (vm, mine)):
            assert (await http.delete(f"/api/v1/vm/{gone}")).status_code == 200
        await owner_sdk.close()
        await their_sdk.close()

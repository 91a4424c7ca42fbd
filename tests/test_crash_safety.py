"""Changes of one VM at the same time, and a tag racing a commit's deletion: nothing recorded is stale,
nothing is lost, and every commit restores what it captured."""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid

import httpx
import pytest

from services.common.server import start
from services.inprocess import BUILDERS
from tests.conftest import Org, Platform
from tests.test_vms import new_vm, out

pytestmark = pytest.mark.vm


async def commit(http: httpx.AsyncClient, vm_id: str) -> str:
    answer = await http.post(f"/api/v1/vm/{vm_id}/commit", json={})
    assert answer.status_code == 201, answer.text
    return answer.json()["commit_id"]


async def restore(http: httpx.AsyncClient, commit_id: str) -> str:
    answer = await http.post("/api/v1/vm/from_commit", json={"commit_id": commit_id})
    assert answer.status_code == 201, answer.text
    return answer.json()["vm_id"]


async def test_concurrent_commits_of_one_vm_each_restore_their_own_state(platform: Platform, org: Org) -> None:
    """Ten commits requested at once, each right after writing its own marker: each commit holds its
    marker (written before it was requested), and the commit made after them all restores every marker
    (the defect: the later commits recorded a stale layer and could not be restored)."""
    async with platform.client(org) as http:
        vm = await new_vm(http, mem_size_mib=128)

        async def mark_and_commit(i: int) -> str:
            await out(http, vm, f"echo {i} > /root/marker-{i}; sync")
            return await commit(http, vm)

        commits = await asyncio.gather(*(mark_and_commit(i) for i in range(10)))
        last = await commit(http, vm)
        assert len(set([*commits, last])) == 11

        for i, commit_id in enumerate(commits):
            restored = await restore(http, commit_id)
            assert (await out(http, restored, f"cat /root/marker-{i}")).strip() == str(i)
            assert (await http.delete(f"/api/v1/vm/{restored}")).status_code == 200
        restored = await restore(http, last)
        markers = await out(http, restored, "cat /root/marker-*")
        assert sorted(markers.split()) == sorted(str(i) for i in range(10))
        for vm_id in (restored, vm):
            assert (await http.delete(f"/api/v1/vm/{vm_id}")).status_code == 200


async def test_a_tag_racing_a_commit_deletion_never_points_at_a_deleted_commit(platform: Platform, org: Org) -> None:
    """Delete each commit while a tag is being made on it: either the tag lands and the delete is refused
    (409), or the delete lands and the tag is refused (404); never a tag on a deleted commit."""
    async with platform.client(org) as http:
        vm = await new_vm(http, mem_size_mib=128)
        commits = [await commit(http, vm) for _ in range(6)]
        assert (await http.delete(f"/api/v1/vm/{vm}")).status_code == 200
        assert (await http.post("/api/v1/repositories", json={"name": "race"})).status_code == 201

        async def tag(i: int, commit_id: str) -> int:
            answer = await http.post("/api/v1/repositories/race/tags", json={"tag_name": f"t{i}", "commit_id": commit_id})
            return answer.status_code

        async def delete(commit_id: str) -> int:
            return (await http.delete(f"/api/v1/commits/{commit_id}")).status_code

        outcomes = []
        for i, commit_id in enumerate(commits):
            tagged, deleted = await asyncio.gather(tag(i, commit_id), delete(commit_id))
            outcomes.append((tagged, deleted))
            tags = (await http.get("/api/v1/repositories/race/tags")).json()["tags"]
            exists = (await http.get(f"/api/v1/commits/{commit_id}")).status_code == 200
            if tagged == 201:
                assert deleted == 409 and exists, (tagged, deleted)
                assert [t["commit_id"] for t in tags if t["tag_name"] == f"t{i}"] == [commit_id]
            else:
                assert (tagged, deleted) == (404, 204) and not exists, (tagged, deleted)
                assert all(t["tag_name"] != f"t{i}" for t in tags)
        assert all(o in ((201, 409), (404, 204)) for o in outcomes), outcomes
        # A tag can never be moved to a deleted commit either.
        gone = [commits[i] for i, o in enumerate(outcomes) if o == (404, 204)]
        kept = [commits[i] for i, o in enumerate(outcomes) if o == (201, 409)]
        if gone and kept:
            moved = await http.patch(f"/api/v1/repositories/race/tags/t{commits.index(kept[0])}", json={"commit_id": gone[0]})
            assert moved.status_code == 404, moved.text


async def test_a_commit_never_freezes_a_layer_qemu_no_longer_writes_to(platform: Platform, org: Org) -> None:
    """A record that names another layer than the one QEMU writes to (what a failed undo would leave) makes
    the commit refuse, rather than freeze a stale disk; once the record is right again, commits work."""
    database = platform.settings.data_dir / "orchestrator.db"
    async with platform.client(org) as http:
        vm = await new_vm(http, mem_size_mib=128)
        with sqlite3.connect(database) as db:
            [(layer,)] = db.execute("SELECT layer_id FROM vms WHERE id = ?", (vm,)).fetchall()
            db.execute("UPDATE vms SET layer_id = ? WHERE id = ?", (str(uuid.uuid4()), vm))
        refused = await http.post(f"/api/v1/vm/{vm}/commit", json={})
        assert refused.status_code == 400 and "not to the layer its record names" in refused.json()["error"], refused.text
        with sqlite3.connect(database) as db:
            db.execute("UPDATE vms SET layer_id = ? WHERE id = ?", (layer, vm))
        await commit(http, vm)
        assert (await http.delete(f"/api/v1/vm/{vm}")).status_code == 200


async def test_a_commit_deletion_the_tagging_service_missed_finishes_once_it_answers(platform: Platform, org: Org) -> None:
    """With the tagging service down a delete cannot be checked against tags: it answers 503, the commit is
    gone from view at once (no restore, no tag, not listed), and the deletion finishes once tagging is back."""
    async with platform.client(org) as http:
        vm = await new_vm(http, mem_size_mib=128)
        commit_id = await commit(http, vm)
        assert (await http.delete(f"/api/v1/vm/{vm}")).status_code == 200
        assert (await http.post("/api/v1/repositories", json={"name": "late"})).status_code == 201
        await platform.running["tagging"].stop(0)
        try:
            answer = await http.delete(f"/api/v1/commits/{commit_id}")
            assert answer.status_code == 503 and "finishes when it does" in answer.json()["error"], answer.text
            listed = (await http.get("/api/v1/commits?limit=500")).json()["commits"]
            assert commit_id not in [c["commit_id"] for c in listed]
            assert (await http.post("/api/v1/vm/from_commit", json={"commit_id": commit_id})).status_code == 404
        finally:
            platform.running["tagging"] = await start(
                await BUILDERS["tagging"](platform.settings), platform.settings.addr("tagging"), platform.settings
            )
        folder = platform.settings.data_dir.resolve() / "commits" / commit_id
        deadline = time.monotonic() + 90
        while folder.exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert not folder.exists(), "the deletion was not finished once the tagging service answered"
        tagged = await http.post("/api/v1/repositories/late/tags", json={"tag_name": "t", "commit_id": commit_id})
        assert tagged.status_code == 404, tagged.text

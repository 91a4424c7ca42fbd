"""Registry governance end to end, on real VMs: the secret scan before anything goes public (files on the
disk and a key only in a process's memory), immutable tags, retention with a dry run that frees exactly
what it said, and the audit log of all of it."""

from __future__ import annotations

import os
import secrets
import sqlite3
import string
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from tests.conftest import Org, Platform
from tests.test_vms import new_vm, out, sh

pytestmark = pytest.mark.vm

# What the tests below change, in order: the audit log must hold exactly these (type, target) of theirs.
CHANGES: list[tuple[str, str]] = []


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def owner(platform: Platform) -> Org:
    return await platform.new_org("gov")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def forker(platform: Platform) -> Org:
    return await platform.new_org("gov-fork")


async def commit(http: httpx.AsyncClient, vm: str, name: str = "") -> str:
    answer = await http.post(f"/api/v1/vm/{vm}/commit", json={"name": name})
    assert answer.status_code == 201, answer.text
    return answer.json()["commit_id"]


async def create_repo(http: httpx.AsyncClient, name: str, **policy: Any) -> None:
    answer = await http.post("/api/v1/repositories", json={"name": name, **policy})
    assert answer.status_code == 201, answer.text
    CHANGES.append(("repository.create", name))


async def tag(http: httpx.AsyncClient, repo: str, name: str, commit_id: str) -> None:
    answer = await http.post(f"/api/v1/repositories/{repo}/tags", json={"tag_name": name, "commit_id": commit_id})
    assert answer.status_code == 201, answer.text
    CHANGES.append(("tag.create", f"{repo}:{name}"))


async def move(http: httpx.AsyncClient, repo: str, name: str, commit_id: str) -> httpx.Response:
    answer = await http.patch(f"/api/v1/repositories/{repo}/tags/{name}", json={"commit_id": commit_id})
    if answer.status_code == 200:
        CHANGES.append(("tag.move", f"{repo}:{name}"))
    return answer


def private_key() -> str:
    key = ed25519.Ed25519PrivateKey.generate()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()).decode()


def aws_key_id() -> str:
    return "AKIA" + "".join(secrets.choice(string.ascii_uppercase + "234567") for _ in range(16))


async def test_a_secret_on_disk_or_only_in_memory_blocks_publishing_until_removed_or_forced(
    platform: Platform, owner: Org, forker: Org
) -> None:
    async with platform.client(owner) as http:
        vm = await new_vm(http, mem_size_mib=128)
        # a deploy key in a file; an AWS key id that only a running process holds (it comes in through
        # stdin, which the guest keeps in tmpfs, and lives on in the environment of a background process)
        await out(http, vm, "mkdir -p /root/.ssh")
        written = await sh(http, vm, "cat > /root/.ssh/deploy_key; chmod 600 /root/.ssh/deploy_key; sync", stdin=private_key())
        assert written["exit_code"] == 0, written
        key_id = aws_key_id()
        started = await sh(
            http,
            vm,
            "read k; (export AWS_ACCESS_KEY_ID=$k; exec sleep 100000) >/dev/null 2>&1 & echo $! > /run/holder",
            stdin=key_id + "\n",
        )
        assert started["exit_code"] == 0, started
        assert (await sh(http, vm, f"grep -rl {key_id[:12]} /root /etc /var /srv 2>/dev/null"))["stdout"] == ""

        leaky = await commit(http, vm, "leaky")
        await create_repo(http, "app")
        await tag(http, "app", "latest", leaky)
        refused = await http.patch("/api/v1/repositories/app/visibility", json={"is_public": True})
        assert refused.status_code == 409, refused.text
        body = refused.json()
        assert "--force" in body["error"], body["error"]
        findings = body["findings"]
        on_disk = [f for f in findings if f["where"] == "disk" and f["path"] == "/root/.ssh/deploy_key"]
        assert on_disk and on_disk[0]["rule"] and on_disk[0]["commit_id"] == leaky, findings
        in_memory = [f for f in findings if f["where"] == "memory" and key_id[:4] in f["excerpt"]]
        assert in_memory, findings
        assert not any(f["where"] == "disk" and key_id in f["excerpt"] for f in findings), "the key id was never on the disk"
        for finding in findings:
            assert key_id not in finding["excerpt"] and "PRIVATE KEY-----\n" not in finding["excerpt"], finding
        assert not (await http.get("/api/v1/repositories/app")).json()["is_public"]

        # gone from the file system and from memory: the next commit, tagged instead, publishes cleanly
        await out(http, vm, "rm /root/.ssh/deploy_key; kill $(cat /run/holder); sync; sleep 1; sync")
        clean = await commit(http, vm, "clean")
        assert (await move(http, "app", "latest", clean)).status_code == 200
        published = await http.patch("/api/v1/repositories/app/visibility", json={"is_public": True})
        assert published.status_code == 200, published.text
        assert published.json()["is_public"]
        CHANGES.append(("repository.visibility", "app"))

        # forced: published anyway, and recorded as such
        await create_repo(http, "leaks")
        await tag(http, "leaks", "latest", leaky)
        assert (await http.patch("/api/v1/repositories/leaks/visibility", json={"is_public": True})).status_code == 409
        forced = await http.patch("/api/v1/repositories/leaks/visibility", json={"is_public": True, "force": True})
        assert forced.status_code == 200, forced.text
        CHANGES.extend([("repository.visibility", "leaks"), ("publish.forced", "leaks")])
        await http.delete(f"/api/v1/vm/{vm}")

    # another org forks what was forced through (the owner chose to), and the clean tag
    async with platform.client(forker) as http:
        for repo in ("leaks", "app"):
            forked = await http.post(
                "/api/v1/repositories/fork", json={"source_org": owner.name, "source_repo": repo, "source_tag": "latest"}
            )
            assert forked.status_code == 201, forked.text
            await http.delete(f"/api/v1/vm/{forked.json()['vm_id']}")


async def test_an_immutable_tag_cannot_move_or_go_while_latest_moves(platform: Platform, owner: Org) -> None:
    async with platform.client(owner) as http:
        vm = await new_vm(http, mem_size_mib=128)
        first, second = await commit(http, vm, "1.0"), await commit(http, vm, "1.1")
        await http.delete(f"/api/v1/vm/{vm}")
        await create_repo(http, "releases", immutable_tags=["v*"])
        await tag(http, "releases", "v1.0", first)
        await tag(http, "releases", "latest", first)
        moved = await move(http, "releases", "v1.0", second)
        assert moved.status_code == 409 and "v*" in moved.json()["error"], moved.text
        deleted = await http.delete("/api/v1/repositories/releases/tags/v1.0")
        assert deleted.status_code == 409 and "v*" in deleted.json()["error"], deleted.text
        whole = await http.delete("/api/v1/repositories/releases")
        assert whole.status_code == 409 and "v*" in whole.json()["error"], whole.text
        assert (await move(http, "releases", "latest", second)).status_code == 200
        assert (await http.get("/api/v1/repositories/releases/tags/v1.0")).json()["commit_id"] == first


def allocated(folder: Path) -> int:
    return sum(path.stat().st_blocks * 512 for path in folder.rglob("*") if path.is_file())


async def test_retention_keeps_the_last_five_and_frees_exactly_what_the_dry_run_said(platform: Platform, owner: Org) -> None:
    data = platform.settings.data_dir
    async with platform.client(owner) as http:
        vm = await new_vm(http, mem_size_mib=128)
        await create_repo(http, "nightly", retention={"keep_last": 5})
        commits = []
        for night in range(12):
            await out(http, vm, f"echo {night} > /root/night; sync")
            commits.append(await commit(http, vm, f"night-{night}"))
            if night == 0:
                await tag(http, "nightly", "latest", commits[0])
            else:
                assert (await move(http, "nightly", "latest", commits[-1])).status_code == 200
        # a VM started from a kept commit, and a tag elsewhere on an old one: both must survive
        kept_vm = (await http.post("/api/v1/vm/from_commit", json={"commit_id": commits[8]})).json()["vm_id"]
        await create_repo(http, "pinned")
        await tag(http, "pinned", "old", commits[2])

        planned = await http.post("/api/v1/gc", json={"dry_run": True})
        assert planned.status_code == 200, planned.text
        plan = planned.json()
        listed = [c["commit_id"] for c in plan["commits"]]
        expected = [c for c in commits[:7] if c != commits[2]]
        assert listed == expected, (listed, expected)
        assert all(c["reason"] for c in plan["commits"])
        # nothing went in a dry run
        for commit_id in listed:
            assert (await http.get(f"/api/v1/commits/{commit_id}")).status_code == 200

        # paused, the VMs write nothing while the disk is measured
        for running in (vm, kept_vm):
            assert (await http.patch(f"/api/v1/vm/{running}/state", json={"state": "Paused"})).status_code == 200
        before = allocated(data / "commits") + allocated(data / "layers")
        collected = await http.post("/api/v1/gc", json={})
        assert collected.status_code == 200, collected.text
        after = allocated(data / "commits") + allocated(data / "layers")
        assert [c["commit_id"] for c in collected.json()["commits"]] == listed
        assert int(collected.json()["bytes_freed"]) == int(plan["bytes_freed"]) > 0
        assert before - after == int(plan["bytes_freed"]), (before - after, plan["bytes_freed"])
        CHANGES.extend(("commit.delete", commit_id) for commit_id in listed)
        CHANGES.append(("gc", "org"))

        for commit_id in listed:
            assert (await http.get(f"/api/v1/commits/{commit_id}")).status_code == 404
        for running in (vm, kept_vm):
            assert (await http.patch(f"/api/v1/vm/{running}/state", json={"state": "Running"})).status_code == 200
            assert (await out(http, running, "cat /root/night")).strip() in {"11", "8"}
        # every tag still restores and runs
        for repo, name, night in (("nightly", "latest", 11), ("pinned", "old", 2)):
            tagged = (await http.get(f"/api/v1/repositories/{repo}/tags/{name}")).json()["commit_id"]
            restored = await http.post("/api/v1/vm/from_commit", json={"commit_id": tagged})
            assert restored.status_code == 201, restored.text
            assert (await out(http, restored.json()["vm_id"], "cat /root/night")).strip() == str(night)
            await http.delete(f"/api/v1/vm/{restored.json()['vm_id']}")
        for commit_id in commits[7:]:
            assert (await http.get(f"/api/v1/commits/{commit_id}")).status_code == 200
        for running in (vm, kept_vm):
            await http.delete(f"/api/v1/vm/{running}")


async def test_the_audit_log_holds_every_change_in_order_and_cannot_be_changed(platform: Platform, owner: Org) -> None:
    async with platform.client(owner) as http:
        events: list[dict[str, Any]] = []
        token = ""
        while True:
            page = await http.get("/api/v1/audit", params={"page_size": 7, "page_token": token})
            assert page.status_code == 200, page.text
            events += page.json()["events"]
            token = page.json()["next_page_token"]
            if not token:
                break
        assert all(event["org_id"] == owner.id for event in events)
        assert [event["at"] for event in events] == sorted(event["at"] for event in events)
        seen = [(event["type"], event["target"]) for event in events]
        # each change of the tests above, in the order they made them (the log holds more: e.g. the
        # tags the collection's deletions asked about are not changes)
        position = 0
        for change in CHANGES:
            assert change in seen[position:], (change, seen[position:])
            position = seen.index(change, position) + 1
        forced = next(event for event in events if event["type"] == "publish.forced")
        assert forced["api_key_id"] and '"findings"' in forced["after"]
        moves = [event for event in events if event["type"] == "tag.move" and event["target"] == "nightly:latest"]
        assert len(moves) == 11 and all(event["before"] and event["after"] for event in moves)

        only_tags = (await http.get("/api/v1/audit", params={"type": "tag"})).json()["events"]
        assert only_tags and all(event["type"].startswith("tag.") for event in only_tags)

        # no way to change or remove an entry: not through the API...
        for method in ("PUT", "PATCH", "DELETE", "POST"):
            answer = await http.request(method, "/api/v1/audit", json={})
            assert answer.status_code in (404, 405), (method, answer.status_code)
        assert (await http.delete(f"/api/v1/audit/{events[0]['event_id']}")).status_code in (404, 405)
    # ...and not in the database either: the table refuses updates and deletes
    for name in ("registry", "tagging", "orchestrator"):
        database = platform.settings.data_dir / f"{name}.db"
        with sqlite3.connect(database) as connection:
            for statement in ("DELETE FROM audit_events", "UPDATE audit_events SET type = 'x'"):
                with pytest.raises(sqlite3.IntegrityError, match="audit entries cannot be"):
                    connection.execute(statement)
    assert os.path.exists(platform.settings.data_dir / "registry.db")

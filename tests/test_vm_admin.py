"""Labels, online disk resize and the system version, driven by the official SDK (and REST where the SDK has
no say: the label filter, a body without its required field), on one VM and one branch of it."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import sqlite3
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from vers_sdk import BadRequestError, NotFoundError, VersSdkClient

from services.orchestrator.vmadmin import git_hash_of, parse_label_filters
from tests.conftest import ROOT, Org, Platform
from tests.test_vms import new_vm, out

pytestmark = pytest.mark.vm

DISK_MIB = 128
GROWN_MIB = 256


@dataclass
class Labelled:
    org: Org
    http: httpx.AsyncClient
    sdk: VersSdkClient
    vm_id: str


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def labelled(platform: Platform) -> AsyncIterator[Labelled]:
    """One small VM (a 128 MiB disk) made with a label."""
    org = await platform.new_org("vmadmin")
    async with platform.client(org) as http, VersSdkClient(base_url=platform.url, api_key=org.key, max_retries=0) as sdk:
        vm_id = await new_vm(http, fs_size_mib=DISK_MIB, labels={"team": "web"})
        yield Labelled(org, http, sdk, vm_id)


def df_total_mib(text: str) -> int:
    """The size column of `df -m /`'s line for the root."""
    return int(text.strip().splitlines()[-1].split()[1])


async def test_labels_upsert_replace_and_delete(platform: Platform, labelled: Labelled, other_org: Org) -> None:
    sdk, vm = labelled.sdk, labelled.vm_id
    upserted = await sdk.upsert_vm_labels(vm, {"labels": {"team": "api", "tier": "1"}})
    assert upserted == {"labels": {"team": "api", "tier": "1"}}
    assert (await sdk.vm_status(vm))["labels"] == {"team": "api", "tier": "1"}
    assert [v["labels"] for v in await sdk.list_vms() if v["vm_id"] == vm] == [{"team": "api", "tier": "1"}]
    assert (await sdk.get_vm_metadata(vm))["labels"] == {"team": "api", "tier": "1"}
    # {} on PATCH changes nothing; other keys stay when some are set
    assert (await sdk.upsert_vm_labels(vm, {"labels": {}}))["labels"] == {"team": "api", "tier": "1"}
    assert (await sdk.upsert_vm_labels(vm, {"labels": {"tier": "2"}}))["labels"] == {"team": "api", "tier": "2"}

    assert (await sdk.delete_vm_label(vm, "tier"))["labels"] == {"team": "api"}
    assert (await sdk.delete_vm_label(vm, "tier"))["labels"] == {"team": "api"}  # already gone: still 200

    assert (await sdk.replace_vm_labels(vm, {"labels": {"only": "x"}}))["labels"] == {"only": "x"}
    cleared = await sdk.replace_vm_labels(vm, {"labels": {}})
    assert cleared.get("labels", {}) == {}
    assert (await sdk.vm_status(vm)).get("labels", {}) == {}

    # the field is required on both: a body without it would silently wipe or no-op
    for method, path in (("PATCH", f"/api/v1/vm/{vm}/label"), ("PUT", f"/api/v1/vm/{vm}/labels")):
        missing = await labelled.http.request(method, path, json={})
        assert missing.status_code == 400 and "labels" in missing.json()["error"], missing.text
    with pytest.raises(BadRequestError) as too_many:
        await sdk.upsert_vm_labels(vm, {"labels": {f"k{i}": "v" for i in range(65)}})
    assert "at most 64 labels" in too_many.value.error_message
    with pytest.raises(BadRequestError):
        await sdk.replace_vm_labels(vm, {"labels": {"": "empty key"}})
    assert (await sdk.vm_status(vm)).get("labels", {}) == {}  # a refused change changes nothing

    async with VersSdkClient(base_url=platform.url, api_key=other_org.key, max_retries=0) as other:
        for attempt in (
            other.upsert_vm_labels(vm, {"labels": {"x": "y"}}), other.replace_vm_labels(vm, {"labels": {}}),
            other.delete_vm_label(vm, "only"), other.resize_vm_disk(vm, {"fs_size_mib": 512}),
        ):  # fmt: skip
            with pytest.raises(NotFoundError):
                await attempt
    await sdk.replace_vm_labels(vm, {"labels": {"team": "web", "role": "source"}})


async def test_resize_grows_the_filesystem_online_and_branches_keep_it(platform: Platform, labelled: Labelled) -> None:
    sdk, http, vm = labelled.sdk, labelled.http, labelled.vm_id
    before = df_total_mib(await out(http, vm, "df -m / && echo alive > /run/not-rebooted"))
    assert before <= DISK_MIB

    for wrong, message in (
        (DISK_MIB - 10, f"more than the current {DISK_MIB} MiB"),
        (DISK_MIB, f"more than the current {DISK_MIB} MiB"),
        (2_000_000, "at most"),
    ):
        with pytest.raises(BadRequestError) as refused:
            await sdk.resize_vm_disk(vm, {"fs_size_mib": wrong})
        assert message in refused.value.error_message
    missing = await http.patch(f"/api/v1/vm/{vm}/disk", json={})
    assert missing.status_code == 400 and "fs_size_mib" in missing.json()["error"], missing.text

    # the org's disk limit counts the growth
    admin = {"Authorization": f"Bearer {platform.admin_key}"}
    async with platform.client(**admin) as admin_http:
        limited = await admin_http.patch(f"/api/v1/admin/orgs/{labelled.org.name}/limits", json={"max_disk_mib": DISK_MIB + 10})
        assert limited.status_code == 200, limited.text
        await asyncio.sleep(platform.settings.auth_cache_seconds + 0.2)  # the limit comes with the caller's identity
        over = await http.patch(f"/api/v1/vm/{vm}/disk", json={"fs_size_mib": GROWN_MIB})
        assert over.status_code == 429 and "max_disk_mib" in over.json()["error"], over.text
        assert (await admin_http.patch(f"/api/v1/admin/orgs/{labelled.org.name}/limits", json={"max_disk_mib": -1})).status_code == 200
        await asyncio.sleep(platform.settings.auth_cache_seconds + 0.2)

    # a paused VM is refused with the way out
    await sdk.update_vm_state(vm, {"state": "Paused"})
    with pytest.raises(BadRequestError) as paused:
        await sdk.resize_vm_disk(vm, {"fs_size_mib": GROWN_MIB})
    assert "resume it first" in paused.value.error_message
    await sdk.update_vm_state(vm, {"state": "Running"})

    grown = await sdk.resize_vm_disk(vm, {"fs_size_mib": GROWN_MIB})
    assert grown == {"vm_id": vm, "fs_size_mib": GROWN_MIB}
    after = df_total_mib(await out(http, vm, "df -m /"))
    assert after > DISK_MIB + 64, after
    assert await out(http, vm, "cat /run/not-rebooted") == "alive\n"  # tmpfs survived: no reboot
    # more than the whole old disk fits now
    big = DISK_MIB + 32
    assert (
        await out(http, vm, f"dd if=/dev/zero of=/root/big bs=1M count={big} 2>/dev/null && sync && du -m /root/big")
        == f"{big}\t/root/big\n"
    )
    assert (await sdk.get_vm_metadata(vm))["fs_size_mib"] == GROWN_MIB

    commit = (await sdk.commit_vm(vm, {"name": "grown"}))["commit_id"]
    [branch] = (await sdk.branch_by_commit(commit))["vms"]
    branch_id = branch["vm_id"]
    assert (await sdk.get_vm_metadata(branch_id))["fs_size_mib"] == GROWN_MIB
    assert df_total_mib(await out(http, branch_id, "df -m /")) == after
    assert await out(http, branch_id, "du -m /root/big") == f"{big}\t/root/big\n"
    # the branch grows on from there, and its source keeps its size
    assert (await sdk.resize_vm_disk(branch_id, {"fs_size_mib": GROWN_MIB + 64}))["fs_size_mib"] == GROWN_MIB + 64
    assert df_total_mib(await out(http, branch_id, "df -m /")) > after
    assert (await sdk.get_vm_metadata(vm))["fs_size_mib"] == GROWN_MIB
    await sdk.upsert_vm_labels(branch_id, {"labels": {"team": "web", "role": "branch"}})


async def test_list_filters_by_label_with_whole_pages(labelled: Labelled) -> None:
    http = labelled.http

    async def listed(*filters: str, **params: object) -> httpx.Response:
        return await http.get("/api/v1/vm", params=[*(("label", f) for f in filters), *params.items()])

    everyone = (await listed()).json()
    assert len(everyone) == 2
    source = labelled.vm_id
    assert [v["vm_id"] for v in (await listed("role=source")).json()] == [source]
    assert [v["vm_id"] for v in (await listed("role=source", "team=web")).json()] == [source]
    assert (await listed("role=source", "team=api")).json() == []
    assert len((await listed("team=web")).json()) == 2
    assert len((await listed("role")).json()) == 2  # any value
    assert (await listed("nothing")).json() == []
    assert (await listed("role=")).json() == []  # the empty value, which no VM has

    first = await listed("team=web", page_size=1)
    token = first.headers.get("x-next-page-token") or ""
    assert len(first.json()) == 1 and token
    second = await listed("team=web", page_size=1, page_token=token)
    assert len(second.json()) == 1 and second.json()[0]["vm_id"] != first.json()[0]["vm_id"]
    assert not second.headers.get("x-next-page-token")
    other_filter = await listed("role", page_size=1, page_token=token)
    assert other_filter.status_code == 400 and "other filters" in other_filter.json()["error"]

    bad = await listed("=web")
    assert bad.status_code == 400 and "label=KEY=VALUE" in bad.json()["error"]


async def test_a_resize_cut_after_its_record_is_finished_on_the_next_start(platform: Platform, labelled: Labelled) -> None:
    """The row is written before the disk grows: a crash between the two leaves a row naming the bigger size,
    and the orchestrator's next start grows the running VM's disk and filesystem to it."""
    http, vm = labelled.http, labelled.vm_id
    before = df_total_mib(await out(http, vm, "df -m /"))
    database = platform.settings.data_dir / "orchestrator.db"
    with contextlib.closing(sqlite3.connect(database)) as db, db:
        db.execute("UPDATE vms SET fs_size_mib = ? WHERE id = ?", (GROWN_MIB + 128, vm))
    await platform.restart("orchestrator")
    deadline = time.monotonic() + 60
    while (now := df_total_mib(await out(http, vm, "df -m /"))) <= before and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    assert now > before + 64, (before, now)
    grown = await labelled.sdk.resize_vm_disk(vm, {"fs_size_mib": GROWN_MIB + 129})  # and it grows on from there
    assert grown["fs_size_mib"] == GROWN_MIB + 129


async def test_system_version(platform: Platform, labelled: Labelled) -> None:
    version = await labelled.sdk.version_handler()
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert version == {
        "executable_name": "orchestrator",
        "workspace_version": importlib.metadata.version("vers-platform"),
        "git_hash": head or "unknown",
    }
    async with platform.client() as anonymous:  # no key needed
        answer = await anonymous.get("/api/v1/system/version")
    assert answer.status_code == 200 and answer.json() == version


def test_git_hash_is_read_from_the_checkout_files(tmp_path: Path) -> None:
    sha = "0123456789abcdef0123456789abcdef01234567"
    loose = tmp_path / "loose"
    (loose / ".git" / "refs" / "heads").mkdir(parents=True)
    (loose / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (loose / ".git" / "refs" / "heads" / "main").write_text(sha + "\n")
    assert git_hash_of(loose) == sha
    packed = tmp_path / "packed"
    (packed / ".git").mkdir(parents=True)
    (packed / ".git" / "HEAD").write_text("ref: refs/heads/dev\n")
    (packed / ".git" / "packed-refs").write_text(f"# pack-refs with: peeled\n{'f' * 40} refs/heads/main\n{sha} refs/heads/dev\n")
    assert git_hash_of(packed) == sha
    detached = tmp_path / "detached"
    (detached / ".git").mkdir(parents=True)
    (detached / ".git" / "HEAD").write_text(sha + "\n")
    assert git_hash_of(detached) == sha
    assert git_hash_of(tmp_path / "not-a-checkout") == ""


def test_label_filters_parse() -> None:
    assert parse_label_filters(["a=b", "c", "d=", "e=f=g"]) == [("a", "b"), ("c", None), ("d", ""), ("e", "f=g")]
    with pytest.raises(Exception, match="has no key"):
        parse_label_filters(["=x"])

    with pytest.raises(Exception, match="at most 64"):
        parse_label_filters([f"k{n}" for n in range(65)])  # each filter is a subquery: no more than labels a VM has
    with pytest.raises(Exception, match="longer than a label"):
        parse_label_filters(["k" * 129])

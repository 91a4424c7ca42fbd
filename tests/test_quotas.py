"""Per-org quotas: the administrator's limits, whoami, each quota refused with 429 naming its limit, other
orgs unaffected; the administrator key's rotation; the negative cache of refused tokens."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from services.common import auth
from services.common.auth import CachedResolver, Principal, RegistryResolver, ServiceAwareResolver, ServiceCredential
from services.common.db import Database
from services.common.errors import ResourceExhausted, Unauthenticated
from services.common.migrations import migrate
from services.common.quotas import OrgLimits
from services.common.settings import SERVICES, Settings
from services.orchestrator.models import CommitRow, DomainRow, LayerRow, OperationRow, VmRow
from services.orchestrator.store import OrchestratorStore
from services.registry.app import ensure_admin_key
from services.registry.store import RegistryStore
from services.tagging.store import TaggingStore
from tests.conftest import BACKENDS, Org, Platform
from tests.test_names_limits import vers

pytestmark = pytest.mark.vm

SMALL = OrgLimits(max_vms=2, max_vcpus=2, max_memory_mib=512, max_disk_mib=2048, max_commits=1, max_commit_mib=1,
                  max_repositories=1, max_tags=1, max_api_keys=1, max_domains=1)  # fmt: skip
# The services trust a resolved key (and the limits with it) this long in the tests (conftest).
AUTH_CACHE = 0.6


async def set_limits(platform: Platform, org: Org, **limits: int) -> dict[str, Any]:
    async with platform.client(Authorization=f"Bearer {platform.admin_key}") as admin:
        answer = await admin.patch(f"/api/v1/admin/orgs/{org.name}/limits", json=limits)
    assert answer.status_code == 200, answer.text
    await asyncio.sleep(AUTH_CACHE)
    return answer.json()


def assert_quota(answer: Any, limit: str, org: Org) -> None:
    assert (answer.status_code, answer.json()["code"]) == (429, "RESOURCE_EXHAUSTED"), answer.text
    message = answer.json()["error"]
    assert limit in message and f"vers admin org limits {org.name} --{limit.replace('_', '-')} N" in message, message
    assert f"VERS_ORG_{limit.upper()}" in message, message


# The administrator's limits, seen in whoami


async def test_admin_sets_limits_and_whoami_shows_them(platform: Platform, org: Org, other_org: Org, tmp_path: Path) -> None:
    settings = platform.settings
    answer = await set_limits(platform, org, max_vms=3, max_vcpus=4, max_repositories=7)
    assert answer["org"]["name"] == org.name
    assert answer["limits"] == {**OrgLimits.defaults(settings).as_dict(), "max_vms": 3, "max_vcpus": 4, "max_repositories": 7}
    async with platform.client(org) as http:
        who = (await http.get("/api/v1/whoami")).json()
    assert who["limits"]["max_vms"] == 3 and who["limits"]["max_repositories"] == 7
    assert (who["api_key"]["max_vcpus"], who["api_key"]["max_memory_mib"]) == (4, settings.org_max_memory_mib)
    async with platform.client(other_org) as http:
        assert (await http.get("/api/v1/whoami")).json()["limits"] == OrgLimits.defaults(settings).as_dict()

    code, output = await vers(platform, org, tmp_path, "admin", "org", "limits", org.name, "--max-tags", "9", "--max-vms", "-1")
    assert code == 0, output
    assert "Max tags:" in output and "9" in output
    code, output = await vers(platform, org, tmp_path, "admin", "org", "limits", org.name, "--format", "json")
    limits = json.loads(output)["limits"]
    assert (limits["max_tags"], limits["max_vms"], limits["max_vcpus"]) == (9, settings.org_max_vms, 4)
    await asyncio.sleep(AUTH_CACHE)
    code, output = await vers(platform, org, tmp_path, "whoami", "--format", "json")
    assert code == 0 and json.loads(output)["limits"]["max_tags"] == 9, output
    code, output = await vers(platform, org, tmp_path, "whoami")
    assert "Max tags:" in output and "Max VMs:" in output, output


async def test_limits_are_the_administrators_alone(platform: Platform, org: Org) -> None:
    async with platform.client(org) as http:
        answer = await http.patch(f"/api/v1/admin/orgs/{org.name}/limits", json={"max_vms": 1000})
        assert answer.status_code == 403
    async with platform.client(Authorization=f"Bearer {platform.admin_key}") as admin:
        assert (await admin.patch("/api/v1/admin/orgs/nobody-here/limits", json={})).status_code == 404
        assert (await admin.patch(f"/api/v1/admin/orgs/{org.name}/limits", json={"max_vms": -2})).status_code == 400


# Quotas the registry checks


async def test_repository_quota(platform: Platform, org: Org, other_org: Org) -> None:
    await set_limits(platform, org, max_repositories=2)
    async with platform.client(org) as http:
        for name in ("one", "two"):
            assert (await http.post("/api/v1/repositories", json={"name": name})).status_code == 201
        assert_quota(await http.post("/api/v1/repositories", json={"name": "three"}), "max_repositories", org)
        assert len((await http.get("/api/v1/repositories")).json()["repositories"]) == 2
        fork = await http.post("/api/v1/repositories/fork", json={"source_org": "vers", "source_repo": "x", "source_tag": "y"})
        assert fork.status_code == 404  # the source is checked first; a fork to a new repository would be 429
    async with platform.client(other_org) as http:
        assert (await http.post("/api/v1/repositories", json={"name": "three"})).status_code == 201


async def test_api_key_quota(platform: Platform, org: Org, other_org: Org) -> None:
    await set_limits(platform, org, max_api_keys=2)  # the org's first key counts
    async with platform.client(org) as http:
        assert (await http.post("/api/v1/keys", json={"label": "ci"})).status_code == 201
        assert_quota(await http.post("/api/v1/keys", json={"label": "more"}), "max_api_keys", org)
        assert len((await http.get("/api/v1/keys")).json()["api_keys"]) == 2
    async with platform.client(other_org) as http:
        assert (await http.post("/api/v1/keys", json={"label": "more"})).status_code == 201


# Quotas the orchestrator checks, refused before any VM boots


async def test_vm_count_and_disk_quotas(platform: Platform, org: Org, other_org: Org) -> None:
    await set_limits(platform, org, max_vms=0)
    async with platform.client(org) as http:
        assert_quota(await http.post("/api/v1/vm/new_root", json={"vm_config": {}}), "max_vms", org)
    await set_limits(platform, org, max_vms=-1, max_disk_mib=10)
    async with platform.client(org) as http:
        assert_quota(await http.post("/api/v1/vm/new_root", json={"vm_config": {"fs_size_mib": 512}}), "max_disk_mib", org)
        await set_limits(platform, org, max_disk_mib=-1, max_vcpus=1)
        assert_quota(await http.post("/api/v1/vm/new_root", json={"vm_config": {"vcpu_count": 2}}), "max_vcpus", org)
        assert (await http.get("/api/v1/vm")).json() == []
    async with platform.client(other_org) as http:
        answer = await http.post("/api/v1/vm/new_root", json={"vm_config": {"vcpu_count": 99}})
        assert answer.status_code == 400  # past the quota check: the VM's own shape is what is refused


async def test_a_service_acting_for_an_org_gets_its_limits(platform: Platform, org: Org) -> None:
    await set_limits(platform, org, max_commits=5)
    credential = ServiceCredential.load(platform.settings.service_secret, platform.settings.service_secret_file)
    async with grpc.aio.insecure_channel(platform.settings.addr("registry")) as channel:
        resolver = ServiceAwareResolver(CachedResolver(RegistryResolver(channel), 1.0, 0.0), credential)
        principal = await resolver.resolve(credential.token(org.id))
    assert principal.is_service and principal.org_name == org.name
    assert principal.limits is not None and principal.limits.max_commits == 5


# Stores: the checks in the transaction that adds the thing (tags, commits, domains, VMs)


@pytest_asyncio.fixture(params=list(BACKENDS))
async def databases(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[dict[str, Database]]:
    """Each service's database, on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        urls = {name: f"sqlite+aiosqlite:///{tmp_path / name}.db" for name in SERVICES}
    else:
        urls = {name: request.getfixturevalue("postgres").create_database(f"quotas_{uuid.uuid4().hex[:8]}_{name}") for name in SERVICES}
    made = {name: Database(url) for name, url in urls.items()}
    for name, db in made.items():
        await migrate(db, name)
    yield made
    for db in made.values():
        await db.close()


def acting_for(org_id: str, limits: OrgLimits = SMALL) -> Any:
    return auth.set_principal(Principal(org_id, "small", "key", "label", False, "token", limits=limits))


async def test_tag_quota_counts_repository_and_legacy_tags(databases: dict[str, Database]) -> None:
    store = TaggingStore(databases["tagging"], SMALL)
    caller = Principal("org-a", "small", "key", "label", False, "token", limits=SMALL)
    token = auth.set_principal(caller)
    try:
        await store.create_tag(caller, "repo", "app", "latest", "commit", "")
        with pytest.raises(ResourceExhausted, match="max_tags"):
            await store.create_commit_tag("org-a", "legacy", "commit", "")
        with pytest.raises(ResourceExhausted, match="--max-tags"):
            await store.create_tag(caller, "repo", "app", "v2", "commit", "")
    finally:
        auth.reset_principal(token)
    other = Principal("org-b", "other", "key", "label", False, "token", limits=SMALL)
    token = auth.set_principal(other)
    try:
        await store.create_tag(other, "repo-b", "app", "latest", "commit", "")
    finally:
        auth.reset_principal(token)


def vm_row(org_id: str, state: str = "running", disk: int = 1024) -> VmRow:
    return VmRow(
        id=str(uuid.uuid4()), org_id=org_id, state=state, vcpu_count=1, mem_size_mib=256, fs_size_mib=disk, image_name="default",
        kernel_path="", initramfs_path="", layer_id=str(uuid.uuid4()), ram_mode="shared",
    )  # fmt: skip


async def add_vm(store: OrchestratorStore, vm: VmRow) -> None:
    layer = LayerRow(id=vm.layer_id)
    await store.add_vms(vm.org_id, [vm], [layer], OperationRow(id=str(uuid.uuid4()), vm_id=vm.id, kind="create"))


async def test_vm_commit_and_domain_quotas_in_the_store(databases: dict[str, Database]) -> None:
    store = OrchestratorStore(databases["orchestrator"], 32, 32768)
    token = acting_for("org-a")
    try:
        first = vm_row("org-a")
        await add_vm(store, first)
        await store.update_vm(first.id, state="sleeping")  # a sleeping VM still exists, and keeps its disk
        await add_vm(store, vm_row("org-a", disk=512))
        with pytest.raises(ResourceExhausted, match="max_vms"):
            await add_vm(store, vm_row("org-a", disk=1))
        await store.mark_vm_deleted(first.id)
        with pytest.raises(ResourceExhausted, match="max_disk_mib"):
            await add_vm(store, vm_row("org-a", disk=2048))
        await add_vm(store, vm_row("org-a", disk=1024))

        await store.require_commit_room("org-a")
        commit = CommitRow(id=str(uuid.uuid4()), org_id="org-a", layer_id=first.layer_id, ram_format="file", size_bytes=2**20,
                           **first.model_dump(include={"vcpu_count", "mem_size_mib", "fs_size_mib", "image_name",
                                                       "kernel_path", "initramfs_path"}))  # fmt: skip
        async with store.db.write() as session:
            session.add(commit)
        with pytest.raises(ResourceExhausted, match="max_commits"):
            await store.require_commit_room("org-a")

        domain = DomainRow(id=str(uuid.uuid4()), name="a.vers.localhost", org_id="org-a", vm_id=(await store.list_vms("org-a"))[0].id)
        await store.add_domain(domain)
        again = DomainRow(id=str(uuid.uuid4()), name="b.vers.localhost", org_id="org-a", vm_id=domain.vm_id)
        with pytest.raises(ResourceExhausted, match="max_domains"):
            await store.add_domain(again)
    finally:
        auth.reset_principal(token)
    token = acting_for("org-b", SMALL.replace(max_commits=10))
    try:
        await store.require_commit_room("org-b")  # another org is unaffected
        await add_vm(store, vm_row("org-b"))
    finally:
        auth.reset_principal(token)


async def test_commit_bytes_quota(databases: dict[str, Database]) -> None:
    store = OrchestratorStore(databases["orchestrator"], 32, 32768)
    token = acting_for("org-a", SMALL.replace(max_commits=10, max_commit_mib=1))
    try:
        vm = vm_row("org-a")
        await add_vm(store, vm)
        shape = vm.model_dump(include={"vcpu_count", "mem_size_mib", "fs_size_mib", "image_name", "kernel_path", "initramfs_path"})
        big = CommitRow(id=str(uuid.uuid4()), org_id="org-a", layer_id=vm.layer_id, ram_format="file", size_bytes=2**20 + 1, **shape)
        with pytest.raises(ResourceExhausted, match="max_commit_mib"):
            await store.add_commit(big, vm.id, LayerRow(id=str(uuid.uuid4()), parent_id=vm.layer_id), "no-operation")
        fits = CommitRow(id=str(uuid.uuid4()), org_id="org-a", layer_id=vm.layer_id, ram_format="file", size_bytes=2**20, **shape)
        await store.add_commit(fits, vm.id, LayerRow(id=str(uuid.uuid4()), parent_id=vm.layer_id), "no-operation")
        with pytest.raises(ResourceExhausted, match="max_commit_mib"):
            await store.require_commit_room("org-a")
    finally:
        auth.reset_principal(token)


# The administrator key's rotation


async def test_a_new_admin_key_revokes_the_old_ones(databases: dict[str, Database], tmp_path: Path) -> None:
    store = RegistryStore(databases["registry"], OrgLimits.defaults(Settings()))
    platform_org = await store.ensure_org("vers")
    key_file = tmp_path / "admin.key"
    await ensure_admin_key(store, platform_org.id, key_file)
    first = key_file.read_text().strip()
    await ensure_admin_key(store, platform_org.id, key_file)
    assert key_file.read_text().strip() == first  # a working key is kept
    org_key = (await store.create_api_key(platform_org.id, "publisher")).token

    key_file.write_text("vers_not-a-key\n")
    await ensure_admin_key(store, platform_org.id, key_file)
    second = key_file.read_text().strip()
    assert second != first and (await store.resolve(second)).is_admin
    with pytest.raises(Unauthenticated):
        await store.resolve(first)

    key_file.unlink()
    await ensure_admin_key(store, platform_org.id, key_file)
    third = key_file.read_text().strip()
    assert (await store.resolve(third)).is_admin
    with pytest.raises(Unauthenticated):
        await store.resolve(second)
    assert not (await store.resolve(org_key)).is_admin  # the org's own keys stay
    assert [key.is_admin for key in await store.list_api_keys(platform_org.id)].count(True) == 1


# The negative cache of refused tokens


class Counting:
    def __init__(self, inner: RegistryResolver) -> None:
        self.inner = inner
        self.calls = 0

    async def resolve(self, token: str) -> Principal:
        self.calls += 1
        return await self.inner.resolve(token)


async def test_refused_tokens_are_remembered(platform: Platform, org: Org, monkeypatch: pytest.MonkeyPatch) -> None:
    async with grpc.aio.insecure_channel(platform.settings.addr("registry")) as channel:
        counting = Counting(RegistryResolver(channel))
        resolver = CachedResolver(counting, ttl_seconds=0.0, negative_ttl_seconds=0.5)
        for _ in range(50):
            with pytest.raises(Unauthenticated):
                await resolver.resolve("vers_flood")
        assert counting.calls == 1
        assert (await resolver.resolve(org.key)).org_id == org.id  # a good key is still asked for
        assert counting.calls == 2
        await asyncio.sleep(0.6)
        with pytest.raises(Unauthenticated):
            await resolver.resolve("vers_flood")
        assert counting.calls == 3

        monkeypatch.setattr(auth, "NEGATIVE_CACHE_ENTRIES", 3)
        bounded = CachedResolver(counting, ttl_seconds=0.0, negative_ttl_seconds=60.0)
        for token in ("vers_a", "vers_b", "vers_c", "vers_d"):
            with pytest.raises(Unauthenticated):
                await bounded.resolve(token)
        assert len(bounded._refused) == 3
        before = counting.calls
        with pytest.raises(Unauthenticated):
            await bounded.resolve("vers_d")  # remembered
        with pytest.raises(Unauthenticated):
            await bounded.resolve("vers_a")  # the oldest, dropped: asked again
        assert counting.calls == before + 1


async def test_a_flood_of_bad_tokens_reaches_the_registry_once(platform: Platform) -> None:
    """Through a service: the tagging service refuses the same bad token again and again, the registry's
    Authenticate counting (its answers to the tagging service) only the first."""
    tagging = platform.running["tagging"].service.resolver
    inner = tagging._inner  # type: ignore[attr-defined]
    assert isinstance(inner, CachedResolver)
    counting = Counting(inner._inner)  # type: ignore[arg-type]
    inner._inner = counting  # type: ignore[assignment]
    try:
        from vers.tagging.v1 import tagging_pb2, tagging_pb2_grpc

        async with grpc.aio.insecure_channel(platform.settings.addr("tagging")) as channel:
            stub = tagging_pb2_grpc.TaggingServiceStub(channel)
            token = f"vers_{uuid.uuid4().hex}"
            for _ in range(20):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.ListCommitTags(tagging_pb2.ListCommitTagsRequest(), metadata=(("authorization", f"Bearer {token}"),))
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert counting.calls == 1
    finally:
        inner._inner = counting.inner


# One VM: commits, tags and domains refused over their limits through the API; the CLI with dot names


async def test_commit_tag_and_domain_quotas_on_a_vm(platform: Platform, org: Org, other_org: Org, tmp_path: Path) -> None:
    await set_limits(platform, org, max_commits=1, max_tags=1, max_domains=0)
    async with platform.client(org) as http:
        booted = await http.post("/api/v1/vm/new_root?wait_boot=true", json={"vm_config": {"vcpu_count": 1, "mem_size_mib": 256}})
        assert booted.status_code == 201, booted.text
        vm_id = booted.json()["vm_id"]
        try:
            committed = await http.post(f"/api/v1/vm/{vm_id}/commit", json={"name": "first"})
            assert committed.status_code == 201, committed.text
            commit_id = committed.json()["commit_id"]
            assert_quota(await http.post(f"/api/v1/vm/{vm_id}/commit", json={}), "max_commits", org)
            assert_quota(await http.post(f"/api/v1/vm/{vm_id}/branch"), "max_commits", org)  # a VM's branch commits it first
            assert (await http.get("/api/v1/commits")).json()["total"] == 1

            assert (await http.post("/api/v1/repositories", json={"name": "app"})).status_code == 201
            tag = {"tag_name": "latest", "commit_id": commit_id}
            assert (await http.post("/api/v1/repositories/app/tags", json=tag)).status_code == 201
            assert_quota(await http.post("/api/v1/repositories/app/tags", json={**tag, "tag_name": "v1"}), "max_tags", org)
            assert_quota(await http.post("/api/v1/commit_tags", json={**tag, "tag_name": "legacy"}), "max_tags", org)
            assert_quota(await http.post("/api/v1/domains", json={"domain": f"q-{uuid.uuid4().hex[:8]}", "vm_id": vm_id}),
                         "max_domains", org)  # fmt: skip

            for args in (("repo", "tag", "delete", "app", "."), ("repo", "tag", "delete", "app", ".."), ("repo", "delete", "..")):
                code, output = await vers(platform, org, tmp_path, *args)
                assert code == 1 and ("HTTP 400" in output or "HTTP 404" in output), output
            assert (await http.get("/api/v1/repositories/app")).status_code == 200
            assert [t["tag_name"] for t in (await http.get("/api/v1/repositories/app/tags")).json()["tags"]] == ["latest"]
        finally:
            await http.delete(f"/api/v1/vm/{vm_id}")
    async with platform.client(other_org) as http:
        assert (await http.get("/api/v1/whoami")).json()["limits"]["max_commits"] == platform.settings.org_max_commits

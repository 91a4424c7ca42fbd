"""Repository governance through the REST gateway: immutable tag patterns and retention rules, the org's
retention rule, garbage collection's dry run, the audit log, and the secret scan before a repository goes
public (its findings in the 409's body and in the gRPC status's details)."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from grpc_status import rpc_status

from tests import conftest
from tests.conftest import Org, Platform, discard, kill_vms_under
from vers.common.v1 import governance_pb2
from vers.registry.v1 import registry_pb2, registry_pb2_grpc

pytestmark = pytest.mark.vm

NO_RETENTION = {"keep_last": 0, "keep_tags": [], "untagged_older_than_days": 0}


async def create(http: httpx.AsyncClient, name: str, **extra: Any) -> httpx.Response:
    return await http.post("/api/v1/repositories", json={"name": name, **extra})


async def audit_events(http: httpx.AsyncClient, **query: Any) -> list[dict[str, Any]]:
    """Every page of the org's audit log, following next_page_token."""
    events: list[dict[str, Any]] = []
    token = ""
    while True:
        answer = await http.get("/api/v1/audit", params={**query, **({"page_token": token} if token else {})})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        events.extend(body["events"])
        token = body["next_page_token"]
        if not token:
            return events


async def test_policy_on_create_shows_in_every_repository_answer(platform: Platform, org: Org) -> None:
    retention = {"keep_last": 5, "keep_tags": ["release-*"], "untagged_older_than_days": 30}
    async with platform.client(org) as http:
        created = await create(http, "app", immutable_tags=["v*", "stable-[0-9]"], retention=retention)
        assert created.status_code == 201, created.text
        assert (await create(http, "plain")).status_code == 201
        got = (await http.get("/api/v1/repositories/app")).json()
        listed = {repo["name"]: repo for repo in (await http.get("/api/v1/repositories")).json()["repositories"]}
    assert (got["immutable_tags"], got["retention"]) == (["v*", "stable-[0-9]"], retention)
    assert listed["app"] == got
    assert (listed["plain"]["immutable_tags"], listed["plain"]["retention"]) == ([], NO_RETENTION)


async def test_policy_changes_what_is_given_and_keeps_the_rest(platform: Platform, org: Org) -> None:
    async with platform.client(org) as http:
        await create(http, "app", immutable_tags=["v*"])
        changed = await http.patch("/api/v1/repositories/app/policy", json={"retention": {"keep_last": 3}})
        assert changed.status_code == 200, changed.text
        assert changed.json()["immutable_tags"] == ["v*"], "a field left out keeps its value"
        assert changed.json()["retention"] == {**NO_RETENTION, "keep_last": 3}
        patterns = await http.patch("/api/v1/repositories/app/policy", json={"immutable_tags": {"patterns": ["v*", "prod", "v*"]}})
        assert patterns.json()["immutable_tags"] == ["v*", "prod"], "each pattern once"
        assert patterns.json()["retention"]["keep_last"] == 3
        cleared = await http.patch("/api/v1/repositories/app/policy", json={"immutable_tags": {"patterns": []}})
        assert cleared.status_code == 200
        assert cleared.json()["immutable_tags"] == []
        assert (await http.get("/api/v1/repositories/app")).json()["retention"]["keep_last"] == 3


BAD_POLICIES = [
    ({"immutable_tags": ["v 1"]}, "immutable_tags: 'v 1' is not a tag pattern"),
    ({"immutable_tags": ["x" * 65]}, "is not a tag pattern: 1-64 characters"),
    ({"immutable_tags": [""]}, "immutable_tags: '' is not a tag pattern"),
    ({"immutable_tags": ["v/1"]}, "is not a tag pattern"),
    ({"immutable_tags": [f"v{i}" for i in range(33)]}, "immutable_tags has 33 patterns; at most 32"),
    ({"retention": {"keep_last": 1001}}, "retention.keep_last must be between 0 (off) and 1000 commits, not 1001"),
    ({"retention": {"keep_last": -1}}, "retention.keep_last must be between 0 (off) and 1000"),
    ({"retention": {"untagged_older_than_days": 36501}}, "retention.untagged_older_than_days must be between 0 (off) and 36500 days"),
    ({"retention": {"keep_tags": ["ok", "not ok"]}}, "retention.keep_tags: 'not ok' is not a tag pattern"),
]


@pytest.mark.parametrize(("policy", "message"), BAD_POLICIES)
async def test_invalid_policies_are_400_naming_the_field(platform: Platform, org: Org, policy: dict[str, Any], message: str) -> None:
    async with platform.client(org) as http:
        refused = await create(http, "bad", **policy)
        assert refused.status_code == 400, refused.text
        assert refused.json()["code"] == "INVALID_ARGUMENT"
        assert message in refused.json()["error"]
        assert (await http.get("/api/v1/repositories/bad")).status_code == 404, "nothing is made"

        await create(http, "good", immutable_tags=["v*"])
        if "immutable_tags" in policy:
            policy = {"immutable_tags": {"patterns": policy["immutable_tags"]}}
        refused = await http.patch("/api/v1/repositories/good/policy", json=policy)
        assert refused.status_code == 400, refused.text
        assert message in refused.json()["error"]
        repo = (await http.get("/api/v1/repositories/good")).json()
    assert (repo["immutable_tags"], repo["retention"]) == (["v*"], NO_RETENTION), "nothing changes"


async def test_another_org_neither_sees_nor_changes_a_policy(platform: Platform, org: Org, other_org: Org) -> None:
    async with platform.client(org) as http:
        await create(http, "app", immutable_tags=["v*"])
    async with platform.client(other_org) as http:
        assert (await http.get("/api/v1/repositories/app")).status_code == 404
        changed = await http.patch("/api/v1/repositories/app/policy", json={"immutable_tags": {"patterns": []}})
        assert changed.status_code == 404
        assert changed.json()["code"] == "NOT_FOUND"
    async with platform.client(org) as http:
        assert (await http.get("/api/v1/repositories/app")).json()["immutable_tags"] == ["v*"]


async def test_org_retention_is_the_callers_own(platform: Platform, org: Org, other_org: Org) -> None:
    async with platform.client(org) as http:
        assert (await http.get("/api/v1/retention")).json() == {"untagged_older_than_days": 0}
        changed = await http.patch("/api/v1/retention", json={"retention": {"untagged_older_than_days": 30}})
        assert (changed.status_code, changed.json()) == (200, {"untagged_older_than_days": 30})
        assert (await http.get("/api/v1/retention")).json() == {"untagged_older_than_days": 30}
        refused = await http.patch("/api/v1/retention", json={"retention": {"untagged_older_than_days": 36501}})
        assert refused.status_code == 400
        assert "retention.untagged_older_than_days must be between 0 (off) and 36500 days" in refused.json()["error"]
        missing = await http.patch("/api/v1/retention", json={})
        assert missing.status_code == 400
        assert "retention is required" in missing.json()["error"]
        assert (await http.get("/api/v1/retention")).json() == {"untagged_older_than_days": 30}
    async with platform.client(other_org) as http:
        assert (await http.get("/api/v1/retention")).json() == {"untagged_older_than_days": 0}


async def test_gc_of_an_org_with_no_commits_lists_nothing(platform: Platform, org: Org) -> None:
    async with platform.client(org) as http:
        without_rules = await http.post("/api/v1/gc", json={"dry_run": True})
        assert without_rules.status_code == 200, without_rules.text
        assert without_rules.json() == {"dry_run": True, "commits": [], "bytes_freed": "0"}
        # With rules, the tagging service plans and the orchestrator answers: still nothing to delete.
        await http.patch("/api/v1/retention", json={"retention": {"untagged_older_than_days": 1}})
        await create(http, "app", retention={"keep_last": 2})
        planned = await http.post("/api/v1/gc", json={"dry_run": True})
        assert planned.status_code == 200, planned.text
        assert planned.json() == {"dry_run": True, "commits": [], "bytes_freed": "0"}
        assert [event["type"] for event in await audit_events(http, type="gc")] == [], "a dry run is not audited"
        ran = await http.post("/api/v1/gc", json={})
        assert ran.status_code == 200, ran.text
        assert ran.json() == {"dry_run": False, "commits": [], "bytes_freed": "0"}
        (gc,) = await audit_events(http, type="gc")
    assert (gc["target"], json.loads(gc["after"])) == ("org", {"commits": [], "bytes_freed": 0})


async def test_audit_log_lists_changes_in_order_pages_and_filters(platform: Platform, org: Org) -> None:
    async with platform.client(org) as http:
        (own_key,) = (await http.get("/api/v1/keys")).json()["api_keys"]
        await create(http, "first")
        await create(http, "second", immutable_tags=["v*"])
        new_key = (await http.post("/api/v1/keys", json={"label": "ci"})).json()
        await http.patch("/api/v1/repositories/second/policy", json={"immutable_tags": {"patterns": []}})
        await http.patch("/api/v1/repositories/first/visibility", json={"is_public": True})
        assert (await http.delete(f"/api/v1/keys/{new_key['api_key']['id']}")).status_code == 204
        assert (await http.delete("/api/v1/repositories/first")).status_code == 204
        await http.patch("/api/v1/retention", json={"retention": {"untagged_older_than_days": 9}})

        events = await audit_events(http, page_size=2)
        first_page = (await http.get("/api/v1/audit", params={"page_size": 2})).json()
        repository_events = await audit_events(http, type="repository")
        one_type = await audit_events(http, type="repository.create")
        refused = await http.get("/api/v1/audit", params={"page_size": 2, "page_token": "not-a-token"})

    assert [(event["type"], event["target"]) for event in events] == [
        ("key.create", own_key["id"]),  # the org's first key, made with the org
        ("repository.create", "first"),
        ("repository.create", "second"),
        ("key.create", new_key["api_key"]["id"]),
        ("repository.policy", "second"),
        ("repository.visibility", "first"),
        ("key.revoke", new_key["api_key"]["id"]),
        ("repository.delete", "first"),
        ("retention.set", "org"),
    ]
    assert len(first_page["events"]) == 2 and first_page["next_page_token"]
    assert len({event["event_id"] for event in events}) == len(events)
    assert [event["at"] for event in events] == sorted(event["at"] for event in events)
    assert events[0]["api_key_id"] == "", "the org's first key is made by the platform"
    assert {event["api_key_id"] for event in events[1:]} == {own_key["id"]}
    assert {event["org_id"] for event in events} == {org.id}
    policy = events[4]
    assert json.loads(policy["before"])["immutable_tags"] == ["v*"]
    assert json.loads(policy["after"])["immutable_tags"] == []
    assert json.loads(events[3]["after"]) == {"label": "ci", "is_admin": False}
    assert new_key["token"] not in json.dumps(events), "a key's token is never in the log"
    assert [event["type"] for event in repository_events] == [
        "repository.create", "repository.create", "repository.policy", "repository.visibility", "repository.delete"
    ]  # fmt: skip
    assert [event["target"] for event in one_type] == ["first", "second"]
    assert refused.status_code == 400
    assert "page_token" in refused.json()["error"]


async def test_audit_log_of_another_org_is_its_own(platform: Platform, org: Org, other_org: Org) -> None:
    async with platform.client(org) as http:
        await create(http, "mine")
    async with platform.client(other_org) as http:
        events = await audit_events(http)
    assert [event["type"] for event in events] == ["key.create"]


@pytest.mark.parametrize("method", ["PUT", "PATCH", "DELETE", "POST"])
async def test_audit_entries_cannot_be_changed_through_the_api(platform: Platform, org: Org, method: str) -> None:
    async with platform.client(org) as http:
        await create(http, "app")
        before = await audit_events(http)
        answer = await http.request(method, "/api/v1/audit", json={"events": []})
        after = await audit_events(http)
    assert answer.status_code == 405, answer.text
    assert answer.json()["success"] is False
    assert after == before


# A repository whose tags name commits: the scan before publishing, and immutable tags against deletion.

FAKE_KEY_PATH = "/root/.ssh/id_ed25519"


def fake_private_key() -> str:
    body = base64.b64encode(b"openssh-key-v1\0" + secrets.token_bytes(300)).decode()
    lines = [body[i : i + 70] for i in range(0, len(body), 70)]
    return "\n".join(["-----BEGIN OPENSSH PRIVATE KEY-----", *lines, "-----END OPENSSH PRIVATE KEY-----", ""])


async def commit_with_a_secret(http: httpx.AsyncClient) -> str:
    vm = await http.post("/api/v1/vm/new_root?wait_boot=true", json={"vm_config": {"mem_size_mib": 128}})
    assert vm.status_code == 201, vm.text
    vm_id = vm.json()["vm_id"]
    script = f"mkdir -p /root/.ssh && cat > {FAKE_KEY_PATH} <<'EOF'\n{fake_private_key()}EOF\nchmod 600 {FAKE_KEY_PATH}; sync"
    wrote = await http.post(f"/api/v1/vm/{vm_id}/exec", json={"command": ["sh", "-c", script]})
    assert wrote.status_code == 200 and wrote.json()["exit_code"] == 0, wrote.text
    commit = await http.post(f"/api/v1/vm/{vm_id}/commit", json={"name": "leaky"})
    assert commit.status_code == 201, commit.text
    assert (await http.delete(f"/api/v1/vm/{vm_id}")).status_code in (200, 204)
    return str(commit.json()["commit_id"])


async def test_publishing_secrets_is_refused_with_findings_then_forced_and_audited(platform: Platform, org: Org) -> None:
    async with platform.client(org) as http:
        commit_id = await commit_with_a_secret(http)
        await create(http, "leaky", immutable_tags=["v*"])
        for tag in ("v1", "latest"):
            tagged = await http.post("/api/v1/repositories/leaky/tags", json={"tag_name": tag, "commit_id": commit_id})
            assert tagged.status_code == 201, tagged.text

        # Immutable tags: the repository is not deleted while it holds one.
        kept = await http.delete("/api/v1/repositories/leaky")
        assert kept.status_code == 409, kept.text
        assert "tag 'v1'" in kept.json()["error"] and "rule 'v*'" in kept.json()["error"]
        assert "vers repo policy leaky --no-immutable-tags" in kept.json()["error"]

        refused = await http.patch("/api/v1/repositories/leaky/visibility", json={"is_public": True})
        assert refused.status_code == 409, refused.text
        body = refused.json()
        assert (body["success"], body["code"]) == (False, "ABORTED")
        assert "in 1 commit(s)" in body["error"] and "vers repo visibility leaky --public --force" in body["error"]
        assert body["findings"], body
        assert {finding["commit_id"] for finding in body["findings"]} == {commit_id}
        assert set(body["findings"][0]) == {"commit_id", "where", "path", "offset", "rule", "excerpt"}
        on_disk = [finding for finding in body["findings"] if finding["where"] == "disk"]
        assert any(finding["path"] == FAKE_KEY_PATH for finding in on_disk), body["findings"]
        assert f"{len(body['findings'])} secret(s)" in body["error"]
        assert (await http.get("/api/v1/repositories/leaky")).json()["is_public"] is False

        # A gRPC client reads the same findings from the status's details.
        async with grpc.aio.insecure_channel(platform.settings.addr("registry")) as channel:
            stub = registry_pb2_grpc.RegistryServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.SetRepositoryVisibility(
                    registry_pb2.SetRepositoryVisibilityRequest(repo_name="leaky", is_public=True), metadata=org.metadata
                )
        status = rpc_status.from_call(raised.value)
        assert status is not None and status.message == body["error"]
        findings = governance_pb2.SecretFindings()
        assert status.details[0].Unpack(findings)
        assert len(findings.findings) == len(body["findings"])

        forced = await http.patch("/api/v1/repositories/leaky/visibility", json={"is_public": True, "force": True})
        assert forced.status_code == 200, forced.text
        assert forced.json()["is_public"] is True
        private = await http.patch("/api/v1/repositories/leaky/visibility", json={"is_public": False})
        assert private.status_code == 200 and private.json()["is_public"] is False

        await http.patch("/api/v1/repositories/leaky/policy", json={"immutable_tags": {"patterns": []}})
        assert (await http.delete("/api/v1/repositories/leaky")).status_code == 204
        events = [event for event in await audit_events(http) if event["target"] == "leaky"]

    assert [event["type"] for event in events] == [
        "repository.create", "repository.visibility", "publish.forced", "repository.visibility",
        "repository.policy", "repository.delete",
    ]  # fmt: skip
    forced_event = json.loads(events[2]["after"])
    assert forced_event["findings"] == len(body["findings"])
    assert forced_event["rules"] == sorted({finding["rule"] for finding in body["findings"]})
    assert forced_event["purpose"] == "repository leaky made public"
    assert [json.loads(events[i]["after"]) for i in (1, 3)] == [{"is_public": True}, {"is_public": False}]


async def test_a_clean_publish_and_a_fork_are_audited(platform: Platform, org: Org, other_org: Org) -> None:
    async with platform.client(other_org) as http:
        vm = await http.post("/api/v1/vm/new_root?wait_boot=true", json={"vm_config": {"mem_size_mib": 128}})
        assert vm.status_code == 201, vm.text
        commit_id = await commit_of(http, vm.json()["vm_id"], "clean")
        assert (await http.delete(f"/api/v1/vm/{vm.json()['vm_id']}")).status_code in (200, 204)
        await create(http, "base")
        assert (await http.post("/api/v1/repositories/base/tags", json={"tag_name": "stable", "commit_id": commit_id})).status_code == 201
        published = await http.patch("/api/v1/repositories/base/visibility", json={"is_public": True})
        assert published.status_code == 200, published.text
        publisher_events = [event["type"] for event in await audit_events(http) if event["target"] == "base"]
    assert publisher_events == ["repository.create", "repository.visibility"], "nothing found, nothing forced"

    async with platform.client(org) as http:
        fork = await http.post(
            "/api/v1/repositories/fork", json={"source_org": other_org.name, "source_repo": "base", "source_tag": "stable"}
        )
        assert fork.status_code == 201, fork.text
        (event,) = await audit_events(http, type="fork")
        assert (await http.delete(f"/api/v1/vm/{fork.json()['vm_id']}")).status_code in (200, 204)
    assert event["target"] == f"{other_org.name}/base:stable -> base:stable"
    assert json.loads(event["after"]) == {"vm_id": fork.json()["vm_id"], "commit_id": fork.json()["commit_id"]}
    assert event["api_key_id"] != ""


async def commit_of(http: httpx.AsyncClient, vm_id: str, name: str) -> str:
    commit = await http.post(f"/api/v1/vm/{vm_id}/commit", json={"name": name})
    assert commit.status_code == 201, commit.text
    return str(commit.json()["commit_id"])


async def test_the_scheduled_collection_applies_the_rules_as_the_platform(tmp_path: Path) -> None:
    """A platform of its own that collects every second: a repository keeping its last commit loses the one
    its tag named before, with an audit entry that names no key."""
    platform = await Platform.start(conftest.test_settings(tmp_path / "data").model_copy(update={"gc_interval_seconds": 1}))
    try:
        org = await platform.new_org("scheduled")
        async with platform.client(org) as http:
            vm = await http.post("/api/v1/vm/new_root?wait_boot=true", json={"vm_config": {"mem_size_mib": 128}})
            assert vm.status_code == 201, vm.text
            vm_id = vm.json()["vm_id"]
            first, second = await commit_of(http, vm_id, "first"), await commit_of(http, vm_id, "second")
            await create(http, "app", retention={"keep_last": 1})
            assert (await http.post("/api/v1/repositories/app/tags", json={"tag_name": "latest", "commit_id": first})).status_code == 201
            moved = await http.patch("/api/v1/repositories/app/tags/latest", json={"commit_id": second})
            assert moved.status_code == 200, moved.text
            for _ in range(60):
                collections = await audit_events(http, type="gc")
                if collections:
                    break
                await asyncio.sleep(0.5)
            assert [json.loads(event["after"])["commits"] for event in collections] == [[first]]
            assert collections[0]["api_key_id"] == "", "the platform collected, not a key"
            assert (await http.get(f"/api/v1/commits/{first}")).status_code == 404
            assert (await http.get(f"/api/v1/commits/{second}")).status_code == 200
    finally:
        kill_vms_under(platform.settings.vm_run_dir)
        await asyncio.sleep(0.3)
        await platform.stop()
        discard(platform.settings.data_dir)

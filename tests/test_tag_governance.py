"""The tagging service's side of governance: immutable tags, the audit entries of tag changes, and the
retention plan from the tags' history. The rules first, on their own; then end to end on real commits."""

from __future__ import annotations

import contextlib
import itertools
import json
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import pytest
import pytest_asyncio

from services.common.auth import ServiceCredential
from services.tagging.models import TagEventRow
from services.tagging.store import immutable_rule, plan_retention
from tests.conftest import Org, Platform
from vers.common.v1 import governance_pb2
from vers.tagging.v1 import tagging_pb2, tagging_pb2_grpc

pytestmark = pytest.mark.vm

# The rules, without a platform


def history(tag: str, *commits: str, repo_id: str = "r1", deleted: bool = False) -> list[TagEventRow]:
    """A tag made on the first commit and moved through the others (then deleted, if asked)."""

    def event(action: str, old: str, new: str) -> TagEventRow:
        return TagEventRow(repo_id=repo_id, tag_name=tag, action=action, old_commit_id=old, new_commit_id=new, org_id="o", api_key_id="k")

    events = [event("created", "", commits[0])]
    events += [event("moved", old, new) for old, new in itertools.pairwise(commits)]
    return [*events, event("deleted", commits[-1], "")] if deleted else events


def repository(repo_id: str = "r1", name: str = "my-app", **policy: Any) -> governance_pb2.RepositoryRetention:
    return governance_pb2.RepositoryRetention(repo_id=repo_id, repo_name=name, policy=governance_pb2.RetentionPolicy(**policy))


def planned(candidates: list[governance_pb2.RetentionCandidate]) -> list[tuple[str, int]]:
    return [(c.commit_id, c.min_age_days) for c in candidates]


def test_immutable_rules_match_whole_names_case_sensitively() -> None:
    assert immutable_rule(["release-*", "v*"], "v1.0") == "v*"
    assert immutable_rule(["v*"], "latest") is None
    assert immutable_rule(["v*"], "V1") is None
    assert immutable_rule(["v?.?"], "v1.10") is None
    assert immutable_rule([], "v1.0") is None


def test_keep_last_lets_the_older_commits_of_a_tag_go() -> None:
    candidates = plan_retention([repository(keep_last=2)], {"r1": history("latest", "a", "b", "c", "d")}, {"d"})
    assert planned(candidates) == [("a", 0), ("b", 0)]
    assert {c.reason for c in candidates} == {"my-app: beyond the last 2 commits of latest"}
    one = plan_retention([repository(keep_last=1)], {"r1": history("latest", "a", "b")}, {"b"})
    assert [c.reason for c in one] == ["my-app: beyond the last commit of latest"]


def test_a_commit_a_tag_moves_back_to_is_its_newest_again() -> None:
    candidates = plan_retention([repository(keep_last=2)], {"r1": history("latest", "a", "b", "c", "a")}, {"a"})
    assert planned(candidates) == [("b", 0)]


def test_keep_tags_keep_every_commit_of_their_tags() -> None:
    events = history("v1", "a", "b", "c") + history("latest", "d", "e", "f")
    candidates = plan_retention([repository(keep_last=1, keep_tags=["v*"])], {"r1": events}, {"c", "f"})
    assert planned(candidates) == [("d", 0), ("e", 0)]


def test_no_keep_last_keeps_everything_and_untagged_commits_go_when_old_enough() -> None:
    events = history("latest", "a", "b", "c") + history("gone", "d", deleted=True)
    assert plan_retention([repository(keep_tags=["v*"])], {"r1": events}, {"c"}) == []
    candidates = plan_retention([repository(untagged_older_than_days=30)], {"r1": events}, {"c"})
    assert planned(candidates) == [("a", 30), ("b", 30), ("d", 30)]
    assert candidates[0].reason == "my-app: untagged, and older than 30 days"


def test_what_a_keep_rule_keeps_the_untagged_rule_leaves_at_any_age() -> None:
    events = history("latest", "a", "b", "c") + history("v1", "d", "e")
    rules = [repository(keep_tags=["v*"], keep_last=2, untagged_older_than_days=30)]
    assert planned(plan_retention(rules, {"r1": events}, {"c", "e"})) == [("a", 0)]


def test_a_commit_two_rules_let_go_is_listed_once_with_no_minimum_age() -> None:
    candidates = plan_retention([repository(keep_last=1, untagged_older_than_days=7)], {"r1": history("latest", "a", "b", "c")}, {"c"})
    assert planned(candidates) == [("a", 0), ("b", 0)]


def test_what_a_tag_names_now_or_another_repository_keeps_never_goes() -> None:
    histories = {"r1": history("latest", "a", "b", "c", "d"), "r2": history("old", "b", repo_id="r2", deleted=True)}
    rules = [repository(keep_last=1), repository("r2", "other")]
    assert planned(plan_retention(rules, histories, {"d", "a"})) == [("c", 0)]


def test_a_pruned_history_still_knows_where_its_oldest_move_started() -> None:
    pruned = history("latest", "a", "b", "c")[1:]
    assert planned(plan_retention([repository(keep_last=1)], {"r1": pruned}, {"c"})) == [("a", 0), ("b", 0)]


# End to end, on commits of one VM


@dataclass
class Governed:
    org: Org
    http: httpx.AsyncClient
    # Commits the immutable-tag and audit tests tag; the retention test has its own, so that no tag another
    # test leaves on a commit changes what it plans.
    shared: list[str]
    retained: list[str]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def governed(platform: Platform) -> AsyncIterator[Governed]:
    org = await platform.new_org("governed")
    async with platform.client(org) as http:
        booted = await http.post("/api/v1/vm/new_root?wait_boot=true", json={"vm_config": {"mem_size_mib": 128}})
        assert booted.status_code == 201, booted.text
        vm = booted.json()["vm_id"]
        try:
            ids = []
            for number in range(9):
                committed = await http.post(f"/api/v1/vm/{vm}/commit", json={"name": f"c{number}"})
                assert committed.status_code == 201, committed.text
                ids.append(committed.json()["commit_id"])
            yield Governed(org, http, ids[:2], ids[2:])
        finally:
            await http.delete(f"/api/v1/vm/{vm}")


async def internal(platform: Platform, org: Org, method: str, request: Any) -> Any:
    """A TaggingInternalService call as the platform's services make it: the service credential, for `org`."""
    settings = platform.settings
    as_org = ServiceCredential.load(settings.service_secret, settings.service_secret_file).metadata(org.id)
    async with grpc.aio.insecure_channel(settings.addr("tagging")) as channel:
        return await getattr(tagging_pb2_grpc.TaggingInternalServiceStub(channel), method)(request, metadata=as_org)


async def audit_events(platform: Platform, org: Org, type: str = "", page_size: int = 0) -> list[Any]:
    events, token = [], ""
    while True:
        request = tagging_pb2.ListAuditEventsRequest(type=type, page_size=page_size, page_token=token)
        page = await internal(platform, org, "ListAuditEvents", request)
        events += page.events
        token = page.next_page_token
        if not token:
            return events


def changes(events: list[Any], prefix: str) -> list[tuple[str, str, Any, Any]]:
    return [
        (e.type, e.target, json.loads(e.before) if e.before else None, json.loads(e.after) if e.after else None)
        for e in events if e.target.startswith(prefix)
    ]  # fmt: skip


async def new_tag(http: httpx.AsyncClient, repo: str, tag: str, commit_id: str) -> None:
    created = await http.post(f"/api/v1/repositories/{repo}/tags", json={"tag_name": tag, "commit_id": commit_id})
    assert created.status_code == 201, created.text


async def test_an_immutable_tag_keeps_its_commit_while_latest_moves(platform: Platform, governed: Governed) -> None:
    http, (first, second) = governed.http, governed.shared
    created = await http.post("/api/v1/repositories", json={"name": "my-app", "immutable_tags": ["v*"]})
    assert created.status_code == 201, created.text
    assert (await http.get("/api/v1/repositories/my-app")).json()["immutable_tags"] == ["v*"]
    await new_tag(http, "my-app", "v1.0", first)
    await new_tag(http, "my-app", "latest", first)

    rule = "tag v1.0 of repository my-app is immutable (rule 'v*'): make a new tag, or remove the rule with vers repo policy my-app"
    moved = await http.patch("/api/v1/repositories/my-app/tags/v1.0", json={"commit_id": second})
    assert (moved.status_code, moved.json()["error"]) == (409, rule)
    deleted = await http.delete("/api/v1/repositories/my-app/tags/v1.0")
    assert (deleted.status_code, deleted.json()["error"]) == (409, rule)
    described = await http.patch("/api/v1/repositories/my-app/tags/v1.0", json={"description": "first release", "commit_id": first})
    assert described.status_code == 200, described.text
    assert (described.json()["commit_id"], described.json()["description"]) == (first, "first release")

    assert (await http.patch("/api/v1/repositories/my-app/tags/latest", json={"commit_id": second})).json()["commit_id"] == second
    await new_tag(http, "my-app", "v2.0", second)
    assert changes(await audit_events(platform, governed.org), "my-app:v1.0") == [("tag.create", "my-app:v1.0", None, {"commit_id": first})]

    policy = await http.patch("/api/v1/repositories/my-app/policy", json={"immutable_tags": {"patterns": []}})
    assert policy.status_code == 200, policy.text
    assert (await http.patch("/api/v1/repositories/my-app/tags/v1.0", json={"commit_id": second})).status_code == 200
    assert (await http.delete("/api/v1/repositories/my-app/tags/v1.0")).status_code == 204


async def test_a_rule_set_later_holds_tags_made_before_it(governed: Governed) -> None:
    http, (first, second) = governed.http, governed.shared
    assert (await http.post("/api/v1/repositories", json={"name": "later"})).status_code == 201
    await new_tag(http, "later", "v1", first)
    assert (await http.patch("/api/v1/repositories/later/tags/v1", json={"commit_id": second})).status_code == 200
    policy = await http.patch(
        "/api/v1/repositories/later/policy", json={"immutable_tags": {"patterns": ["v*"]}, "retention": {"keep_last": 5}}
    )
    assert policy.status_code == 200, policy.text
    refused = await http.patch("/api/v1/repositories/later/tags/v1", json={"commit_id": first})
    assert refused.status_code == 409
    assert "rule 'v*'" in refused.json()["error"]
    assert (await http.get("/api/v1/repositories/later/tags/v1")).json()["commit_id"] == second


async def test_tag_changes_are_audited_in_order_and_only_for_their_org(platform: Platform, governed: Governed, other_org: Org) -> None:
    http, (first, second) = governed.http, governed.shared
    assert (await http.post("/api/v1/repositories", json={"name": "audited"})).status_code == 201
    await new_tag(http, "audited", "latest", first)
    await http.patch("/api/v1/repositories/audited/tags/latest", json={"commit_id": second})
    await http.patch("/api/v1/repositories/audited/tags/latest", json={"description": "no commit changes"})
    await new_tag(http, "audited", "beta", first)
    await http.delete("/api/v1/repositories/audited/tags/latest")
    assert (await http.post("/api/v1/commit_tags", json={"tag_name": "audited-legacy", "commit_id": first})).status_code == 201
    await http.patch("/api/v1/commit_tags/audited-legacy", json={"commit_id": second})
    await http.delete("/api/v1/commit_tags/audited-legacy")
    # the repository's deletion takes its last tag with it, recorded as that tag's delete
    assert (await http.delete("/api/v1/repositories/audited")).status_code == 204

    events = await audit_events(platform, governed.org, page_size=2)
    at_first, at_second = {"commit_id": first}, {"commit_id": second}
    assert changes(events, "audited") == [
        ("tag.create", "audited:latest", None, at_first),
        ("tag.move", "audited:latest", at_first, at_second),
        ("tag.create", "audited:beta", None, at_first),
        ("tag.delete", "audited:latest", at_second, None),
        ("commit_tag.create", "audited-legacy", None, at_first),
        ("commit_tag.move", "audited-legacy", at_first, at_second),
        ("commit_tag.delete", "audited-legacy", at_second, None),
        ("tag.delete", "audited:beta", at_first, None),
    ]
    assert [e.at for e in events] == sorted(e.at for e in events)
    assert {e.org_id for e in events} == {governed.org.id}
    assert len({e.api_key_id for e in events}) == 1 and events[0].api_key_id, "each entry names the key that made the change"
    assert {e.type for e in await audit_events(platform, governed.org, type="commit_tag")} == {
        "commit_tag.create",
        "commit_tag.move",
        "commit_tag.delete",
    }
    assert not any(e.type.startswith("commit_tag") for e in await audit_events(platform, governed.org, type="tag"))
    assert changes(await audit_events(platform, other_org), "audited") == []

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        async with grpc.aio.insecure_channel(platform.settings.addr("tagging")) as channel:
            stub = tagging_pb2_grpc.TaggingInternalServiceStub(channel)
            await stub.ListAuditEvents(tagging_pb2.ListAuditEventsRequest(), metadata=governed.org.metadata)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with contextlib.closing(sqlite3.connect(platform.settings.data_dir / "tagging.db")) as db:
        for statement in ("UPDATE audit_events SET type = 'tag.create'", "DELETE FROM audit_events"):
            with pytest.raises(sqlite3.DatabaseError, match="audit entries cannot be"):
                db.execute(statement)


async def test_retention_plans_the_oldest_commits_and_never_a_tagged_one(platform: Platform, governed: Governed, other_org: Org) -> None:
    http, commits = governed.http, governed.retained
    assert len(commits) == 7
    assert (await http.post("/api/v1/repositories", json={"name": "kept-three"})).status_code == 201
    await new_tag(http, "kept-three", "latest", commits[0])
    for commit_id in commits[1:]:
        assert (await http.patch("/api/v1/repositories/kept-three/tags/latest", json={"commit_id": commit_id})).status_code == 200
    repo_id = (await http.get("/api/v1/repositories/kept-three")).json()["repo_id"]

    async def plan(org: Org = governed.org, **policy: Any) -> tagging_pb2.PlanRetentionResponse:
        request = tagging_pb2.PlanRetentionRequest(repositories=[repository(repo_id, "kept-three", **policy)])
        return await internal(platform, org, "PlanRetention", request)

    three = await plan(keep_last=3)
    assert planned(list(three.candidates)) == [(c, 0) for c in commits[:4]]
    assert {c.reason for c in three.candidates} == {"kept-three: beyond the last 3 commits of latest"}
    assert commits[6] in three.tagged_commit_ids
    assert not set(commits[:6]) & set(three.tagged_commit_ids)
    # what keep_last keeps is said too: the org's own untagged rule must not delete it either
    assert set(three.kept_commit_ids) == set(commits[4:])

    assert (await http.post("/api/v1/repositories", json={"name": "pins"})).status_code == 201
    await new_tag(http, "pins", "pin", commits[1])
    assert (await http.post("/api/v1/commit_tags", json={"tag_name": "pinned", "commit_id": commits[2]})).status_code == 201
    pinned = await plan(keep_last=3)
    assert planned(list(pinned.candidates)) == [(commits[0], 0), (commits[3], 0)]
    assert {commits[1], commits[2], commits[6]} <= set(pinned.tagged_commit_ids)
    # a keep rule wins over the untagged rule: the last three stay at any age
    untagged = await plan(keep_last=3, untagged_older_than_days=30)
    assert planned(list(untagged.candidates)) == [(commits[0], 0), (commits[3], 0)]
    only_untagged = await plan(untagged_older_than_days=30)
    assert planned(list(only_untagged.candidates)) == [(commits[0], 30), (commits[3], 30), (commits[4], 30), (commits[5], 30)]
    assert planned(list((await plan(keep_last=3, keep_tags=["lat*"])).candidates)) == []
    assert planned(list((await plan()).candidates)) == []
    assert list((await plan(other_org, keep_last=1)).candidates) == [], "another org's plan sees none of this history"

"""The gateway's own behaviour: transcoding, error bodies, limits, OpenAPI, health."""

from __future__ import annotations

import pytest

from services.gateway.bindings import all_bindings
from services.gateway.openapi import openapi_document
from tests.conftest import Org, Platform

pytestmark = pytest.mark.vm


async def test_whoami(platform: Platform, org: Org) -> None:
    async with platform.client(org) as http:
        answer = await http.get("/api/v1/whoami")
    assert answer.status_code == 200
    body = answer.json()
    assert body["org"]["id"] == org.id
    assert body["org"]["name"] == org.name
    assert body["org"]["created_at"].endswith("Z")
    assert set(body["api_key"]) >= {"id", "label", "created_at", "expires_at"}
    assert body["api_key"]["label"] == "default"
    assert body["api_key"]["expires_at"] is None


async def test_validate_key_needs_no_token(platform: Platform, org: Org) -> None:
    async with platform.client() as http:
        good = await http.post("/api/v1/keys/validate", json={"api_key": org.key})
        bad = await http.post("/api/v1/keys/validate", json={"api_key": "vers_nope"})
        empty = await http.post("/api/v1/keys/validate")
    assert good.json() == {"valid": True, "message": f"valid API key of organization '{org.name}'"}
    assert bad.json()["valid"] is False
    assert empty.json()["valid"] is False
    async with platform.client(org) as http:
        assert (await http.post("/api/v1/keys/validate")).json()["valid"] is True


async def test_admin_paths_refuse_an_org_key(platform: Platform, org: Org) -> None:
    async with platform.client(org) as http:
        create = await http.post("/api/v1/admin/orgs", json={"name": "sneaky"})
        listing = await http.get("/api/v1/admin/orgs")
    assert create.status_code == listing.status_code == 403
    assert create.json()["code"] == "PERMISSION_DENIED"
    async with platform.client(Authorization=f"Bearer {platform.admin_key}") as http:
        names = [o["name"] for o in (await http.get("/api/v1/admin/orgs")).json()["orgs"]]
    assert "sneaky" not in names
    assert "vers" in names and org.name in names


async def test_duplicate_org_is_409(platform: Platform, org: Org) -> None:
    async with platform.client(Authorization=f"Bearer {platform.admin_key}") as http:
        answer = await http.post("/api/v1/admin/orgs", json={"name": org.name})
    assert answer.status_code == 409


async def test_malformed_json_is_400(platform: Platform, org: Org) -> None:
    async with platform.client(org) as http:
        answer = await http.post("/api/v1/repositories", content=b"{not json", headers={"content-type": "application/json"})
    assert answer.status_code == 400
    assert answer.json()["code"] == "INVALID_ARGUMENT"
    assert "not valid JSON" in answer.json()["error"]


async def test_body_must_be_an_object(platform: Platform, org: Org) -> None:
    async with platform.client(org) as http:
        answer = await http.post("/api/v1/repositories", json=["my-app"])
    assert answer.status_code == 400
    assert "JSON object with fields: name, description" in answer.json()["error"]


async def test_unknown_body_field_is_400_naming_it(platform: Platform, org: Org) -> None:
    async with platform.client(org) as http:
        answer = await http.post("/api/v1/repositories", json={"name": "my-app", "visibility": "public"})
        listed = (await http.get("/api/v1/repositories")).json()["repositories"]
    assert answer.status_code == 400
    assert "visibility" in answer.json()["error"]
    assert listed == []


async def test_unknown_query_parameter_is_400(platform: Platform, org: Org) -> None:
    async with platform.client(org) as http:
        answer = await http.get("/api/v1/repositories", params={"page": "2"})
    assert answer.status_code == 400
    assert "unknown query parameter 'page'" in answer.json()["error"]


async def test_path_variable_cannot_be_overridden_by_body(platform: Platform, org: Org) -> None:
    async with platform.client(org) as http:
        await http.post("/api/v1/repositories", json={"name": "mine"})
        answer = await http.patch("/api/v1/repositories/mine/visibility", json={"repo_name": "other", "is_public": True})
    assert answer.status_code == 400
    assert "repo_name comes from the URL path" in answer.json()["error"]


async def test_body_size_limit_is_413(platform: Platform, org: Org) -> None:
    big = "x" * (platform.settings.http_max_body_bytes + 1)
    async with platform.client(org) as http:
        answer = await http.post("/api/v1/repositories", json={"name": "big", "description": big})
        listed = (await http.get("/api/v1/repositories")).json()["repositories"]
    assert answer.status_code == 413
    assert answer.json()["code"] == "RESOURCE_EXHAUSTED"
    assert listed == []


async def test_unknown_route_and_method_answer_json(platform: Platform, org: Org) -> None:
    async with platform.client(org) as http:
        missing = await http.get("/api/v1/nothing-here")
        wrong_method = await http.put("/api/v1/repositories")
    assert missing.status_code == 404
    assert missing.json()["error"] == "no such endpoint: GET /api/v1/nothing-here"
    assert wrong_method.status_code == 405
    assert wrong_method.json()["success"] is False


async def test_literal_path_beats_variable(platform: Platform, org: Org) -> None:
    """POST /repositories/fork is the fork RPC; GET /repositories/fork is a repository named fork."""
    async with platform.client(org) as http:
        await http.post("/api/v1/repositories", json={"name": "fork"})
        got = await http.get("/api/v1/repositories/fork")
        forked = await http.post("/api/v1/repositories/fork", json={"source_org": "x", "source_repo": "y", "source_tag": "z"})
    assert got.json()["name"] == "fork"
    assert forked.json()["error"] == "public repository 'x/y' not found"


async def test_streaming_route_says_to_use_a_websocket(platform: Platform, org: Org) -> None:
    async with platform.client(org) as http:
        answer = await http.get("/api/v1/vm/00000000-0000-0000-0000-000000000000/console")
    assert answer.status_code == 426
    assert answer.json()["code"] == "FAILED_PRECONDITION"
    assert "WebSocket" in answer.json()["error"]


async def test_openapi_document_lists_every_route(platform: Platform) -> None:
    async with platform.client() as http:
        document = (await http.get("/openapi.json")).json()
    assert document["openapi"].startswith("3.")
    for binding in all_bindings():
        if not binding.streaming:
            assert binding.verb.lower() in document["paths"][binding.path], binding.path
    create = document["paths"]["/api/v1/repositories"]["post"]
    assert "201" in create["responses"]
    body_ref = create["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    assert set(document["components"]["schemas"][body_ref]["properties"]) == {"name", "description", "immutable_tags", "retention"}
    assert document["paths"]["/api/v1/keys/validate"]["post"]["security"] == []
    listing = document["paths"]["/api/v1/vm"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert listing["type"] == "array"


async def test_healthz_reports_every_service(platform: Platform) -> None:
    async with platform.client() as http:
        answer = await http.get("/healthz")
    assert answer.json() == {"status": "ok", "services": {"registry": "SERVING", "tagging": "SERVING", "orchestrator": "SERVING"}}


@pytest.mark.parametrize("value", ["yes", "1", "true", "TRUE"])
async def test_boolean_query_values(platform: Platform, org: Org, value: str) -> None:
    """Query booleans are parsed before the call reaches the service, which then judges the body."""
    async with platform.client(org) as http:
        answer = await http.post(f"/api/v1/vm/new_root?wait_boot={value}", json={"vm_config": {"vcpu_count": 99}})
    assert answer.status_code == 400
    assert "vcpu_count" in answer.json()["error"]


async def test_bad_boolean_query_value_is_400(platform: Platform, org: Org) -> None:
    async with platform.client(org) as http:
        answer = await http.post("/api/v1/vm/new_root?wait_boot=perhaps", json={})
    assert answer.status_code == 400
    assert "wait_boot" in answer.json()["error"]


@pytest.mark.parametrize(
    ("verb", "path", "field"),
    [
        ("PATCH", "/api/v1/vm/00000000-0000-0000-0000-000000000000/label", "labels"),
        ("PUT", "/api/v1/vm/00000000-0000-0000-0000-000000000000/labels", "labels"),
        ("PATCH", "/api/v1/commits/00000000-0000-0000-0000-000000000000", "is_public"),
        ("PUT", "/api/v1/env_vars", "vars"),
    ],
)
async def test_a_body_without_a_required_field_is_400(platform: Platform, org: Org, verb: str, path: str, field: str) -> None:
    """A body that leaves out a field marked REQUIRED is a mistake, not a request for its empty value (a PUT
    of labels without `labels` must not clear them): refused before any service sees it, body or none."""
    async with platform.client(org) as http:
        for content in (b"{}", b""):
            answer = await http.request(verb, path, content=content, headers={"Content-Type": "application/json"})
            assert answer.status_code == 400, answer.text
            assert field in answer.json()["error"] and "required" in answer.json()["error"]


async def test_a_required_field_may_come_by_its_json_name(platform: Platform, org: Org) -> None:
    async with platform.client(org) as http:
        answer = await http.patch("/api/v1/commits/00000000-0000-0000-0000-000000000000", json={"isPublic": True})
    assert answer.status_code == 404, answer.text  # past the gateway's check: the service found no such commit


def test_a_path_variable_leaves_out_what_a_literal_route_answers() -> None:
    """GET /commits/public is its own route, not GET /commits/{commit_id} with "public": the document says so."""
    document = openapi_document(all_bindings())
    [commit_id] = document["paths"]["/api/v1/commits/{commit_id}"]["get"]["parameters"]
    assert commit_id["schema"]["not"] == {"enum": ["public"]}

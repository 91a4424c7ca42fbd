"""Every documented repository path, through real HTTP against the real services."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import Org, Platform

pytestmark = pytest.mark.both_backends

INVALID_NAMES = ["", "x" * 65, "a/b", "a:b", "my app", " lead", "trail ", "héllo", "名前", "a\nb", "tab\tname", ".", "..", "..."]
VALID_NAMES = ["x" * 64, "a", "v1.2.3", "my_app", "my-app", "My.App_2-x", ".a", "a..", "_", "-"]


async def create(platform: Platform, org: Org, name: str, **extra: object):  # type: ignore[no-untyped-def]
    async with platform.client(org) as http:
        return await http.post("/api/v1/repositories", json={"name": name, **extra})


async def test_create_answers_201_with_id_and_name(platform: Platform, org: Org) -> None:
    answer = await create(platform, org, "my-app", description="trunk builds")
    assert answer.status_code == 201
    body = answer.json()
    assert body["name"] == "my-app"
    assert len(body["repo_id"]) == 36


async def test_get_list_and_defaults(platform: Platform, org: Org) -> None:
    created = (await create(platform, org, "my-app", description="trunk builds")).json()
    await create(platform, org, "internal-tools")
    async with platform.client(org) as http:
        got = await http.get("/api/v1/repositories/my-app")
        listed = await http.get("/api/v1/repositories")
    assert got.status_code == 200
    repo = got.json()
    assert set(repo) == {"repo_id", "name", "description", "is_public", "created_at", "immutable_tags", "retention"}
    assert repo == {**repo, "repo_id": created["repo_id"], "name": "my-app", "description": "trunk builds", "is_public": False}
    assert repo["created_at"].endswith("Z")
    assert [r["name"] for r in listed.json()["repositories"]] == ["internal-tools", "my-app"]


async def test_duplicate_name_is_409_and_keeps_the_first(platform: Platform, org: Org) -> None:
    first = (await create(platform, org, "my-app", description="first")).json()
    again = await create(platform, org, "my-app", description="second")
    assert again.status_code == 409
    assert again.json() == {
        "error": "repository 'my-app' already exists in your organization",
        "success": False,
        "code": "ALREADY_EXISTS",
    }
    async with platform.client(org) as http:
        repo = (await http.get("/api/v1/repositories/my-app")).json()
    assert (repo["repo_id"], repo["description"]) == (first["repo_id"], "first")


async def test_same_name_in_two_orgs(platform: Platform, org: Org, other_org: Org) -> None:
    a = await create(platform, org, "my-app")
    b = await create(platform, other_org, "my-app")
    assert a.status_code == b.status_code == 201
    assert a.json()["repo_id"] != b.json()["repo_id"]


@pytest.mark.parametrize("name", INVALID_NAMES)
async def test_invalid_names_are_400_naming_the_rule(platform: Platform, org: Org, name: str) -> None:
    answer = await create(platform, org, name)
    assert answer.status_code == 400
    body = answer.json()
    assert body["code"] == "INVALID_ARGUMENT"
    assert body["success"] is False
    assert "1-64 characters of A-Z, a-z, 0-9, '.', '_' and '-'" in body["error"]
    async with platform.client(org) as http:
        assert (await http.get("/api/v1/repositories")).json()["repositories"] == []


@pytest.mark.parametrize("name", VALID_NAMES)
async def test_valid_edge_case_names(platform: Platform, org: Org, name: str) -> None:
    answer = await create(platform, org, name)
    assert answer.status_code == 201, answer.text
    async with platform.client(org) as http:
        assert (await http.get(f"/api/v1/repositories/{name}")).json()["name"] == name


async def test_delete_is_204_then_404(platform: Platform, org: Org) -> None:
    await create(platform, org, "scratch")
    async with platform.client(org) as http:
        deleted = await http.delete("/api/v1/repositories/scratch")
        assert deleted.status_code == 204
        assert deleted.content == b""
        assert (await http.get("/api/v1/repositories/scratch")).status_code == 404
        assert (await http.delete("/api/v1/repositories/scratch")).status_code == 404
    recreated = await create(platform, org, "scratch")
    assert recreated.status_code == 201


async def test_visibility_toggle(platform: Platform, org: Org) -> None:
    await create(platform, org, "public-demo")
    async with platform.client(org) as http:
        made_public = await http.patch("/api/v1/repositories/public-demo/visibility", json={"is_public": True})
        assert made_public.status_code == 200
        assert made_public.json()["is_public"] is True
        assert (await http.get("/api/v1/repositories/public-demo")).json()["is_public"] is True
        made_private = await http.patch("/api/v1/repositories/public-demo/visibility", json={"is_public": False})
        assert made_private.json()["is_public"] is False


async def test_visibility_rejects_a_non_boolean(platform: Platform, org: Org) -> None:
    await create(platform, org, "my-app")
    async with platform.client(org) as http:
        answer = await http.patch("/api/v1/repositories/my-app/visibility", json={"is_public": "maybe"})
    assert answer.status_code == 400
    assert "is_public" in answer.json()["error"]


async def test_public_discovery(platform: Platform, org: Org, other_org: Org) -> None:
    await create(platform, org, "public-demo", description="try me")
    await create(platform, org, "secret")
    async with platform.client(org) as http:
        await http.patch("/api/v1/repositories/public-demo/visibility", json={"is_public": True})
    async with platform.client(other_org) as http:
        listed = (await http.get("/api/v1/public/repositories")).json()["repositories"]
        mine = [r for r in listed if r["org_name"] == org.name]
        assert [r["name"] for r in mine] == ["public-demo"]
        one = await http.get(f"/api/v1/public/repositories/{org.name}/public-demo")
        assert one.status_code == 200
        body = one.json()
        assert set(body) == {"repo_id", "name", "org_name", "full_name", "description", "created_at"}
        assert body["full_name"] == f"{org.name}/public-demo"
        assert body["description"] == "try me"
        private = await http.get(f"/api/v1/public/repositories/{org.name}/secret")
        missing = await http.get(f"/api/v1/public/repositories/{org.name}/no-such-repo")
    assert private.status_code == missing.status_code == 404
    assert private.json()["error"].replace("secret", "X") == missing.json()["error"].replace("no-such-repo", "X")


async def test_unpublished_repository_leaves_public_listing(platform: Platform, org: Org, other_org: Org) -> None:
    await create(platform, org, "flip")
    async with platform.client(org) as http:
        await http.patch("/api/v1/repositories/flip/visibility", json={"is_public": True})
        await http.patch("/api/v1/repositories/flip/visibility", json={"is_public": False})
    async with platform.client(other_org) as http:
        listed = (await http.get("/api/v1/public/repositories")).json()["repositories"]
        assert f"{org.name}/flip" not in {r["full_name"] for r in listed}
        assert (await http.get(f"/api/v1/public/repositories/{org.name}/flip")).status_code == 404


async def test_other_org_cannot_touch_a_private_repository(platform: Platform, org: Org, other_org: Org) -> None:
    await create(platform, org, "private-app")
    async with platform.client(other_org) as http:
        assert (await http.get("/api/v1/repositories/private-app")).status_code == 404
        assert (await http.delete("/api/v1/repositories/private-app")).status_code == 404
        flip = await http.patch("/api/v1/repositories/private-app/visibility", json={"is_public": True})
        assert flip.status_code == 404
        assert "private-app" not in [r["name"] for r in (await http.get("/api/v1/repositories")).json()["repositories"]]
        public = await http.get(f"/api/v1/public/repositories/{org.name}/private-app")
        assert public.status_code == 404
    async with platform.client(org) as http:
        repo = (await http.get("/api/v1/repositories/private-app")).json()
    assert repo["is_public"] is False


async def test_public_repository_is_still_owned_by_its_org(platform: Platform, org: Org, other_org: Org) -> None:
    await create(platform, org, "shared")
    async with platform.client(org) as http:
        await http.patch("/api/v1/repositories/shared/visibility", json={"is_public": True})
    async with platform.client(other_org) as http:
        assert (await http.get(f"/api/v1/public/repositories/{org.name}/shared")).status_code == 200
        assert (await http.get("/api/v1/repositories/shared")).status_code == 404
        assert (await http.delete("/api/v1/repositories/shared")).status_code == 404
        assert (await http.patch("/api/v1/repositories/shared/visibility", json={"is_public": False})).status_code == 404
    async with platform.client(org) as http:
        assert (await http.get("/api/v1/repositories/shared")).json()["is_public"] is True


REPOSITORY_CALLS = [
    ("GET", "/api/v1/repositories", None),
    ("POST", "/api/v1/repositories", {"name": "x"}),
    ("GET", "/api/v1/repositories/x", None),
    ("DELETE", "/api/v1/repositories/x", None),
    ("PATCH", "/api/v1/repositories/x/visibility", {"is_public": True}),
    ("GET", "/api/v1/public/repositories", None),
    ("GET", "/api/v1/public/repositories/vers/x", None),
]


@pytest.mark.parametrize(("method", "path", "body"), REPOSITORY_CALLS)
async def test_no_token_is_401(platform: Platform, method: str, path: str, body: object) -> None:
    async with platform.client() as http:
        answer = await http.request(method, path, json=body)
    assert answer.status_code == 401
    assert answer.json()["code"] == "UNAUTHENTICATED"
    assert "Authorization: Bearer" in answer.json()["error"]


@pytest.mark.parametrize(("method", "path", "body"), REPOSITORY_CALLS)
@pytest.mark.parametrize("header", ["Bearer vers_not-a-real-key", "Bearer", "Basic dXNlcjpwYXNz", "vers_abc"])
async def test_wrong_token_is_401(platform: Platform, method: str, path: str, body: object, header: str) -> None:
    async with platform.client(Authorization=header) as http:
        answer = await http.request(method, path, json=body)
    assert answer.status_code == 401
    assert answer.json()["code"] == "UNAUTHENTICATED"


async def test_revoked_key_stops_working(platform: Platform, org: Org) -> None:
    async with platform.client(org) as http:
        created = await http.post("/api/v1/keys", json={"label": "ci"})
        assert created.status_code == 201
        new = created.json()
    async with platform.client(Authorization=f"Bearer {new['token']}") as http:
        assert (await http.get("/api/v1/repositories")).status_code == 200
    async with platform.client(org) as http:
        labels = [k["label"] for k in (await http.get("/api/v1/keys")).json()["api_keys"]]
        assert labels == ["default", "ci"]
        assert (await http.delete(f"/api/v1/keys/{new['api_key']['id']}")).status_code == 204
    await asyncio.sleep(platform.settings.auth_cache_seconds + 0.1)
    async with platform.client(Authorization=f"Bearer {new['token']}") as http:
        assert (await http.get("/api/v1/repositories")).status_code == 401

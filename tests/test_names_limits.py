"""Names that are only dots, free-text limits, pages of every list, and the CLI's encoded paths."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from services import client as cli_client
from services.common.errors import InvalidArgument, InvalidName
from services.common.names import validate_repo_name, validate_tag_name
from services.common.paging import MAX_PAGE_SIZE, Page
from tests.conftest import ROOT, Org, Platform

pytestmark = pytest.mark.both_backends

DOTS = [".", "..", "..."]


@pytest.mark.parametrize("name", DOTS)
def test_names_of_only_dots_are_invalid(name: str) -> None:
    for validate in (validate_repo_name, validate_tag_name):
        with pytest.raises(InvalidName, match="only dots"):
            validate(name)
    assert validate_repo_name(".hidden") == ".hidden" and validate_tag_name("v1..2") == "v1..2"


def test_page_tokens_are_bound_to_their_list() -> None:
    first = Page.of("repositories:a", 2, "")
    rows, token = first.cut([1, 2, 3])
    assert rows == [1, 2] and token
    assert Page.of("repositories:a", 2, token).offset == 2
    for scope, bad in (("repositories:b", token), ("repositories:a", "not-a-token"), ("repositories:a", "eyJvIjotMX0")):
        with pytest.raises(InvalidArgument):
            Page.of(scope, 2, bad)
    with pytest.raises(InvalidArgument, match=str(MAX_PAGE_SIZE)):
        Page.of("x", MAX_PAGE_SIZE + 1, "")
    assert Page.of("x", 0, "").size == 100
    assert Page.of("x", 2, "").cut([1, 2]) == ([1, 2], "")


async def test_api_refuses_dot_names_with_400(platform: Platform, org: Org) -> None:
    async with platform.client(org) as http:
        assert (await http.post("/api/v1/repositories", json={"name": "app"})).status_code == 201
        for name in DOTS:
            answer = await http.post("/api/v1/repositories", json={"name": name})
            assert (answer.status_code, answer.json()["code"]) == (400, "INVALID_ARGUMENT"), answer.text
            assert "only dots" in answer.json()["error"]
            encoded = name.replace(".", "%2E")
            for path in (f"/api/v1/repositories/{encoded}", f"/api/v1/repositories/app/tags/{encoded}"):
                assert (await http.get(path)).status_code == 400, path
                assert (await http.delete(path)).status_code == 400, path
            tagged = await http.post("/api/v1/repositories/app/tags", json={"tag_name": name, "commit_id": "c"})
            assert tagged.status_code == 400, tagged.text
        listed = (await http.get("/api/v1/repositories")).json()["repositories"]
        assert [repo["name"] for repo in listed] == ["app"]


@pytest.mark.parametrize(
    ("method", "path", "body", "field", "limit"),
    [
        ("POST", "/api/v1/repositories", {"name": "long", "description": "é" * 2049}, "description", "4096 bytes"),
        ("POST", "/api/v1/keys", {"label": "k" * 129}, "label", "128 characters"),
        ("POST", "/api/v1/repositories/any/tags", {"tag_name": "t", "commit_id": "c", "description": "d" * 4097}, "description", "4096"),
        ("PATCH", "/api/v1/repositories/any/tags/t", {"description": "d" * 4097}, "description", "4096"),
        ("POST", "/api/v1/commit_tags", {"tag_name": "t", "commit_id": "c", "description": "d" * 4097}, "description", "4096"),
        ("PATCH", "/api/v1/commit_tags/t", {"description": "d" * 4097}, "description", "4096"),
        ("POST", "/api/v1/vm/00000000-0000-0000-0000-000000000000/commit", {"name": "n" * 257}, "name", "256 characters"),
        ("POST", "/api/v1/vm/00000000-0000-0000-0000-000000000000/commit", {"description": "d" * 65537}, "description", "65536"),
        ("POST", "/api/v1/vm/new_root", {"vm_config": {"labels": {"k": "v" * 1025}}}, "label 'k'", "1024"),
        ("POST", "/api/v1/vm/new_root", {"vm_config": {"labels": {f"k{i}": "" for i in range(65)}}}, "labels", "64"),
    ],
)
async def test_free_text_over_its_limit_is_400_naming_field_and_limit(
    platform: Platform, org: Org, method: str, path: str, body: dict[str, object], field: str, limit: str
) -> None:
    async with platform.client(org) as http:
        answer = await http.request(method, path, json=body)
        assert (answer.status_code, answer.json()["code"]) == (400, "INVALID_ARGUMENT"), answer.text
        assert field in answer.json()["error"] and limit in answer.json()["error"], answer.json()["error"]
        assert (await http.get("/api/v1/repositories")).json()["repositories"] == []


async def test_two_huge_public_descriptions_cannot_exist(platform: Platform, org: Org) -> None:
    async with platform.client(org) as http:
        for name in ("huge-1", "huge-2"):
            answer = await http.post("/api/v1/repositories", json={"name": name, "description": "x" * 3 * 1024 * 1024})
            assert answer.status_code == 400, answer.text


async def test_lists_are_paged(platform: Platform, org: Org) -> None:
    names = [f"paged-{i}" for i in range(5)]
    async with platform.client(org) as http:
        for name in names:
            assert (await http.post("/api/v1/repositories", json={"name": name})).status_code == 201
        seen, token, pages = [], "", 0
        while True:
            answer = (await http.get("/api/v1/repositories", params={"page_size": 2, "page_token": token})).json()
            seen += [repo["name"] for repo in answer["repositories"]]
            pages += 1
            token = answer["next_page_token"]
            if not token:
                break
        assert (seen, pages) == (names, 3)
        everything = (await http.get("/api/v1/repositories")).json()
        assert [repo["name"] for repo in everything["repositories"]] == names and everything["next_page_token"] == ""
        for params in ({"page_token": "garbage"}, {"page_size": MAX_PAGE_SIZE + 1}, {"page_size": -1}):
            bad = await http.get("/api/v1/repositories", params=params)
            assert (bad.status_code, bad.json()["code"]) == (400, "INVALID_ARGUMENT"), bad.text
        # A token of one list is refused by another.
        first = (await http.get("/api/v1/repositories", params={"page_size": 1})).json()["next_page_token"]
        other = await http.get("/api/v1/commit_tags", params={"page_token": first})
        assert other.status_code == 400
        # The public listing is bounded by its page size too.
        for name in names[:3]:
            assert (await http.patch(f"/api/v1/repositories/{name}/visibility", json={"is_public": True})).status_code == 200
        public = (await http.get("/api/v1/public/repositories", params={"page_size": 1})).json()
        assert len(public["repositories"]) == 1 and public["next_page_token"]
        keys = (await http.get("/api/v1/keys", params={"page_size": 1})).json()
        assert len(keys["api_keys"]) == 1
        for path in ("/api/v1/vm", "/api/v1/domains", "/api/v1/commit_tags"):
            assert (await http.get(path, params={"page_size": 1})).status_code == 200, path
            assert (await http.get(path, params={"page_token": "garbage"})).status_code == 400, path
    async with platform.client(Authorization=f"Bearer {platform.admin_key}") as admin:
        orgs = (await admin.get("/api/v1/admin/orgs", params={"page_size": 1})).json()
        assert len(orgs["orgs"]) == 1 and orgs["next_page_token"]


async def test_cli_client_follows_next_page_token(platform: Platform, org: Org, monkeypatch: pytest.MonkeyPatch) -> None:
    async with platform.client(org) as http:
        for i in range(5):
            assert (await http.post("/api/v1/repositories", json={"name": f"cli-{i}"})).status_code == 201
    monkeypatch.setattr(cli_client, "PAGE_SIZE", 2)

    def list_all() -> list[str]:
        api = cli_client.ApiClient(platform.url, org.key)
        try:
            return [repo["name"] for repo in api.list_all("/api/v1/repositories", "repositories")["repositories"]]
        finally:
            api.close()

    assert await asyncio.to_thread(list_all) == [f"cli-{i}" for i in range(5)]


def test_cli_encodes_every_path_parameter() -> None:
    assert cli_client.seg("a/b?c#d") == "a%2Fb%3Fc%23d"
    assert cli_client.seg("..") == "%2E%2E" and cli_client.seg(".") == "%2E"
    assert cli_client.seg("v1.2") == "v1.2"


async def vers(platform: Platform, org: Org, home: Path, *args: str) -> tuple[int, str]:
    env = {**os.environ, "HOME": str(home), "VERS_URL": platform.url, "VERS_API_KEY": org.key,
           "VERS_DATA_DIR": str(platform.settings.data_dir)}  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli.main", *args, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await process.communicate()
    return process.returncode or 0, output.decode()


async def test_cli_with_dot_names_addresses_no_other_route(platform: Platform, org: Org, tmp_path: Path) -> None:
    async with platform.client(org) as http:
        assert (await http.post("/api/v1/repositories", json={"name": "app"})).status_code == 201
    for args in (("repo", "tag", "delete", "app", "."), ("repo", "tag", "delete", "app", ".."), ("repo", "delete", ".."),
                 ("repo", "delete", "."), ("repo", "tag", "list", "..")):  # fmt: skip
        code, output = await vers(platform, org, tmp_path, *args)
        assert code == 1, output
        assert "HTTP 400" in output or "HTTP 404" in output, output
    async with platform.client(org) as http:
        assert (await http.get("/api/v1/repositories/app")).status_code == 200

"""The official Vers Python SDK, unchanged, against our gateway."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from vers_sdk import AuthenticationError, BadRequestError, ConflictError, NotFoundError, VersSdkClient

from tests.conftest import Org, Platform


@pytest_asyncio.fixture
async def sdk(platform: Platform, org: Org) -> AsyncIterator[VersSdkClient]:
    async with VersSdkClient(base_url=platform.url, api_key=org.key, max_retries=0) as client:
        yield client


async def test_repository_lifecycle(sdk: VersSdkClient) -> None:
    created = await sdk.create_repository({"name": "my-app", "description": "dev image"})
    assert created["name"] == "my-app"
    listed = await sdk.list_repositories()
    assert [r["name"] for r in listed["repositories"]] == ["my-app"]
    got = await sdk.get_repository("my-app")
    assert got["repo_id"] == created["repo_id"]
    assert got["description"] == "dev image"
    assert got["is_public"] is False
    visible = await sdk.set_repository_visibility("my-app", {"is_public": True})
    assert visible["is_public"] is True
    await sdk.delete_repository("my-app")
    with pytest.raises(NotFoundError) as missing:
        await sdk.get_repository("my-app")
    assert "my-app" in missing.value.error_message


async def test_errors_map_to_sdk_exceptions(platform: Platform, sdk: VersSdkClient) -> None:
    await sdk.create_repository({"name": "dup"})
    with pytest.raises(ConflictError):
        await sdk.create_repository({"name": "dup"})
    with pytest.raises(BadRequestError) as invalid:
        await sdk.create_repository({"name": "a:b"})
    assert "1-64 characters" in invalid.value.error_message
    async with VersSdkClient(base_url=platform.url, api_key="vers_wrong", max_retries=0) as stranger:
        with pytest.raises(AuthenticationError):
            await stranger.list_repositories()


async def test_public_discovery_from_another_org(platform: Platform, org: Org, other_org: Org, sdk: VersSdkClient) -> None:
    await sdk.create_repository({"name": "public-demo"})
    await sdk.set_repository_visibility("public-demo", {"is_public": True})
    async with VersSdkClient(base_url=platform.url, api_key=other_org.key, max_retries=0) as other:
        listed = await other.list_public_repositories()
        assert f"{org.name}/public-demo" in [r["full_name"] for r in listed["repositories"]]
        got = await other.get_public_repository(org.name, "public-demo")
        assert got["org_name"] == org.name
        with pytest.raises(NotFoundError):
            await other.get_repository("public-demo")


async def test_identity(org: Org, sdk: VersSdkClient) -> None:
    me = await sdk.whoami_handler()
    assert (me["org"]["id"], me["org"]["name"]) == (org.id, org.name)
    assert (await sdk.validate_key({"api_key": org.key}))["valid"] is True

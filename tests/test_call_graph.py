"""The calls one request makes between the services, counted where each call arrives (the services' own
interceptor), as docs/ARCHITECTURE.md draws them: a fork is three calls from the registry, none of which
calls back into the registry or into another callee; a tag create and a branch by reference ask each peer
once. A service checking a person's key asks the registry's Authenticate (trusted a few seconds after), so
those token checks are counted apart: only the fork, all of whose calls carry the service credential with
the org's name and limits signed in, makes none."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import pytest_asyncio

from services.common.interceptor import ServiceInterceptor
from tests.conftest import Org, Platform

pytestmark = pytest.mark.usefixtures("images")  # VMs: a commit to tag, fork and branch

AUTHENTICATE = "registry.v1.RegistryService/Authenticate"


@contextmanager
def arriving_calls() -> Iterator[list[str]]:
    """Every call to a Vers service while the block runs, in the order they arrive (`tagging.v1.X/Y`)."""
    calls: list[str] = []
    original = ServiceInterceptor.intercept_service

    async def recording(self: ServiceInterceptor, continuation: Any, details: Any) -> Any:
        if details.method.startswith("/vers."):
            calls.append(details.method.removeprefix("/vers."))
        return await original(self, continuation, details)

    ServiceInterceptor.intercept_service = recording  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        ServiceInterceptor.intercept_service = original  # type: ignore[method-assign]


def without_token_checks(calls: list[str]) -> list[str]:
    return [call for call in calls if call != AUTHENTICATE]


@pytest_asyncio.fixture(scope="module")
async def published(platform: Platform) -> AsyncIterator[tuple[Org, str]]:
    """An org with a commit and a public repository `base`, not yet tagged."""
    org = await platform.new_org("graph")
    async with platform.client(org) as http:
        answer = await http.post("/api/v1/vm/new_root?wait_boot=true", json={"vm_config": {"mem_size_mib": 128}})
        assert answer.status_code == 201, answer.text
        vm = answer.json()["vm_id"]
        commit = (await http.post(f"/api/v1/vm/{vm}/commit", json={})).json()["commit_id"]
        await http.delete(f"/api/v1/vm/{vm}")
        assert (await http.post("/api/v1/repositories", json={"name": "base"})).status_code == 201
        assert (await http.patch("/api/v1/repositories/base/visibility", json={"is_public": True})).status_code == 200
    yield org, commit


async def test_tag_create_fork_and_branch_by_ref_make_the_documented_calls(
    platform: Platform, published: tuple[Org, str], other_org: Org
) -> None:
    publisher, commit = published
    async with platform.client(publisher) as http:
        with arriving_calls() as calls:
            answer = await http.post("/api/v1/repositories/base/tags", json={"tag_name": "latest", "commit_id": commit})
        assert answer.status_code == 201, answer.text
    # tagging asks the registry for the repository and the orchestrator whether the org owns the commit
    assert without_token_checks(calls) == [
        "tagging.v1.TaggingService/CreateRepositoryTag",
        "registry.v1.RegistryService/GetRepository",
        "orchestrator.v1.OrchestratorService/GetCommit",
    ]
    assert calls.count(AUTHENTICATE) <= 2  # the publisher's key, checked by tagging and the orchestrator

    async with platform.client(other_org) as http:
        body = {"source_org": publisher.name, "source_repo": "base", "source_tag": "latest"}
        with arriving_calls() as calls:
            answer = await http.post("/api/v1/repositories/fork", json=body)
        assert answer.status_code == 201, answer.text
        fork = answer.json()
        # the registry reads both tags in one call, has the orchestrator fork the commit it found, tags the copy
        assert calls == [
            "registry.v1.RegistryService/ForkRepository",
            "tagging.v1.TaggingInternalService/LookupTags",
            "orchestrator.v1.OrchestratorInternalService/ForkCommit",
            "tagging.v1.TaggingInternalService/AddRepositoryTag",
        ]

        with arriving_calls() as calls:
            answer = await http.post("/api/v1/vm/branch/by_ref/base/latest")
        assert answer.status_code == 201, answer.text
        assert without_token_checks(calls) == [
            "orchestrator.v1.OrchestratorService/BranchByRef",
            "tagging.v1.TaggingInternalService/ResolveReference",
            "registry.v1.RegistryService/GetRepository",
        ]
        assert calls.count(AUTHENTICATE) <= 1  # the forker's key, checked by the orchestrator
        for vm in (fork["vm_id"], *(new["vm_id"] for new in answer.json()["vms"])):
            assert (await http.delete(f"/api/v1/vm/{vm}")).status_code == 200

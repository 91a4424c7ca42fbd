"""The services as gRPC clients in any language see them: status codes, health, reflection, auth."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.common.settings import SERVICES
from tests.conftest import Org, Platform
from vers.orchestrator.v1 import orchestrator_pb2
from vers.registry.v1 import registry_pb2 as pb
from vers.registry.v1 import registry_pb2_grpc
from vers.tagging.v1 import tagging_pb2, tagging_pb2_grpc

pytestmark = pytest.mark.both_backends


def channel(platform: Platform, service: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(platform.settings.addr(service))


async def test_repository_calls_over_grpc(platform: Platform, org: Org) -> None:
    async with channel(platform, "registry") as ch:
        stub = registry_pb2_grpc.RegistryServiceStub(ch)
        created = await stub.CreateRepository(pb.CreateRepositoryRequest(name="my-app"), metadata=org.metadata)
        got = await stub.GetRepository(pb.GetRepositoryRequest(repo_name="my-app"), metadata=org.metadata)
        assert got.repository.repo_id == created.repo_id
        with pytest.raises(grpc.aio.AioRpcError) as duplicate:
            await stub.CreateRepository(pb.CreateRepositoryRequest(name="my-app"), metadata=org.metadata)
        assert duplicate.value.code() == grpc.StatusCode.ALREADY_EXISTS


@pytest.mark.parametrize("name", ["", "x" * 65, "a/b", "a:b", "has space", "ünïcode"])
async def test_invalid_names_are_invalid_argument(platform: Platform, org: Org, name: str) -> None:
    async with channel(platform, "registry") as ch:
        stub = registry_pb2_grpc.RegistryServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.CreateRepository(pb.CreateRepositoryRequest(name=name), metadata=org.metadata)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "use 1-64 characters of A-Z, a-z, 0-9, '.', '_' and '-'" in error.value.details()


async def test_other_org_gets_not_found_over_grpc(platform: Platform, org: Org, other_org: Org) -> None:
    async with channel(platform, "registry") as ch:
        stub = registry_pb2_grpc.RegistryServiceStub(ch)
        await stub.CreateRepository(pb.CreateRepositoryRequest(name="private"), metadata=org.metadata)
        for call in (
            stub.GetRepository(pb.GetRepositoryRequest(repo_name="private"), metadata=other_org.metadata),
            stub.DeleteRepository(pb.DeleteRepositoryRequest(repo_name="private"), metadata=other_org.metadata),
            stub.SetRepositoryVisibility(
                pb.SetRepositoryVisibilityRequest(repo_name="private", is_public=True), metadata=other_org.metadata
            ),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await call
            assert error.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("service", SERVICES)
async def test_health_and_reflection(platform: Platform, service: str) -> None:
    async with channel(platform, service) as ch:
        health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stream = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = [s.name async for answer in stream for s in answer.list_services_response.service]
    assert f"vers.{service}.v1.{service.capitalize()}Service" in names
    assert "grpc.health.v1.Health" in names


async def test_peer_service_checks_the_token_through_the_registry(platform: Platform, org: Org) -> None:
    async with channel(platform, "tagging") as ch:
        stub = tagging_pb2_grpc.TaggingServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as anonymous:
            await stub.ListCommitTags(tagging_pb2.ListCommitTagsRequest())
        with pytest.raises(grpc.aio.AioRpcError) as forged:
            await stub.ListCommitTags(tagging_pb2.ListCommitTagsRequest(), metadata=(("authorization", "Bearer vers_x"),))
        known = await stub.ListCommitTags(tagging_pb2.ListCommitTagsRequest(), metadata=org.metadata)
    assert anonymous.value.code() == forged.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert list(known.tags) == []


INTERNAL_METHODS = [
    (service.full_name.split(".")[1], f"/{service.full_name}/{method.name}")
    for module in (pb, tagging_pb2, orchestrator_pb2)
    for service in module.DESCRIPTOR.services_by_name.values()
    if service.name.endswith("InternalService")
    for method in service.methods
]


@pytest.mark.parametrize(("service", "method"), INTERNAL_METHODS, ids=[m for _, m in INTERNAL_METHODS])
async def test_internal_methods_refuse_an_org_key(platform: Platform, org: Org, service: str, method: str) -> None:
    """Calls between the services take the platform's service credential only: an org's key is refused
    before the request is read, and so is a call with no key."""
    async with channel(platform, service) as ch:
        call = ch.unary_unary(method)
        with pytest.raises(grpc.aio.AioRpcError) as with_key:
            await call(b"", metadata=org.metadata)
        with pytest.raises(grpc.aio.AioRpcError) as without_key:
            await call(b"")
    assert with_key.value.code() == grpc.StatusCode.PERMISSION_DENIED, with_key.value.details()
    assert "between the platform's own services" in (with_key.value.details() or "")
    assert without_key.value.code() == grpc.StatusCode.UNAUTHENTICATED

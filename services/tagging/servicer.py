from __future__ import annotations

import grpc

from services.common.audit import service_page
from services.common.auth import caller_metadata, current_principal
from services.common.errors import InvalidArgument, NotFound
from services.common.names import validate_repo_name, validate_tag_name, validate_text
from services.common.paging import Page
from services.common.timestamps import to_timestamp
from services.tagging.models import CommitTagRow, RepoTagRow, TagEventRow
from services.tagging.repositories import RecentRepositories
from services.tagging.store import TaggingStore
from vers.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from vers.registry.v1 import registry_pb2, registry_pb2_grpc
from vers.tagging.v1 import tagging_pb2 as pb
from vers.tagging.v1 import tagging_pb2_grpc


def tag_pb(tag: RepoTagRow) -> pb.RepositoryTag:
    return pb.RepositoryTag(
        tag_id=tag.id,
        tag_name=tag.name,
        commit_id=tag.commit_id,
        reference=f"{tag.repo_name}:{tag.name}",
        description=tag.description,
        created_at=to_timestamp(tag.created_at),
        updated_at=to_timestamp(tag.updated_at),
    )


def commit_tag_pb(tag: CommitTagRow) -> pb.CommitTag:
    return pb.CommitTag(
        tag_id=tag.id,
        tag_name=tag.name,
        commit_id=tag.commit_id,
        description=tag.description,
        created_at=to_timestamp(tag.created_at),
        updated_at=to_timestamp(tag.updated_at),
    )


def event_pb(event: TagEventRow) -> pb.TagEvent:
    return pb.TagEvent(
        action=event.action,
        old_commit_id=event.old_commit_id,
        new_commit_id=event.new_commit_id,
        org_id=event.org_id,
        api_key_id=event.api_key_id,
        created_at=to_timestamp(event.created_at),
    )


def parse_reference(ref: str) -> tuple[str, str]:
    """`repo:tag`, exactly: case-sensitive, no `@latest`, no partial match, no org part."""
    if "/" in ref:
        raise InvalidArgument(
            f"{ref!r} names another organization's repository: org/repo:tag references are only accepted by "
            f"fork and the public API; fork it first (vers repo fork {ref}), then use your own repo:tag"
        )
    repo, colon, tag = ref.partition(":")
    if not colon:
        raise InvalidArgument(f"reference {ref!r} must have the form repo:tag, e.g. my-app:latest")
    return validate_repo_name(repo), validate_tag_name(tag)


async def caller_repository(registry: registry_pb2_grpc.RegistryServiceAsyncStub, repo_name: str) -> registry_pb2.Repository:
    """The repository of the caller's org, as the registry (which owns repositories) answers the caller."""
    answer = await registry.GetRepository(registry_pb2.GetRepositoryRequest(repo_name=repo_name), metadata=caller_metadata())
    return answer.repository


class TaggingServicer(tagging_pb2_grpc.TaggingServiceServicer):
    def __init__(
        self, store: TaggingStore, registry: grpc.aio.Channel, orchestrator: grpc.aio.Channel, repositories: RecentRepositories
    ) -> None:
        self.store = store
        self.registry = registry_pb2_grpc.RegistryServiceStub(registry)
        self.orchestrator = orchestrator_pb2_grpc.OrchestratorServiceStub(orchestrator)
        self.repositories = repositories

    async def _repo(self, repo_name: str) -> registry_pb2.Repository:
        return await caller_repository(self.registry, repo_name)

    async def _repo_to_read(self, repo_name: str) -> registry_pb2.Repository:
        """The repository for a call that only reads its tags: a recent answer of the registry will do."""
        return await self.repositories.get(current_principal().org_id, repo_name, lambda: self._repo(repo_name))

    async def _public_repo(self, org_name: str, repo_name: str) -> registry_pb2.PublicRepository:
        answer = await self.registry.GetPublicRepository(
            registry_pb2.GetPublicRepositoryRequest(org_name=org_name, repo_name=repo_name), metadata=caller_metadata()
        )
        return answer.repository

    async def _own_commit(self, commit_id: str) -> str:
        """The commit, if the caller's org owns it; tagging another org's commit needs a fork first."""
        try:
            await self.orchestrator.GetCommit(orchestrator_pb2.GetCommitRequest(commit_id=commit_id), metadata=caller_metadata())
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise
            raise NotFound(
                f"commit {commit_id!r} not found in your organization: you can only tag commits your organization "
                f"owns; to use a commit from another organization's public repository, fork it first "
                f"(vers repo fork org/repo:tag)"
            ) from None
        return commit_id

    async def CreateRepositoryTag(
        self, request: pb.CreateRepositoryTagRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateRepositoryTagResponse:
        validate_tag_name(request.tag_name)
        validate_text("description", request.description)
        repo = await self._repo(request.repo_name)
        commit_id = await self._own_commit(request.commit_id)
        tag = await self.store.create_tag(current_principal(), repo.repo_id, repo.name, request.tag_name, commit_id, request.description)
        return pb.CreateRepositoryTagResponse(tag_id=tag.id, commit_id=tag.commit_id, reference=f"{repo.name}:{tag.name}")

    async def ListRepositoryTags(
        self, request: pb.ListRepositoryTagsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListRepositoryTagsResponse:
        repo = await self._repo_to_read(request.repo_name)
        page = Page.of(f"tags:{repo.repo_id}", request.page_size, request.page_token)
        tags, token = page.cut(await self.store.list_tags(repo.repo_id, page.offset, page.fetch))
        return pb.ListRepositoryTagsResponse(repository=repo.name, tags=[tag_pb(t) for t in tags], next_page_token=token)

    async def GetRepositoryTag(self, request: pb.GetRepositoryTagRequest, context: grpc.aio.ServicerContext) -> pb.GetRepositoryTagResponse:
        repo = await self._repo_to_read(request.repo_name)
        return pb.GetRepositoryTagResponse(tag=tag_pb(await self.store.get_tag(repo.repo_id, repo.name, request.tag_name)))

    async def UpdateRepositoryTag(
        self, request: pb.UpdateRepositoryTagRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdateRepositoryTagResponse:
        description = validate_text("description", request.description) if request.HasField("description") else None
        repo = await self._repo(request.repo_name)
        commit_id = await self._own_commit(request.commit_id) if request.HasField("commit_id") else None
        tag = await self.store.update_tag(
            current_principal(), repo.repo_id, repo.name, request.tag_name, commit_id, description, repo.immutable_tags
        )
        return pb.UpdateRepositoryTagResponse(tag=tag_pb(tag))

    async def DeleteRepositoryTag(
        self, request: pb.DeleteRepositoryTagRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteRepositoryTagResponse:
        repo = await self._repo(request.repo_name)
        await self.store.delete_tag(current_principal(), repo.repo_id, repo.name, request.tag_name, repo.immutable_tags)
        return pb.DeleteRepositoryTagResponse()

    async def ListRepositoryTagHistory(
        self, request: pb.ListRepositoryTagHistoryRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListRepositoryTagHistoryResponse:
        repo = await self._repo_to_read(request.repo_name)
        validate_tag_name(request.tag_name)
        page = Page.of(f"history:{repo.repo_id}:{request.tag_name}", request.page_size, request.page_token)
        events, token = page.cut(await self.store.history(repo.repo_id, request.tag_name, page.offset, page.fetch))
        if not events and page.offset == 0:
            raise NotFound(f"tag {request.tag_name!r} has no history in repository {repo.name!r}")
        return pb.ListRepositoryTagHistoryResponse(
            reference=f"{repo.name}:{request.tag_name}", events=[event_pb(e) for e in events], next_page_token=token
        )

    async def ListPublicRepositoryTags(
        self, request: pb.ListPublicRepositoryTagsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListPublicRepositoryTagsResponse:
        repo = await self._public_repo(request.org_name, request.repo_name)
        page = Page.of(f"tags:{repo.repo_id}", request.page_size, request.page_token)
        tags, token = page.cut(await self.store.list_tags(repo.repo_id, page.offset, page.fetch))
        return pb.ListPublicRepositoryTagsResponse(repository=repo.full_name, tags=[tag_pb(t) for t in tags], next_page_token=token)

    async def GetPublicRepositoryTag(
        self, request: pb.GetPublicRepositoryTagRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetPublicRepositoryTagResponse:
        repo = await self._public_repo(request.org_name, request.repo_name)
        tag = await self.store.get_tag(repo.repo_id, repo.full_name, request.tag_name)
        return pb.GetPublicRepositoryTagResponse(tag=tag_pb(tag))

    async def CreateCommitTag(self, request: pb.CreateCommitTagRequest, context: grpc.aio.ServicerContext) -> pb.CreateCommitTagResponse:
        validate_tag_name(request.tag_name)
        validate_text("description", request.description)
        commit_id = await self._own_commit(request.commit_id)
        tag = await self.store.create_commit_tag(current_principal().org_id, request.tag_name, commit_id, request.description)
        return pb.CreateCommitTagResponse(tag_id=tag.id, tag_name=tag.name, commit_id=tag.commit_id)

    async def ListCommitTags(self, request: pb.ListCommitTagsRequest, context: grpc.aio.ServicerContext) -> pb.ListCommitTagsResponse:
        org_id = current_principal().org_id
        page = Page.of(f"commit_tags:{org_id}", request.page_size, request.page_token)
        tags, token = page.cut(await self.store.list_commit_tags(org_id, page.offset, page.fetch))
        return pb.ListCommitTagsResponse(tags=[commit_tag_pb(t) for t in tags], next_page_token=token)

    async def GetCommitTag(self, request: pb.GetCommitTagRequest, context: grpc.aio.ServicerContext) -> pb.GetCommitTagResponse:
        return pb.GetCommitTagResponse(tag=commit_tag_pb(await self.store.get_commit_tag(current_principal().org_id, request.tag_name)))

    async def UpdateCommitTag(self, request: pb.UpdateCommitTagRequest, context: grpc.aio.ServicerContext) -> pb.UpdateCommitTagResponse:
        description = validate_text("description", request.description) if request.HasField("description") else None
        commit_id = await self._own_commit(request.commit_id) if request.HasField("commit_id") else None
        tag = await self.store.update_commit_tag(current_principal().org_id, request.tag_name, commit_id, description)
        return pb.UpdateCommitTagResponse(tag=commit_tag_pb(tag))

    async def DeleteCommitTag(self, request: pb.DeleteCommitTagRequest, context: grpc.aio.ServicerContext) -> pb.DeleteCommitTagResponse:
        await self.store.delete_commit_tag(current_principal().org_id, request.tag_name)
        return pb.DeleteCommitTagResponse()


class TaggingInternalServicer(tagging_pb2_grpc.TaggingInternalServiceServicer):
    """Calls only the platform's own services make (the service credential, acting for an org). They take
    what the caller has checked (a repository's id, a commit the org owns) rather than asking it back."""

    def __init__(self, store: TaggingStore, registry: grpc.aio.Channel, repositories: RecentRepositories) -> None:
        self.store = store
        self.registry = registry_pb2_grpc.RegistryServiceStub(registry)
        self.repositories = repositories

    async def ResolveReference(self, request: pb.ResolveReferenceRequest, context: grpc.aio.ServicerContext) -> pb.ResolveReferenceResponse:
        if bool(request.ref) == bool(request.tag_name):
            raise InvalidArgument("give exactly one of ref (repo:tag) or tag_name (a legacy tag)")
        if request.tag_name:
            tag = await self.store.get_commit_tag(current_principal().org_id, request.tag_name)
            return pb.ResolveReferenceResponse(commit_id=tag.commit_id, reference=tag.name)
        repo_name, tag_name = parse_reference(request.ref)
        repo = await caller_repository(self.registry, repo_name)
        found = await self.store.get_tag(repo.repo_id, repo.name, tag_name)
        return pb.ResolveReferenceResponse(commit_id=found.commit_id, reference=f"{repo.name}:{found.name}")

    async def LookupTags(self, request: pb.LookupTagsRequest, context: grpc.aio.ServicerContext) -> pb.LookupTagsResponse:
        found = await self.store.lookup_tags([(key.repository_id, key.tag_name) for key in request.keys])
        return pb.LookupTagsResponse(tags=[pb.FoundTag(repository_id=tag.repo_id, tag=tag_pb(tag)) for tag in found])

    async def AddRepositoryTag(self, request: pb.AddRepositoryTagRequest, context: grpc.aio.ServicerContext) -> pb.AddRepositoryTagResponse:
        tag = await self.store.create_tag(
            current_principal(), request.repository_id, request.repo_name, request.tag_name, request.commit_id, request.description,
            actor_key_id=request.actor_key_id,
        )  # fmt: skip
        return pb.AddRepositoryTagResponse(tag=tag_pb(tag))

    async def DeleteRepositoryTags(
        self, request: pb.DeleteRepositoryTagsRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteRepositoryTagsResponse:
        self.repositories.forget_org(current_principal().org_id)  # the repository is going: reads ask the registry again
        deleted = await self.store.delete_repository_tags(
            current_principal().org_id, request.repository_id, request.repo_name, actor_key_id=request.actor_key_id or None
        )
        return pb.DeleteRepositoryTagsResponse(deleted=deleted)

    async def ReserveCommitDeletion(
        self, request: pb.ReserveCommitDeletionRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReserveCommitDeletionResponse:
        await self.store.reserve_commit_deletion(current_principal().org_id, request.commit_id)
        return pb.ReserveCommitDeletionResponse()

    async def PlanRetention(self, request: pb.PlanRetentionRequest, context: grpc.aio.ServicerContext) -> pb.PlanRetentionResponse:
        candidates, tagged, kept = await self.store.plan_retention(current_principal().org_id, request.repositories)
        return pb.PlanRetentionResponse(candidates=candidates, tagged_commit_ids=tagged, kept_commit_ids=kept)

    async def ListAuditEvents(self, request: pb.ListAuditEventsRequest, context: grpc.aio.ServicerContext) -> pb.ListAuditEventsResponse:
        events, token = await service_page(self.store.db, "tagging", current_principal().org_id, request)
        return pb.ListAuditEventsResponse(events=events, next_page_token=token)

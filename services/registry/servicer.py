from __future__ import annotations

import asyncio
from collections.abc import Callable
from fnmatch import fnmatchcase

import grpc

from services.common import audit
from services.common.auth import ServiceCredential, bearer_token, current_principal
from services.common.errors import Conflict, InvalidArgument, NotFound, Unauthenticated, secrets_refusal
from services.common.names import validate_repo_name, validate_tag_name
from services.common.paging import Page
from services.common.peers import SCAN_TIMEOUT
from services.common.quotas import LIMITS, OrgLimits
from services.common.timestamps import to_timestamp
from services.registry.models import ApiKeyRow, OrgRow, RepositoryRow
from services.registry.sagas import ForkSource, Sagas, tag_taken
from services.registry.store import PublicRepo, RegistryStore, immutable_tags_of, retention_of
from vers.common.v1 import governance_pb2
from vers.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from vers.registry.v1 import registry_pb2 as pb
from vers.registry.v1 import registry_pb2_grpc
from vers.tagging.v1 import tagging_pb2, tagging_pb2_grpc


def org_pb(org: OrgRow) -> pb.Org:
    return pb.Org(id=org.id, name=org.name, created_at=to_timestamp(org.created_at))


def key_pb(key: ApiKeyRow) -> pb.ApiKey:
    return pb.ApiKey(
        id=key.id,
        label=key.label,
        created_at=to_timestamp(key.created_at),
        expires_at=to_timestamp(key.expires_at),
        is_admin=key.is_admin,
    )


def limits_pb(limits: OrgLimits) -> pb.OrgLimits:
    return pb.OrgLimits(**limits.as_dict())


def repository_pb(repo: RepositoryRow) -> pb.Repository:
    return pb.Repository(
        repo_id=repo.id,
        name=repo.name,
        description=repo.description,
        is_public=repo.is_public,
        created_at=to_timestamp(repo.created_at),
        immutable_tags=immutable_tags_of(repo),
        retention=retention_of(repo),
    )


def secrets_found(repo_name: str, findings: list[governance_pb2.SecretFinding]) -> Conflict:
    return secrets_refusal(
        f"repository {repo_name!r}", findings,
        "remove them from the VM, commit again and point the tags at the new commit, or publish anyway with "
        f"vers repo visibility {repo_name} --public --force (recorded in the audit log)", count_commits=True,
    )  # fmt: skip


def public_repository_pb(public: PublicRepo) -> pb.PublicRepository:
    repo = public.repo
    return pb.PublicRepository(
        repo_id=repo.id,
        name=repo.name,
        org_name=public.org_name,
        full_name=f"{public.org_name}/{repo.name}",
        description=repo.description,
        created_at=to_timestamp(repo.created_at),
    )


class RegistryServicer(registry_pb2_grpc.RegistryServiceServicer):
    def __init__(
        self,
        store: RegistryStore,
        tagging: grpc.aio.Channel,
        orchestrator: grpc.aio.Channel,
        credential: ServiceCredential,
        sagas: Sagas,
        forget_key: Callable[[str], None],
    ) -> None:
        self.store = store
        # Tells this process's cache of resolved keys that a key was revoked, so it stops working here at once.
        self.forget_key = forget_key
        self.tagging = tagging_pb2_grpc.TaggingInternalServiceStub(tagging)
        self.orchestrator = orchestrator_pb2_grpc.OrchestratorInternalServiceStub(orchestrator)
        self.credential = credential
        self.sagas = sagas

    async def Authenticate(self, request: pb.AuthenticateRequest, context: grpc.aio.ServicerContext) -> pb.AuthenticateResponse:
        principal = current_principal()
        if principal.is_service:
            # The platform's services learn the org's name and limits when they act for it (a fork, a repair).
            org = await self.store.org(principal.org_id)
            api_key = pb.ApiKey(id=principal.key_id, label=principal.key_label)
        else:
            key, org = await self.store.get_api_key(principal.key_id)
            api_key = key_pb(key)
        limits = self.store.limits_of(org)
        api_key.max_memory_mib = limits.max_memory_mib
        api_key.max_vcpus = limits.max_vcpus
        return pb.AuthenticateResponse(org=org_pb(org), api_key=api_key, limits=limits_pb(limits))

    async def ValidateKey(self, request: pb.ValidateKeyRequest, context: grpc.aio.ServicerContext) -> pb.ValidateKeyResponse:
        token = request.api_key or bearer_token(context.invocation_metadata())
        if not token:
            return pb.ValidateKeyResponse(valid=False, message="no API key given: send it as api_key or as the bearer token")
        try:
            principal = await self.store.resolve(token)
        except Unauthenticated as error:
            return pb.ValidateKeyResponse(valid=False, message=error.message)
        return pb.ValidateKeyResponse(valid=True, message=f"valid API key of organization {principal.org_name!r}")

    async def CreateOrg(self, request: pb.CreateOrgRequest, context: grpc.aio.ServicerContext) -> pb.CreateOrgResponse:
        org, new_key = await self.store.create_org(request.name)
        return pb.CreateOrgResponse(org=org_pb(org), api_key=key_pb(new_key.key), token=new_key.token)

    async def ListOrgs(self, request: pb.ListOrgsRequest, context: grpc.aio.ServicerContext) -> pb.ListOrgsResponse:
        page = Page.of("orgs", request.page_size, request.page_token)
        orgs, token = page.cut(await self.store.list_orgs(page.offset, page.fetch))
        return pb.ListOrgsResponse(orgs=[org_pb(org) for org in orgs], next_page_token=token)

    async def SetOrgLimits(self, request: pb.SetOrgLimitsRequest, context: grpc.aio.ServicerContext) -> pb.SetOrgLimitsResponse:
        if not request.org:
            raise InvalidArgument("org is required: the organization's name (or id)")
        present = {field.name for field, _ in request.ListFields()}  # the limits given, even as 0
        changes = {name: getattr(request, name) for name in LIMITS if name in present}
        org, limits = await self.store.set_org_limits(request.org, changes)
        return pb.SetOrgLimitsResponse(org=org_pb(org), limits=limits_pb(limits))

    async def CreateApiKey(self, request: pb.CreateApiKeyRequest, context: grpc.aio.ServicerContext) -> pb.CreateApiKeyResponse:
        new_key = await self.store.create_api_key(current_principal().org_id, request.label)
        return pb.CreateApiKeyResponse(api_key=key_pb(new_key.key), token=new_key.token)

    async def ListApiKeys(self, request: pb.ListApiKeysRequest, context: grpc.aio.ServicerContext) -> pb.ListApiKeysResponse:
        org_id = current_principal().org_id
        page = Page.of(f"api_keys:{org_id}", request.page_size, request.page_token)
        keys, token = page.cut(await self.store.list_api_keys(org_id, page.offset, page.fetch))
        return pb.ListApiKeysResponse(api_keys=[key_pb(key) for key in keys], next_page_token=token)

    async def DeleteApiKey(self, request: pb.DeleteApiKeyRequest, context: grpc.aio.ServicerContext) -> pb.DeleteApiKeyResponse:
        await self.store.delete_api_key(current_principal().org_id, request.key_id)
        self.forget_key(request.key_id)
        return pb.DeleteApiKeyResponse()

    async def CreateRepository(self, request: pb.CreateRepositoryRequest, context: grpc.aio.ServicerContext) -> pb.CreateRepositoryResponse:
        repo = await self.store.create_repository(
            current_principal().org_id, request.name, request.description,
            list(request.immutable_tags), request.retention if request.HasField("retention") else None,
        )  # fmt: skip
        return pb.CreateRepositoryResponse(repo_id=repo.id, name=repo.name)

    async def SetRepositoryPolicy(
        self, request: pb.SetRepositoryPolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetRepositoryPolicyResponse:
        repo = await self.store.set_policy(
            current_principal().org_id, request.repo_name,
            list(request.immutable_tags.patterns) if request.HasField("immutable_tags") else None,
            request.retention if request.HasField("retention") else None,
        )  # fmt: skip
        return pb.SetRepositoryPolicyResponse(repository=repository_pb(repo))

    async def ListRepositories(self, request: pb.ListRepositoriesRequest, context: grpc.aio.ServicerContext) -> pb.ListRepositoriesResponse:
        org_id = current_principal().org_id
        page = Page.of(f"repositories:{org_id}", request.page_size, request.page_token)
        repos, token = page.cut(await self.store.list_repositories(org_id, page.offset, page.fetch))
        return pb.ListRepositoriesResponse(repositories=[repository_pb(repo) for repo in repos], next_page_token=token)

    async def GetRepository(self, request: pb.GetRepositoryRequest, context: grpc.aio.ServicerContext) -> pb.GetRepositoryResponse:
        # No one sees it once its deletion began (the services finishing it go by its id).
        repo = await self.store.get_repository(current_principal().org_id, request.repo_name)
        return pb.GetRepositoryResponse(repository=repository_pb(repo))

    async def DeleteRepository(self, request: pb.DeleteRepositoryRequest, context: grpc.aio.ServicerContext) -> pb.DeleteRepositoryResponse:
        # A saga: its tags go first (tagging owns them; commits are never touched), then the repository
        # itself. Tags refer to the repository's id, so a repository made again under this name starts empty.
        org_id = current_principal().org_id
        await self._require_no_immutable_tag(await self.store.get_repository(org_id, request.repo_name))
        await self.sagas.delete_repository(org_id, request.repo_name)
        return pb.DeleteRepositoryResponse()

    async def _require_no_immutable_tag(self, repo: RepositoryRow) -> None:
        """A repository is not deleted while it holds a tag its own immutable patterns keep."""
        patterns = immutable_tags_of(repo)
        if not patterns:
            return
        for tag in await self._tags(repo):
            rule = next((pattern for pattern in patterns if fnmatchcase(tag.tag_name, pattern)), None)
            if rule is not None:
                raise Conflict(
                    f"repository {repo.name!r} holds tag {tag.tag_name!r}, which its immutable tag rule {rule!r} keeps: "
                    f"remove the rule first with vers repo policy {repo.name} --no-immutable-tags, then delete the repository"
                )

    async def _tags(self, repo: RepositoryRow) -> list[tagging_pb2.RepositoryTag]:
        """Every tag of the caller's repository, asked by its id: the tagging service need not ask back."""
        found = await self.sagas.lookup_tags(repo.org_id, [tagging_pb2.TagKey(repository_id=repo.id)])
        return [tag.tag for tag in found]

    async def SetRepositoryVisibility(
        self, request: pb.SetRepositoryVisibilityRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetRepositoryVisibilityResponse:
        """Made public only once a scan of every commit its tags name finds no secret, or with `force`."""
        org_id = current_principal().org_id
        forced = None
        if request.is_public:
            repo = await self.store.get_repository(org_id, request.repo_name)
            commit_ids = list(dict.fromkeys(tag.commit_id for tag in await self._tags(repo)))
            purpose = f"repository {repo.name} made public"
            findings = await self._scan(org_id, commit_ids, request.force, purpose)
            if findings and not request.force:
                raise secrets_found(repo.name, findings)
            if findings:
                forced = {"findings": len(findings), "rules": sorted({finding.rule for finding in findings}), "purpose": purpose}
        repo = await self.store.set_visibility(org_id, request.repo_name, request.is_public, forced)
        return pb.SetRepositoryVisibilityResponse(repository=repository_pb(repo))

    async def _scan(self, org_id: str, commit_ids: list[str], force: bool, purpose: str) -> list[governance_pb2.SecretFinding]:
        if not commit_ids:
            return []
        answer = await self.orchestrator.ScanCommits(
            orchestrator_pb2.ScanCommitsRequest(
                commit_ids=commit_ids, force=force, purpose=purpose, actor_key_id=current_principal().key_id
            ),
            metadata=self.credential.metadata(org_id),
            timeout=SCAN_TIMEOUT,
        )
        return list(answer.findings)

    async def ForkRepository(self, request: pb.ForkRepositoryRequest, context: grpc.aio.ServicerContext) -> pb.ForkRepositoryResponse:
        """Check the source is public and the target tag free, then the fork saga: branch and commit a VM in
        the caller's org, create (or reuse) the repository and tag the new commit; undone if a step fails."""
        missing = [f for f in ("source_org", "source_repo", "source_tag") if not getattr(request, f)]
        if missing:
            raise InvalidArgument(f"fork needs {', '.join(missing)}: the source is org/repo:tag of a public repository")
        org_id = current_principal().org_id
        repo_name = validate_repo_name(request.repo_name or request.source_repo)
        tag_name = validate_tag_name(request.tag_name or request.source_tag)
        source = await self._fork_source(org_id, request, repo_name, tag_name)
        await self.store.require_repository_room(org_id, repo_name)
        # An existing repository of that name is reused, also one a concurrent fork just made.
        forked = await self.sagas.fork(org_id, source, repo_name, tag_name)
        return pb.ForkRepositoryResponse(
            repo_name=repo_name,
            tag_name=tag_name,
            reference=f"{repo_name}:{tag_name}",
            commit_id=forked.commit_id,
            vm_id=forked.vm_id,
        )

    async def _fork_source(self, org_id: str, request: pb.ForkRepositoryRequest, repo_name: str, tag_name: str) -> ForkSource:
        """The public tag's commit, and a refusal before any VM is made when the target tag exists: the
        registry finds both repositories itself and asks the tagging service for both tags in one call."""
        public = (await self.store.get_public_repository(request.source_org, request.source_repo)).repo
        try:
            target: RepositoryRow | None = await self.store.get_repository(org_id, repo_name)
        except NotFound:
            target = None  # made by the fork (or refused then, while one of that name is being deleted)
        keys = [tagging_pb2.TagKey(repository_id=public.id, tag_name=request.source_tag)]
        if target is not None:
            keys.append(tagging_pb2.TagKey(repository_id=target.id, tag_name=tag_name))
        found = {(tag.repository_id, tag.tag.tag_name): tag.tag for tag in await self.sagas.lookup_tags(org_id, keys)}
        if target is not None and (target.id, tag_name) in found:
            raise tag_taken(repo_name, tag_name)
        tag = found.get((public.id, request.source_tag))
        if tag is None:
            raise NotFound(f"tag {request.source_tag!r} not found in repository '{request.source_org}/{request.source_repo}'")
        return ForkSource(request.source_org, request.source_repo, request.source_tag, tag.commit_id, tag.description)

    async def GetOrgRetention(self, request: pb.GetOrgRetentionRequest, context: grpc.aio.ServicerContext) -> pb.GetOrgRetentionResponse:
        days = await self.store.org_retention(current_principal().org_id)
        return pb.GetOrgRetentionResponse(retention=pb.OrgRetention(untagged_older_than_days=days))

    async def SetOrgRetention(self, request: pb.SetOrgRetentionRequest, context: grpc.aio.ServicerContext) -> pb.SetOrgRetentionResponse:
        if not request.HasField("retention"):
            raise InvalidArgument('retention is required: {"retention": {"untagged_older_than_days": N}} (0 keeps untagged commits)')
        days = await self.store.set_org_retention(current_principal().org_id, request.retention.untagged_older_than_days)
        return pb.SetOrgRetentionResponse(retention=pb.OrgRetention(untagged_older_than_days=days))

    async def CollectGarbage(self, request: pb.CollectGarbageRequest, context: grpc.aio.ServicerContext) -> pb.CollectGarbageResponse:
        collected = await self.sagas.collect_garbage(current_principal().org_id, dry_run=request.dry_run)
        return pb.CollectGarbageResponse(dry_run=request.dry_run, commits=collected.commits, bytes_freed=collected.bytes_freed)

    async def ListAuditEvents(self, request: pb.ListAuditEventsRequest, context: grpc.aio.ServicerContext) -> pb.ListAuditEventsResponse:
        """The registry's entries merged with the tagging service's and the orchestrator's, oldest first."""
        org_id = current_principal().org_id
        query = audit.AuditQuery.of(org_id, request)
        since, type_, page_size, page_token = request.since, request.type, request.page_size, request.page_token
        metadata = self.credential.metadata(org_id)
        own, tagging, orchestrator = await asyncio.gather(
            audit.list_events(self.store.db, "registry", query),
            self.tagging.ListAuditEvents(
                tagging_pb2.ListAuditEventsRequest(since=since, type=type_, page_size=page_size, page_token=page_token), metadata=metadata
            ),
            self.orchestrator.ListAuditEvents(
                orchestrator_pb2.ListAuditEventsRequest(since=since, type=type_, page_size=page_size, page_token=page_token),
                metadata=metadata,
            ),
        )
        events, token = audit.merge(query, own, list(tagging.events), list(orchestrator.events))
        return pb.ListAuditEventsResponse(events=events, next_page_token=token)

    async def ListPublicRepositories(
        self, request: pb.ListPublicRepositoriesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListPublicRepositoriesResponse:
        page = Page.of("public_repositories", request.page_size, request.page_token)
        repos, token = page.cut(await self.store.list_public_repositories(page.offset, page.fetch))
        return pb.ListPublicRepositoriesResponse(repositories=[public_repository_pb(repo) for repo in repos], next_page_token=token)

    async def GetPublicRepository(
        self, request: pb.GetPublicRepositoryRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetPublicRepositoryResponse:
        repo = await self.store.get_public_repository(request.org_name, request.repo_name)
        return pb.GetPublicRepositoryResponse(repository=public_repository_pb(repo))

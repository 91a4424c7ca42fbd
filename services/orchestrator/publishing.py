"""Commits: name, description and visibility (UpdateCommit), every org's public ones (ListPublicCommits).

A public commit can be branched and restored by id from any org (the new VMs are the caller's, in its
quotas, and keep the commit from being deleted while they stand on it); everything else about it stays its
owner's: only the owner reads it with GetCommit, changes, tags or deletes it. Publishing runs the secret
scan first, as a repository's does, and is refused with the findings when the scan finds anything."""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING

import grpc

from services.common.auth import current_principal
from services.common.errors import Conflict, InvalidArgument, secrets_refusal
from services.common.names import COMMIT_DESCRIPTION_MAX_BYTES, COMMIT_NAME_MAX, validate_label, validate_text
from services.orchestrator.models import CommitRow
from vers.common.v1 import governance_pb2
from vers.orchestrator.v1 import orchestrator_pb2 as pb

if TYPE_CHECKING:
    from services.orchestrator.engine import Engine
    from services.orchestrator.store import OrchestratorStore

PUBLIC_PAGE = 50
MAX_PUBLIC_PAGE = 100


def secrets_found(commit: CommitRow, findings: Sequence[governance_pb2.SecretFinding]) -> Conflict:
    return secrets_refusal(
        f"commit {commit.id}",
        findings,
        "remove them from the VM (files, and processes that hold them in memory), commit it again and publish the new commit",
    )


def _servicer() -> ModuleType:
    # servicer.py imports this module first (the mixin): its pb builders are looked up when called
    from services.orchestrator import servicer

    return servicer


class CommitMethods:
    """Methods of OrchestratorServicer (a mixin: `self` is the servicer)."""

    engine: Engine
    store: OrchestratorStore

    async def _branchable(self, commit_id: str) -> CommitRow:
        """One of the caller's commits, or a public one of any org (BranchVm, BranchByCommit, RestoreFromCommit)."""
        return await self.store.visible_commit(current_principal().org_id, commit_id)

    async def _hide_foreign(self, commits: Sequence[CommitRow], messages: Sequence[pb.Commit | pb.CommitLineageEntry]) -> None:
        """Another org's public commit shown without what is private to its owner: the VM it was made from
        (never shown to another org), and the commit it descends from unless that one is public too."""
        org_id = current_principal().org_id
        foreign = [(c, m) for c, m in zip(commits, messages, strict=True) if c.org_id != org_id]
        visible = await self.store.visible_commit_ids(org_id, [c.grandparent_commit_id or "" for c, _ in foreign])
        for commit, message in foreign:
            message.parent_vm_id = ""
            if commit.grandparent_commit_id not in visible:
                message.grandparent_commit_id = ""

    async def _lineage_shown(self, chain: Sequence[CommitRow]) -> list[pb.CommitLineageEntry]:
        entries = [_servicer().lineage_pb(commit) for commit in chain]
        await self._hide_foreign(chain, entries)
        return entries

    async def UpdateCommit(self, request: pb.UpdateCommitRequest, context: grpc.aio.ServicerContext) -> pb.UpdateCommitResponse:
        # the caller's own commits only: another org's, public or not, is not found (it is theirs to change)
        commit = await self.store.get_commit(current_principal().org_id, request.commit_id)
        name = validate_label("name", request.name, COMMIT_NAME_MAX) if request.HasField("name") else None
        description = (
            validate_text("description", request.description, COMMIT_DESCRIPTION_MAX_BYTES) if request.HasField("description") else None
        )
        if request.is_public and not commit.is_public:
            # commits never change: the scan (kept per commit and rule set) stays true until the publish
            findings = _servicer().findings_pb(await self.engine.scan(commit))
            if findings:
                raise secrets_found(commit, findings)
        commit = await self.store.update_commit(commit.org_id, commit.id, name, description, request.is_public)
        sizes = await self.engine.commit_bytes([commit])
        return pb.UpdateCommitResponse(commit=_servicer().commit_pb(commit, sizes[commit.id]))

    async def ListPublicCommits(
        self, request: pb.ListPublicCommitsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListPublicCommitsResponse:
        limit = request.limit or PUBLIC_PAGE
        if not 1 <= limit <= MAX_PUBLIC_PAGE or request.offset < 0:
            raise InvalidArgument(
                f"limit must be between 1 and {MAX_PUBLIC_PAGE} ({PUBLIC_PAGE} when left out) and offset at least 0, "
                f"not limit={request.limit} offset={request.offset}"
            )
        commits, total = await self.store.list_public_commits(limit, request.offset)
        # sizes are their owners' accounting: not shown here
        messages = [_servicer().commit_pb(commit) for commit in commits]
        await self._hide_foreign(commits, messages)
        return pb.ListPublicCommitsResponse(commits=messages, total=total, limit=limit, offset=request.offset)

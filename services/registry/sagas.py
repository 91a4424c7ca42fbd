"""The registry's changes that span services, made as sagas. A row in `sagas` is written before the first
side effect and moved on after each step. When a step fails, the steps before it are undone in reverse;
an undo that cannot run yet (a peer is down) is retried in the background. A row left by a crash is
finished or undone on the next start, so nothing a saga made outlives it unaccounted for.

A fork: the orchestrator's VM and commit (noted there under the saga's id), the repository (made or
reused), the tag. A repository delete: its tags in the tagging service, then its row. The registry asks
each service directly, with what it has looked up itself (the source commit, a repository's id), so no
callee calls back into the registry or into another callee: the calls of a fork form a tree.

Garbage collection spans the services too, though it needs no saga (each deletion stands alone): the
tagging service plans what the repositories' rules let go, the orchestrator deletes it."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import grpc

from services.common.auth import ServiceCredential, acting_key_id, principal_of
from services.common.errors import AlreadyExists
from services.common.faults import fault_point
from services.common.peers import COLLECT_TIMEOUT
from services.registry.models import SagaRow
from services.registry.store import FORK, REPO_DELETE, RegistryStore
from vers.common.v1 import governance_pb2
from vers.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from vers.tagging.v1 import tagging_pb2, tagging_pb2_grpc

log = logging.getLogger(__name__)

# Seconds between rounds of settling sagas whose peers do not answer yet; the last one repeats.
RETRY_DELAYS = (0.5, 1.0, 2.0, 5.0)
PEER_TIMEOUT = 30.0
ABANDON_TIMEOUT = 120.0  # deletes a VM and a commit


def reason(error: BaseException) -> str:
    """One line for the log: a peer's status and message rather than its whole debug string."""
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    return str(error) or type(error).__name__


def tag_taken(repo_name: str, tag_name: str) -> AlreadyExists:
    return AlreadyExists(
        f"tag {tag_name!r} already exists in your repository {repo_name!r}: pass --tag-name (tag_name) to pick "
        f"another name, or delete it first (vers repo tag delete {repo_name} {tag_name})"
    )


@dataclass(frozen=True)
class ForkSource:
    """A public repository's tag and the commit it names, as the registry looked them up for a fork."""

    org_name: str
    repo_name: str
    tag_name: str
    commit_id: str
    description: str

    @property
    def reference(self) -> str:
        return f"{self.org_name}/{self.repo_name}:{self.tag_name}"


@dataclass(frozen=True)
class Forked:
    repo_name: str
    tag_name: str
    commit_id: str
    vm_id: str


class Sagas:
    def __init__(
        self, store: RegistryStore, tagging: grpc.aio.Channel, orchestrator: grpc.aio.Channel, credential: ServiceCredential
    ) -> None:
        self.store = store
        self.tagging = tagging_pb2_grpc.TaggingInternalServiceStub(tagging)
        self.orchestrator = orchestrator_pb2_grpc.OrchestratorInternalServiceStub(orchestrator)
        self.credential = credential
        self._tasks: set[asyncio.Task[Any]] = set()

    # Forward

    async def fork(self, org_id: str, source: ForkSource, repo_name: str, tag_name: str) -> Forked:
        """Checked by the caller: the source is public and names its commit, the names are valid, the tag looked free."""
        return await self._shielded(self._fork(org_id, source, repo_name, tag_name))

    async def _fork(self, org_id: str, source: ForkSource, repo_name: str, tag_name: str) -> Forked:
        request = {"source_org": source.org_name, "source_repo": source.repo_name, "source_tag": source.tag_name}
        saga = await self.store.begin_saga(FORK, org_id, "started", {**request, "repo_name": repo_name, "tag_name": tag_name})
        fault_point("fork.after_saga_record")
        forked = None
        # Each call as the org with the service credential, which carries the org's name and limits: internal
        # calls, given what they need, so neither callee asks the registry (or the other) anything.
        metadata = self.credential.metadata(org_id)
        try:
            forked = await self.orchestrator.ForkCommit(
                orchestrator_pb2.ForkCommitRequest(
                    source_commit_id=source.commit_id, source_reference=source.reference, description=source.description, saga_id=saga.id
                ),
                metadata=metadata,
            )
            await self.store.advance_saga(saga.id, "forked", vm_id=forked.vm_id, commit_id=forked.commit_id)
            fault_point("fork.after_orchestrator")
            noted = await self.store.fork_repository(saga.id, org_id, repo_name)
            fault_point("fork.after_repository")
            await self.tagging.AddRepositoryTag(
                tagging_pb2.AddRepositoryTagRequest(
                    repository_id=json.loads(noted.payload)["repository_id"], repo_name=repo_name, tag_name=tag_name,
                    commit_id=forked.commit_id, actor_key_id=acting_key_id(org_id),
                ),
                metadata=metadata,
            )  # fmt: skip
            fault_point("fork.after_tag")
        except Exception as error:
            if await self._settle_after_failure(saga.id) and forked is not None:
                # The tag was made after all (its answer was lost): the fork landed.
                return Forked(repo_name, tag_name, forked.commit_id, forked.vm_id)
            if isinstance(error, grpc.aio.AioRpcError) and error.code() == grpc.StatusCode.ALREADY_EXISTS:
                # Taken since the early check, by a concurrent fork or a person: said as the early check says it.
                raise tag_taken(repo_name, tag_name) from None
            raise
        await self.store.finish_fork(saga.id)
        return Forked(repo_name, tag_name, forked.commit_id, forked.vm_id)

    async def delete_repository(self, org_id: str, repo_name: str) -> None:
        await self._shielded(self._delete_repository(org_id, repo_name))

    async def _delete_repository(self, org_id: str, repo_name: str) -> None:
        # From the saga's row on the repository is hidden, so no tag can be added while its tags go.
        saga = await self.store.begin_repository_deletion(org_id, repo_name, acting_key_id(org_id))
        try:
            await self._finish_repository_deletion(saga)
        except Exception:
            log.warning("deletion of repository %r of org %s stopped halfway; it is finished in the background", repo_name, org_id)
            self._spawn(self._settle_all([saga.id]))
            raise

    async def _finish_repository_deletion(self, saga: SagaRow) -> None:
        payload = json.loads(saga.payload)
        if await self.store.repository_exists(payload["repository_id"]):
            await self.tagging.DeleteRepositoryTags(
                tagging_pb2.DeleteRepositoryTagsRequest(
                    repository_id=payload["repository_id"], repo_name=payload["repo_name"], actor_key_id=payload.get("actor_key_id", "")
                ),
                metadata=self.credential.metadata(saga.org_id),
                timeout=PEER_TIMEOUT,
            )
            await self.store.advance_saga(saga.id, "tags_deleted")
            fault_point("repo_delete.after_tags")
        await self.store.finish_repository_deletion(saga.id, payload["repository_id"])

    # Garbage collection

    async def collect_garbage(self, org_id: str, *, dry_run: bool) -> orchestrator_pb2.CollectCommitsResponse:
        """Apply the org's retention rules (its repositories' and its own); with `dry_run`, only list what
        they let go. A real run is audited; the platform's scheduled run only when it deleted something."""
        repositories, untagged_older_than_days = await self.store.retention_rules(org_id)
        if not repositories and not untagged_older_than_days:
            return orchestrator_pb2.CollectCommitsResponse()  # no rule lets anything go
        # from here on a task of its own: a caller that goes away (a deadline) does not cut the deletions
        # short before they are recorded in the audit log
        return await asyncio.shield(self._spawn(self._collect(org_id, repositories, untagged_older_than_days, dry_run)))

    async def _collect(
        self, org_id: str, repositories: list[governance_pb2.RepositoryRetention], untagged_older_than_days: int, dry_run: bool
    ) -> orchestrator_pb2.CollectCommitsResponse:
        metadata = self.credential.metadata(org_id)
        plan = await self.tagging.PlanRetention(
            tagging_pb2.PlanRetentionRequest(repositories=repositories), metadata=metadata, timeout=PEER_TIMEOUT
        )
        collected = await self.orchestrator.CollectCommits(
            orchestrator_pb2.CollectCommitsRequest(
                candidates=plan.candidates, protected_commit_ids=[*plan.tagged_commit_ids, *plan.kept_commit_ids],
                untagged_older_than_days=untagged_older_than_days, dry_run=dry_run, actor_key_id=acting_key_id(org_id),
            ),
            metadata=metadata,
            timeout=COLLECT_TIMEOUT,
        )  # fmt: skip
        if not dry_run and (collected.commits or principal_of(org_id) is not None):
            await self.store.record_collection(org_id, [commit.commit_id for commit in collected.commits], collected.bytes_freed)
        return collected

    # Finishing or undoing

    async def _settle_after_failure(self, saga_id: str) -> bool:
        """Undo a failed fork at once if the peers answer, else in the background. True if it landed after all."""
        try:
            return await self._settle_once(saga_id, logging.INFO) == "finished"
        except Exception as error:
            log.warning("fork %s could not be undone yet (%s); retrying in the background", saga_id, reason(error))
            self._spawn(self._settle_all([saga_id]))
            return False

    async def _settle_once(self, saga_id: str, level: int) -> str:
        """Finish or undo one saga; says which. Every step is safe to repeat, so a retry picks up anywhere."""
        saga = await self.store.saga(saga_id)
        if saga is None:
            return "gone"
        if saga.kind == REPO_DELETE and json.loads(saga.payload).get("fork_undo"):
            removed = await self._remove_if_untagged(saga)
            log.log(level, "undo of a fork's repository %s of org %s: %s", saga.id, saga.org_id, "removed" if removed else "kept")
            return "finished"
        if saga.kind == REPO_DELETE:
            await self._finish_repository_deletion(saga)
            log.log(
                level, "repository delete %s of org %s: finished, %r is gone", saga.id, saga.org_id, json.loads(saga.payload)["repo_name"]
            )
            return "finished"
        payload = json.loads(saga.payload)
        if payload.get("commit_id") and await self._tag_points_at(saga, payload):
            await self.store.finish_fork(saga.id)
            log.log(level, "fork %s of org %s: finished, %s:%s points at its commit %s", saga.id, saga.org_id,
                    payload["repo_name"], payload["tag_name"], payload["commit_id"])  # fmt: skip
            return "finished"
        removed = await self._remove_repository(saga, payload) if payload.get("repository_created") else False
        abandoned = await self.orchestrator.AbandonFork(
            orchestrator_pb2.AbandonForkRequest(saga_id=saga.id), metadata=self.credential.metadata(saga.org_id), timeout=ABANDON_TIMEOUT
        )
        await self.store.end_saga(saga.id)
        repository = f", repository {payload['repo_name']!r} removed" if removed else ""
        log.log(level, "fork %s of org %s: undone at step %s (VM %s and commit %s deleted%s)", saga.id, saga.org_id, saga.step,
                abandoned.vm_id or "-", abandoned.commit_id or "-", repository)  # fmt: skip
        return "undone"

    async def lookup_tags(self, org_id: str, keys: list[tagging_pb2.TagKey]) -> list[tagging_pb2.FoundTag]:
        """Tags by repository id (an empty tag name: all of that repository's), asked as the org."""
        answer = await self.tagging.LookupTags(
            tagging_pb2.LookupTagsRequest(keys=keys), metadata=self.credential.metadata(org_id), timeout=PEER_TIMEOUT
        )
        return list(answer.tags)

    async def _tag_points_at(self, saga: SagaRow, payload: dict[str, Any]) -> bool:
        """Whether the fork's tag names its commit. Before the repository step no tag can: the commit is new."""
        if not payload.get("repository_id"):
            return False
        key = tagging_pb2.TagKey(repository_id=payload["repository_id"], tag_name=payload["tag_name"])
        return any(found.tag.commit_id == payload["commit_id"] for found in await self.lookup_tags(saga.org_id, [key]))

    async def _remove_repository(self, saga: SagaRow, payload: dict[str, Any]) -> bool:
        """The repository this saga made, if it is still empty: hidden first, so no tag can be added to it
        while it is checked, then removed, or shown again when someone tagged it before it was hidden."""
        hidden = await self.store.hide_fork_repository(saga.id, saga.org_id, payload["repository_id"])
        return hidden is not None and await self._remove_if_untagged(hidden)

    async def _remove_if_untagged(self, hidden: SagaRow) -> bool:
        payload = json.loads(hidden.payload)
        existed = await self.store.repository_exists(payload["repository_id"])
        if await self.lookup_tags(hidden.org_id, [tagging_pb2.TagKey(repository_id=payload["repository_id"])]):
            await self.store.end_saga(hidden.id)  # tagged by another fork or a person: it is theirs too now
            return False
        await self.store.finish_repository_deletion(hidden.id, payload["repository_id"])
        return existed

    def recover(self, sagas: list[SagaRow]) -> None:
        """Settle the sagas a crash left, read before the service answered any call, in the background: the
        registry serves meanwhile, and the peers may not be up yet."""
        if not sagas:
            return
        log.warning("%d saga(s) were cut short by a stop or a crash: finishing or undoing them", len(sagas))
        # Forks that only reused a repository first, so the one that made it sees no other fork wanting it.
        ordered = sorted(sagas, key=lambda saga: bool(json.loads(saga.payload).get("repository_created")))
        self._spawn(self._settle_all([saga.id for saga in ordered], logging.WARNING))

    async def _settle_all(self, saga_ids: list[str], level: int = logging.INFO) -> None:
        """Round after round until every saga is settled; one that fails waits for the next round alone."""
        pending, round_ = list(saga_ids), 0
        while pending:
            failed = []
            for saga_id in pending:
                try:
                    await self._settle_once(saga_id, level)
                except Exception as error:
                    log.info("saga %s waits for its peers: %s", saga_id, reason(error))
                    failed.append(saga_id)
            pending = failed
            if pending:
                await asyncio.sleep(RETRY_DELAYS[min(round_, len(RETRY_DELAYS) - 1)])
                round_ += 1

    # Tasks

    async def _shielded(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        """A saga runs as a task of its own: a caller that hangs up does not leave it halfway."""
        return await asyncio.shield(self._spawn(coroutine))

    def _spawn(self, coroutine: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: its caller may have gone, and it was answered or logged already

    async def close(self) -> None:
        """Background settling stops; what is left is settled on the next start."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

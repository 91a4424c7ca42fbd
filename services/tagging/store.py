"""Tagging data: repository tags with their history, and legacy org-scoped commit tags; every change with
its audit entry, in the change's transaction."""

from __future__ import annotations

import fnmatch
import uuid
from collections.abc import Iterable, Sequence

from sqlalchemy import func
from sqlmodel import col, delete, select
from sqlmodel.ext.asyncio.session import AsyncSession

from services.common.audit import record
from services.common.auth import Principal, principal_of
from services.common.db import Database, insert_unique, serialize
from services.common.errors import Conflict, NotFound
from services.common.names import validate_tag_name, validate_text
from services.common.quotas import OrgLimits, check
from services.common.timestamps import utcnow
from services.tagging.models import CommitTagRow, DeletedCommitRow, RepoTagRow, TagEventRow
from vers.common.v1 import governance_pb2


def _event(tag: RepoTagRow, caller: Principal, action: str, old: str, new: str, key_id: str | None = None) -> TagEventRow:
    """The tag's history event; made by `key_id` when given (a service acting for that key), else by the caller."""
    return TagEventRow(
        repo_id=tag.repo_id, tag_name=tag.name, action=action, old_commit_id=old, new_commit_id=new,
        org_id=caller.org_id, api_key_id=caller.key_id if key_id is None else key_id,
    )  # fmt: skip


def _change(tag: RepoTagRow | CommitTagRow, commit_id: str | None, description: str | None) -> None:
    """Move a tag and/or change its description; None leaves that part as it is."""
    if commit_id is not None:
        tag.commit_id = commit_id
    if description is not None:
        tag.description = description
    tag.updated_at = utcnow()


def _record_tag_change(session: AsyncSession, tag: RepoTagRow, old: str, new: str, key_id: str | None = None) -> None:
    """tag.create, tag.move or tag.delete of `repo:tag`; a description-only update changes no commit and is none."""
    if old == new:
        return
    type = "tag.create" if not old else "tag.delete" if not new else "tag.move"
    before = {"commit_id": old} if old else None
    after = {"commit_id": new} if new else None
    record(session, tag.org_id, type, f"{tag.repo_name}:{tag.name}", before, after, key_id=key_id)


def _record_commit_tag_change(session: AsyncSession, tag: CommitTagRow, old: str, new: str) -> None:
    if old == new:
        return
    type = "commit_tag.create" if not old else "commit_tag.delete" if not new else "commit_tag.move"
    record(session, tag.org_id, type, tag.name, {"commit_id": old} if old else None, {"commit_id": new} if new else None)


def immutable_rule(patterns: Iterable[str], tag_name: str) -> str | None:
    """The repository's first immutable-tag pattern the tag's name matches (case-sensitive), if any."""
    return next((pattern for pattern in patterns if fnmatch.fnmatchcase(tag_name, pattern)), None)


def _require_mutable(tag: RepoTagRow, repo_name: str, immutable: Sequence[str]) -> None:
    rule = immutable_rule(immutable, tag.name)
    if rule is not None:
        raise Conflict(
            f"tag {tag.name} of repository {repo_name} is immutable (rule {rule!r}): make a new tag, "
            f"or remove the rule with vers repo policy {repo_name}"
        )


async def _require_not_deleted(session: AsyncSession, commit_id: str | None) -> None:
    """Inside the write transaction that would make a tag name the commit: refused once its deletion began."""
    if commit_id is not None:
        await serialize(session, f"commit:{commit_id}")
    if commit_id is not None and await session.get(DeletedCommitRow, commit_id) is not None:
        raise NotFound(f"commit {commit_id!r} is being deleted (or was): tag another commit")


def _commits_per_tag(history: Iterable[TagEventRow]) -> dict[str, list[str]]:
    """Per tag name, the distinct commits it pointed at, newest last (a tag moved back to a commit makes that
    commit its newest again), from the repository's history oldest first."""
    pointed: dict[str, dict[str, None]] = {}
    for event in history:
        commits = pointed.setdefault(event.tag_name, {})
        for commit_id in (event.old_commit_id, event.new_commit_id):
            if commit_id:
                commits.pop(commit_id, None)
                commits[commit_id] = None
    return {name: list(commits) for name, commits in pointed.items()}


def _kept(policy: governance_pb2.RetentionPolicy, pointed: dict[str, list[str]], ruled_only: bool = False) -> set[str]:
    """What the repository's keep rules keep: every commit of a tag matching `keep_tags`, the last `keep_last`
    of every other tag, and everything when there is no `keep_last` rule (`ruled_only`: only what a rule
    keeps, which the untagged rule leaves alone too)."""
    kept: set[str] = set()
    for name, commits in pointed.items():
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in policy.keep_tags):
            kept.update(commits)
        elif policy.keep_last > 0:
            kept.update(commits[-policy.keep_last :])
        elif not ruled_only:
            kept.update(commits)
    return kept


def _beyond(keep_last: int) -> str:
    return "the last commit" if keep_last == 1 else f"the last {keep_last} commits"


def plan_retention(
    repositories: Sequence[governance_pb2.RepositoryRetention], histories: dict[str, list[TagEventRow]], tagged: set[str]
) -> list[governance_pb2.RetentionCandidate]:
    """The commits the repositories' rules let go, each once, oldest mention first. A commit any tag names now
    (`tagged`) never goes; one that any repository's keep rules keep does not go for another's `keep_last`.
    Only what the histories (capped per repository) still know is considered."""
    pointed = {repo.repo_id: _commits_per_tag(histories[repo.repo_id]) for repo in repositories}
    kept = set().union(*(_kept(repo.policy, pointed[repo.repo_id]) for repo in repositories))
    # a keep rule wins over the untagged rule: what `keep_tags` or `keep_last` keeps stays at any age
    ruled = kept_by_rules(repositories, histories)
    candidates: dict[str, governance_pb2.RetentionCandidate] = {}

    def propose(commit_id: str, reason: str, min_age_days: int) -> None:
        known = candidates.get(commit_id)
        if known is None or min_age_days < known.min_age_days:
            candidates[commit_id] = governance_pb2.RetentionCandidate(commit_id=commit_id, reason=reason, min_age_days=min_age_days)

    for repo in repositories:
        policy = repo.policy
        named = [commit_id for commit_id in _mentioned(histories[repo.repo_id]) if commit_id not in tagged]
        for commit_id in named if policy.keep_last > 0 else ():
            if commit_id not in kept:
                tag = min(name for name, commits in pointed[repo.repo_id].items() if commit_id in commits)
                propose(commit_id, f"{repo.repo_name}: beyond {_beyond(policy.keep_last)} of {tag}", 0)
        for commit_id in named if policy.untagged_older_than_days > 0 else ():
            if commit_id in ruled:
                continue
            days = policy.untagged_older_than_days
            propose(commit_id, f"{repo.repo_name}: untagged, and older than {days} day{'s' if days != 1 else ''}", days)
    return list(candidates.values())


def kept_by_rules(repositories: Sequence[governance_pb2.RepositoryRetention], histories: dict[str, list[TagEventRow]]) -> set[str]:
    """The commits the repositories' keep rules (`keep_tags`, `keep_last`) keep: no age rule deletes them,
    neither a repository's nor the org's."""
    return set().union(*(_kept(repo.policy, _commits_per_tag(histories[repo.repo_id]), ruled_only=True) for repo in repositories))


def _mentioned(history: Iterable[TagEventRow]) -> list[str]:
    """The distinct commits a history names, in the order it first names them."""
    seen: dict[str, None] = {}
    for event in history:
        for commit_id in (event.old_commit_id, event.new_commit_id):
            if commit_id:
                seen.setdefault(commit_id, None)
    return list(seen)


class TaggingStore:
    def __init__(self, db: Database, default_limits: OrgLimits | None = None, max_history: int = 10_000) -> None:
        self.db = db
        self.max_history = max_history
        if default_limits is None:
            from services.common.settings import get_settings

            default_limits = OrgLimits.defaults(get_settings())
        self.default_limits = default_limits

    async def _record(self, session: AsyncSession, event: TagEventRow) -> None:
        """A tag's event, in the history of its repository, which keeps its newest `max_history` events."""
        session.add(event)
        await session.flush()
        oldest_kept = (
            await session.exec(
                select(TagEventRow.id).where(TagEventRow.repo_id == event.repo_id)
                .order_by(col(TagEventRow.id).desc()).offset(self.max_history - 1).limit(1)
            )
        ).first()  # fmt: skip
        if oldest_kept is not None:
            await session.exec(delete(TagEventRow).where(col(TagEventRow.repo_id) == event.repo_id, col(TagEventRow.id) < oldest_kept))

    async def _require_tag_room(self, session: AsyncSession, org_id: str) -> None:
        """Inside the write transaction that adds a tag: repository tags and legacy tags of the org together
        within its limit (the caller's, from the registry; the default when unknown)."""
        await serialize(session, f"org:{org_id}")
        caller = principal_of(org_id)
        limits = caller.limits if caller is not None and caller.limits is not None else self.default_limits
        used = 0
        for model in (RepoTagRow, CommitTagRow):
            used += int((await session.exec(select(func.count()).select_from(model).where(model.org_id == org_id))).one())
        check(limits, "max_tags", used, 1, caller.org_label if caller is not None else org_id)

    async def reserve_commit_deletion(self, org_id: str, commit_id: str) -> None:
        """Record that the commit is being deleted, unless a tag of the org names it (Conflict naming them).
        One write transaction, as every tag change is: a concurrent tag either comes first and blocks the
        deletion, or comes after and is refused. Idempotent, for a deletion finished after a crash."""
        async with self.db.write() as session:
            await serialize(session, f"commit:{commit_id}")
            references, legacy = await self._references(session, org_id, commit_id)
            tags = [*references, *(f"{name} (legacy tag)" for name in legacy)]
            if tags:
                raise Conflict(f"commit {commit_id} is still tagged: {', '.join(tags)}; delete or move those tags first")
            if await session.get(DeletedCommitRow, commit_id) is None:
                session.add(DeletedCommitRow(commit_id=commit_id, org_id=org_id))

    # Repository tags

    async def create_tag(
        self, caller: Principal, repo_id: str, repo_name: str, name: str, commit_id: str, description: str, actor_key_id: str | None = None
    ) -> RepoTagRow:
        """`actor_key_id`: the key a service creates the tag for (the registry's fork), in the history and audit log."""
        validate_tag_name(name)
        validate_text("description", description)
        tag = RepoTagRow(
            id=str(uuid.uuid4()), repo_id=repo_id, repo_name=repo_name, org_id=caller.org_id, name=name, commit_id=commit_id,
            description=description,
        )  # fmt: skip
        async with self.db.write() as session:
            conflict = (
                f"tag {name!r} already exists in repository {repo_name!r}: move it with PATCH "
                f"(vers repo tag update), delete it first, or choose another name"
            )
            await _require_not_deleted(session, commit_id)
            await self._require_tag_room(session, caller.org_id)
            await insert_unique(session, tag, conflict)
            await self._record(session, _event(tag, caller, "created", "", commit_id, actor_key_id))
            _record_tag_change(session, tag, "", commit_id, actor_key_id)
            return tag

    async def lookup_tags(self, keys: Sequence[tuple[str, str]]) -> list[RepoTagRow]:
        """The tags of (repository id, tag name) that exist, in the order of the keys; an empty name stands for
        every tag of that repository, by name."""
        found: list[RepoTagRow] = []
        async with self.db.read() as session:
            for repo_id, name in keys:
                query = select(RepoTagRow).where(RepoTagRow.repo_id == repo_id)
                if name:
                    query = query.where(RepoTagRow.name == validate_tag_name(name))
                found.extend(await session.exec(query.order_by(RepoTagRow.name)))
        return found

    async def list_tags(self, repo_id: str, offset: int = 0, limit: int | None = None) -> list[RepoTagRow]:
        async with self.db.read() as session:
            query = select(RepoTagRow).where(RepoTagRow.repo_id == repo_id).order_by(RepoTagRow.name)
            return list(await session.exec(query.offset(offset).limit(limit)))

    async def get_tag(self, repo_id: str, repo_name: str, name: str) -> RepoTagRow:
        async with self.db.read() as session:
            return await self._tag(session, repo_id, repo_name, name)

    async def _tag(self, session: AsyncSession, repo_id: str, repo_name: str, name: str, lock: bool = False) -> RepoTagRow:
        """The tag; with `lock`, its row is locked until the transaction ends (SELECT ... FOR UPDATE on PostgreSQL,
        whose READ COMMITTED would let two moves read the same old commit; SQLite's writes run one at a time), so
        each move's history event starts where the one before it ended."""
        validate_tag_name(name)
        query = select(RepoTagRow).where(RepoTagRow.repo_id == repo_id, RepoTagRow.name == name)
        tag = (await session.exec(query.with_for_update() if lock else query)).first()
        if tag is None:
            raise NotFound(f"tag {name!r} not found in repository {repo_name!r}")
        return tag

    async def update_tag(
        self,
        caller: Principal,
        repo_id: str,
        repo_name: str,
        name: str,
        commit_id: str | None,
        description: str | None,
        immutable: Sequence[str] = (),
    ) -> RepoTagRow:
        """Move and/or describe a tag in one transaction, with its history event. A tag matching one of the
        repository's `immutable` patterns keeps its commit (its description may change)."""
        if description is not None:
            validate_text("description", description)
        async with self.db.write() as session:
            tag = await self._tag(session, repo_id, repo_name, name, lock=True)
            old = tag.commit_id
            if commit_id is not None and commit_id != old:
                _require_mutable(tag, repo_name, immutable)
            await _require_not_deleted(session, commit_id)
            _change(tag, commit_id, description)
            session.add(tag)
            action = "moved" if commit_id is not None and commit_id != old else "updated"
            await self._record(session, _event(tag, caller, action, old, tag.commit_id))
            _record_tag_change(session, tag, old, tag.commit_id)
            return tag

    async def delete_tag(self, caller: Principal, repo_id: str, repo_name: str, name: str, immutable: Sequence[str] = ()) -> None:
        async with self.db.write() as session:
            tag = await self._tag(session, repo_id, repo_name, name, lock=True)
            _require_mutable(tag, repo_name, immutable)
            await session.delete(tag)
            await self._record(session, _event(tag, caller, "deleted", tag.commit_id, ""))
            _record_tag_change(session, tag, tag.commit_id, "")

    async def history(self, repo_id: str, name: str, offset: int = 0, limit: int | None = None) -> list[TagEventRow]:
        async with self.db.read() as session:
            query = (
                select(TagEventRow).where(TagEventRow.repo_id == repo_id, TagEventRow.tag_name == name).order_by(col(TagEventRow.id).desc())
            )
            return list(await session.exec(query.offset(offset).limit(limit)))

    async def delete_repository_tags(
        self, org_id: str, repo_id: str, repo_name: str = "", immutable: Sequence[str] = (), actor_key_id: str | None = None
    ) -> int:
        """Every tag of a repository, each with its audit entry; refused whole while one matches an `immutable`
        pattern (the registry's deletion of the repository passes none: the repository goes with them).
        Serialized with the org's tag creations, so none slips in between unrecorded."""
        async with self.db.write() as session:
            await serialize(session, f"org:{org_id}")
            # the org's own repository only, whatever id a caller names
            mine = (col(RepoTagRow.repo_id) == repo_id, col(RepoTagRow.org_id) == org_id)
            tags = list(await session.exec(select(RepoTagRow).where(*mine).order_by(RepoTagRow.name)))
            for tag in tags:
                _require_mutable(tag, repo_name, immutable)
            for tag in tags:
                _record_tag_change(session, tag, tag.commit_id, "", actor_key_id)
            await session.exec(delete(RepoTagRow).where(*mine))
            return len(tags)

    @staticmethod
    async def _references(session: AsyncSession, org_id: str, commit_id: str) -> tuple[list[str], list[str]]:
        tags = await session.exec(select(RepoTagRow).where(RepoTagRow.org_id == org_id, RepoTagRow.commit_id == commit_id))
        legacy = await session.exec(select(CommitTagRow.name).where(CommitTagRow.org_id == org_id, CommitTagRow.commit_id == commit_id))
        return sorted(f"{t.repo_name}:{t.name}" for t in tags), sorted(legacy)

    # Legacy commit tags

    async def create_commit_tag(self, org_id: str, name: str, commit_id: str, description: str) -> CommitTagRow:
        validate_tag_name(name)
        validate_text("description", description)
        tag = CommitTagRow(id=str(uuid.uuid4()), org_id=org_id, name=name, commit_id=commit_id, description=description)
        async with self.db.write() as session:
            await _require_not_deleted(session, commit_id)
            await self._require_tag_room(session, org_id)
            await insert_unique(session, tag, f"tag {name!r} already exists in your organization")
            _record_commit_tag_change(session, tag, "", commit_id)
            return tag

    async def list_commit_tags(self, org_id: str, offset: int = 0, limit: int | None = None) -> list[CommitTagRow]:
        async with self.db.read() as session:
            query = select(CommitTagRow).where(CommitTagRow.org_id == org_id).order_by(CommitTagRow.name)
            return list(await session.exec(query.offset(offset).limit(limit)))

    async def get_commit_tag(self, org_id: str, name: str) -> CommitTagRow:
        async with self.db.read() as session:
            return await self._commit_tag(session, org_id, name)

    async def _commit_tag(self, session: AsyncSession, org_id: str, name: str, lock: bool = False) -> CommitTagRow:
        """The legacy tag; with `lock`, its row is locked until the transaction ends (as `_tag`)."""
        validate_tag_name(name)
        query = select(CommitTagRow).where(CommitTagRow.org_id == org_id, CommitTagRow.name == name)
        tag = (await session.exec(query.with_for_update() if lock else query)).first()
        if tag is None:
            raise NotFound(f"tag {name!r} not found in your organization")
        return tag

    async def update_commit_tag(self, org_id: str, name: str, commit_id: str | None, description: str | None) -> CommitTagRow:
        if description is not None:
            validate_text("description", description)
        async with self.db.write() as session:
            tag = await self._commit_tag(session, org_id, name, lock=True)
            await _require_not_deleted(session, commit_id)
            old = tag.commit_id
            _change(tag, commit_id, description)
            session.add(tag)
            _record_commit_tag_change(session, tag, old, tag.commit_id)
            return tag

    async def delete_commit_tag(self, org_id: str, name: str) -> None:
        async with self.db.write() as session:
            tag = await self._commit_tag(session, org_id, name, lock=True)
            await session.delete(tag)
            _record_commit_tag_change(session, tag, tag.commit_id, "")

    # Retention

    async def plan_retention(
        self, org_id: str, repositories: Sequence[governance_pb2.RepositoryRetention]
    ) -> tuple[list[governance_pb2.RetentionCandidate], list[str], list[str]]:
        """The commits the repositories' rules let go, every commit a tag or legacy tag of the org names now,
        and those the keep rules keep. Read in one transaction, so that the histories and the tags agree."""
        async with self.db.read() as session:
            tagged = set(await session.exec(select(RepoTagRow.commit_id).where(RepoTagRow.org_id == org_id)))
            tagged |= set(await session.exec(select(CommitTagRow.commit_id).where(CommitTagRow.org_id == org_id)))
            histories: dict[str, list[TagEventRow]] = {}
            for repository in repositories:
                query = (
                    select(TagEventRow)
                    .where(TagEventRow.repo_id == repository.repo_id, TagEventRow.org_id == org_id)
                    .order_by(col(TagEventRow.id))
                )  # fmt: skip
                histories[repository.repo_id] = list(await session.exec(query))
        return plan_retention(repositories, histories, tagged), sorted(tagged), sorted(kept_by_rules(repositories, histories))

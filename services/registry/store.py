"""Registry data: organisations, API keys (only their hashes are kept), repositories and their policies
(immutable tags, retention), each change with its audit entry in the same transaction."""

from __future__ import annotations

import json
import re
import secrets
import uuid
from dataclasses import dataclass, replace
from typing import Any

from google.protobuf import json_format
from sqlalchemy import func
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from services.common import audit
from services.common.auth import Principal, hash_token
from services.common.db import Database, insert_unique, serialize
from services.common.errors import Conflict, InvalidArgument, NotFound, Unauthenticated
from services.common.names import KEY_LABEL_MAX, validate_label, validate_org_name, validate_repo_name, validate_text
from services.common.quotas import LIMITS, OrgLimits, check
from services.common.timestamps import as_utc, utcnow
from services.registry.models import ApiKeyRow, OrgRow, RepositoryRow, SagaRow
from vers.common.v1 import governance_pb2

TOKEN_PREFIX = "vers_"
FORK = "fork"
REPO_DELETE = "repo_delete"


@dataclass(frozen=True)
class NewKey:
    key: ApiKeyRow
    token: str


@dataclass(frozen=True)
class PublicRepo:
    repo: RepositoryRow
    org_name: str


def _new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


# Repository policies: tag patterns (immutable tags, retention's keep_tags) and retention's numbers.
TAG_PATTERN = re.compile(r"[A-Za-z0-9._\-*?\[\]]{1,64}")
TAG_PATTERN_RULE = "1-64 characters of A-Z, a-z, 0-9, '.', '_', '-' and the wildcards '*', '?' and '[...]'"
MAX_TAG_PATTERNS = 32
MAX_KEEP_LAST = 1000
MAX_RETENTION_DAYS = 36500


def validate_patterns(field: str, patterns: list[str]) -> list[str]:
    """The patterns, each once, in their order; InvalidArgument naming `field` for a bad one."""
    if len(patterns) > MAX_TAG_PATTERNS:
        raise InvalidArgument(f"{field} has {len(patterns)} patterns; at most {MAX_TAG_PATTERNS} are allowed")
    for pattern in patterns:
        if not TAG_PATTERN.fullmatch(pattern):
            raise InvalidArgument(f"{field}: {pattern!r} is not a tag pattern: {TAG_PATTERN_RULE}")
    return list(dict.fromkeys(patterns))


def _validate_range(field: str, value: int, largest: int, unit: str) -> None:
    if not 0 <= value <= largest:
        raise InvalidArgument(f"{field} must be between 0 (off) and {largest} {unit}, not {value}")


def validate_retention(policy: governance_pb2.RetentionPolicy) -> governance_pb2.RetentionPolicy:
    _validate_range("retention.keep_last", policy.keep_last, MAX_KEEP_LAST, "commits")
    _validate_range("retention.untagged_older_than_days", policy.untagged_older_than_days, MAX_RETENTION_DAYS, "days")
    keep_tags = validate_patterns("retention.keep_tags", list(policy.keep_tags))
    return governance_pb2.RetentionPolicy(
        keep_last=policy.keep_last, keep_tags=keep_tags, untagged_older_than_days=policy.untagged_older_than_days
    )


def immutable_tags_of(repo: RepositoryRow) -> list[str]:
    return list(json.loads(repo.immutable_tags or "[]"))


def retention_of(repo: RepositoryRow) -> governance_pb2.RetentionPolicy:
    return json_format.ParseDict(json.loads(repo.retention or "{}"), governance_pb2.RetentionPolicy())


def has_rules(policy: governance_pb2.RetentionPolicy) -> bool:
    return bool(policy.keep_last or policy.keep_tags or policy.untagged_older_than_days)


def _retention_json(policy: governance_pb2.RetentionPolicy) -> dict[str, Any]:
    return json_format.MessageToDict(policy, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def policy_json(repo: RepositoryRow) -> dict[str, Any]:
    """The repository's rules as its audit entries show them."""
    return {"immutable_tags": immutable_tags_of(repo), "retention": _retention_json(retention_of(repo))}


class RegistryStore:
    def __init__(self, db: Database, default_limits: OrgLimits | None = None) -> None:
        self.db = db
        if default_limits is None:
            from services.common.settings import get_settings

            default_limits = OrgLimits.defaults(get_settings())
        self.default_limits = default_limits

    # Limits: the org's own where the administrator set them, else the defaults

    def limits_of(self, org: OrgRow) -> OrgLimits:
        return self.default_limits.replace(**{name: getattr(org, name) for name in LIMITS})

    @staticmethod
    async def _lock_org(session: AsyncSession, org_id: str) -> OrgRow:
        """The org's row, locked until the transaction ends (PostgreSQL; SQLite's writes run one at a time):
        two adds at once are counted one after the other."""
        org = (await session.exec(select(OrgRow).where(OrgRow.id == org_id).with_for_update())).first()
        if org is None:
            raise NotFound(f"organization {org_id!r} not found")
        return org

    async def _count(self, session: AsyncSession, model: Any, org_id: str) -> int:
        return int((await session.exec(select(func.count()).select_from(model).where(model.org_id == org_id))).one())

    async def _require_room(self, session: AsyncSession, org_id: str, model: Any, limit: str) -> None:
        org = await self._lock_org(session, org_id)
        check(self.limits_of(org), limit, await self._count(session, model, org_id), 1, org.name)

    async def org(self, org_ref: str) -> OrgRow:
        """An org by its name or its id."""
        async with self.db.read() as session:
            return await self._org(session, org_ref)

    @staticmethod
    async def _org(session: AsyncSession, org_ref: str) -> OrgRow:
        org = (await session.exec(select(OrgRow).where((OrgRow.name == org_ref) | (OrgRow.id == org_ref)))).first()
        if org is None:
            raise NotFound(f"organization {org_ref!r} not found: vers admin org list shows them")
        return org

    async def set_org_limits(self, org_ref: str, changes: dict[str, int]) -> tuple[OrgRow, OrgLimits]:
        """Set the org's own limits; -1 puts one back to the default."""
        for name, value in changes.items():
            if value < -1:
                raise InvalidArgument(f"{name} must be 0 or more (or -1 for the platform's default), not {value}")
        async with self.db.write() as session:
            org = await self._org(session, org_ref)
            org = await self._lock_org(session, org.id)
            for name, value in changes.items():
                setattr(org, name, None if value == -1 else value)
            session.add(org)
            return org, self.limits_of(org)

    # Retention and garbage collection

    async def org_retention(self, org_id: str) -> int:
        """The org's rule for untagged commits, in days (0: none)."""
        async with self.db.read() as session:
            org = await session.get(OrgRow, org_id)
        if org is None:
            raise NotFound(f"organization {org_id!r} not found")
        return org.untagged_older_than_days

    async def set_org_retention(self, org_id: str, untagged_older_than_days: int) -> int:
        _validate_range("retention.untagged_older_than_days", untagged_older_than_days, MAX_RETENTION_DAYS, "days")
        async with self.db.write() as session:
            org = await self._lock_org(session, org_id)
            before = org.untagged_older_than_days
            org.untagged_older_than_days = untagged_older_than_days
            session.add(org)
            after = {"untagged_older_than_days": untagged_older_than_days}
            audit.record(session, org_id, "retention.set", "org", before={"untagged_older_than_days": before}, after=after)
            return untagged_older_than_days

    async def retention_rules(self, org_id: str) -> tuple[list[governance_pb2.RepositoryRetention], int]:
        """The org's repositories that have retention rules, and the org's own rule (days, 0: none)."""
        async with self.db.read() as session:
            org = await session.get(OrgRow, org_id)
            deleting = await self._being_deleted(session, org_id)
            repos = list(await session.exec(select(RepositoryRow).where(RepositoryRow.org_id == org_id).order_by(RepositoryRow.name)))
        if org is None:
            raise NotFound(f"organization {org_id!r} not found")
        rules = [
            governance_pb2.RepositoryRetention(repo_id=repo.id, repo_name=repo.name, policy=retention_of(repo))
            for repo in repos
            if repo.id not in deleting and has_rules(retention_of(repo))
        ]
        return rules, org.untagged_older_than_days

    async def orgs_with_rules(self) -> list[str]:
        """Ids of the orgs with a retention rule of their own or on one of their repositories."""
        async with self.db.read() as session:
            orgs = set(await session.exec(select(OrgRow.id).where(OrgRow.untagged_older_than_days > 0)))
            for org_id, retention in await session.exec(select(RepositoryRow.org_id, RepositoryRow.retention)):
                if org_id not in orgs and has_rules(json_format.ParseDict(json.loads(retention or "{}"), governance_pb2.RetentionPolicy())):
                    orgs.add(org_id)
        return sorted(orgs)

    async def record_collection(self, org_id: str, commit_ids: list[str], bytes_freed: int) -> None:
        async with self.db.write() as session:
            audit.record(session, org_id, "gc", "org", after={"commits": commit_ids, "bytes_freed": bytes_freed})

    async def service_principal(self, principal: Principal) -> Principal:
        """A service token's principal with its org's name and limits."""
        async with self.db.read() as session:
            org = await session.get(OrgRow, principal.org_id)
        if org is None:
            raise Unauthenticated(f"organization {principal.org_id} no longer exists")
        return replace(principal, org_name=org.name, limits=self.limits_of(org))

    # Organisations and keys

    async def resolve(self, token: str) -> Principal:
        async with self.db.read() as session:
            row = (
                await session.exec(
                    select(ApiKeyRow, OrgRow)
                    .join(OrgRow, col(OrgRow.id) == col(ApiKeyRow.org_id))
                    .where(ApiKeyRow.token_hash == hash_token(token))
                )
            ).first()
        if row is None:
            raise Unauthenticated("invalid or revoked API key")
        key, org = row
        if key.expires_at is not None and as_utc(key.expires_at) <= utcnow():
            raise Unauthenticated("this API key has expired")
        return Principal(org.id, org.name, key.id, key.label, key.is_admin, token, limits=self.limits_of(org))

    async def create_org(self, name: str, key_label: str = "default") -> tuple[OrgRow, NewKey]:
        validate_org_name(name)
        async with self.db.write() as session:
            org = OrgRow(id=str(uuid.uuid4()), name=name)
            await insert_unique(session, org, f"organization {name!r} already exists: choose another name")
            return org, await self._add_key(session, org.id, key_label, is_admin=False)

    async def ensure_org(self, name: str) -> OrgRow:
        async with self.db.write() as session:
            await serialize(session, f"org-name:{name}")  # replicas starting at once on PostgreSQL: one makes it, the others read it
            org = (await session.exec(select(OrgRow).where(OrgRow.name == name))).first()
            if org is None:
                org = OrgRow(id=str(uuid.uuid4()), name=name)
                await insert_unique(session, org, f"organization {name!r} already exists")
            return org

    async def list_orgs(self, offset: int = 0, limit: int | None = None) -> list[OrgRow]:
        async with self.db.read() as session:
            return list(await session.exec(select(OrgRow).order_by(OrgRow.name).offset(offset).limit(limit)))

    async def create_api_key(self, org_id: str, label: str, *, is_admin: bool = False, token: str = "") -> NewKey:
        """A new key; within the org's limit, except the administrator's own (made by the platform). `token`: the
        key's value when the operator chose it (VERS_ADMIN_KEY), else a new random one."""
        validate_label("label", label, KEY_LABEL_MAX)
        async with self.db.write() as session:
            if not is_admin:
                await self._require_room(session, org_id, ApiKeyRow, "max_api_keys")
            return await self._add_key(session, org_id, label, is_admin=is_admin, token=token)

    async def revoke_admin_keys(self, org_id: str, keep_key_id: str) -> int:
        """Every administrator key of the org but `keep_key_id` revoked; how many were."""
        async with self.db.write() as session:
            query = select(ApiKeyRow).where(ApiKeyRow.org_id == org_id, col(ApiKeyRow.is_admin).is_(True), ApiKeyRow.id != keep_key_id)
            revoked = list(await session.exec(query))
            for key in revoked:
                await session.delete(key)
                audit.record(session, org_id, "key.revoke", key.id, before={"label": key.label, "is_admin": key.is_admin})
            return len(revoked)

    async def _add_key(self, session: AsyncSession, org_id: str, label: str, *, is_admin: bool, token: str = "") -> NewKey:
        token = token or _new_token()
        key = ApiKeyRow(id=str(uuid.uuid4()), org_id=org_id, label=label, token_hash=hash_token(token), is_admin=is_admin)
        await insert_unique(session, key, "API key collision; try again")
        audit.record(session, org_id, "key.create", key.id, after={"label": label, "is_admin": is_admin})
        return NewKey(key, token)

    async def get_api_key(self, key_id: str) -> tuple[ApiKeyRow, OrgRow]:
        async with self.db.read() as session:
            key = await session.get(ApiKeyRow, key_id)
            org = await session.get(OrgRow, key.org_id) if key else None
        if key is None or org is None:
            raise Unauthenticated("this API key was revoked")
        return key, org

    async def list_api_keys(self, org_id: str, offset: int = 0, limit: int | None = None) -> list[ApiKeyRow]:
        async with self.db.read() as session:
            query = select(ApiKeyRow).where(ApiKeyRow.org_id == org_id).order_by(col(ApiKeyRow.created_at), col(ApiKeyRow.id))
            return list(await session.exec(query.offset(offset).limit(limit)))

    async def delete_api_key(self, org_id: str, key_id: str) -> None:
        async with self.db.write() as session:
            key = await session.get(ApiKeyRow, key_id)
            if key is None or key.org_id != org_id:
                raise NotFound(f"API key {key_id!r} not found in your organization")
            await session.delete(key)
            audit.record(session, org_id, "key.revoke", key.id, before={"label": key.label, "is_admin": key.is_admin})

    # Repositories of one org

    async def create_repository(
        self, org_id: str, name: str, description: str,
        immutable_tags: list[str] | None = None, retention: governance_pb2.RetentionPolicy | None = None,
    ) -> RepositoryRow:  # fmt: skip
        validate_repo_name(name)
        validate_text("description", description)
        patterns = validate_patterns("immutable_tags", immutable_tags or [])
        rules = validate_retention(retention or governance_pb2.RetentionPolicy())
        async with self.db.write() as session:
            await self._require_room(session, org_id, RepositoryRow, "max_repositories")
            repo = RepositoryRow(
                id=str(uuid.uuid4()), org_id=org_id, name=name, description=description,
                immutable_tags=json.dumps(patterns), retention=json.dumps(_retention_json(rules)),
            )  # fmt: skip
            await insert_unique(session, repo, f"repository {name!r} already exists in your organization")
            audit.record(session, org_id, "repository.create", name, after={"repo_id": repo.id, "is_public": False, **policy_json(repo)})
            return repo

    async def set_policy(
        self, org_id: str, name: str, immutable_tags: list[str] | None, retention: governance_pb2.RetentionPolicy | None
    ) -> RepositoryRow:
        """Replace the immutable tag patterns and the retention rules that are given (None: unchanged)."""
        patterns = validate_patterns("immutable_tags", immutable_tags) if immutable_tags is not None else None
        rules = validate_retention(retention) if retention is not None else None
        async with self.db.write() as session:
            await serialize(session, f"repository:{org_id}:{name}")
            repo = await self._repository(session, org_id, name)
            before = policy_json(repo)
            if patterns is not None:
                repo.immutable_tags = json.dumps(patterns)
            if rules is not None:
                repo.retention = json.dumps(_retention_json(rules))
            session.add(repo)
            audit.record(session, org_id, "repository.policy", name, before=before, after=policy_json(repo))
            return repo

    async def list_repositories(self, org_id: str, offset: int = 0, limit: int | None = None) -> list[RepositoryRow]:
        async with self.db.read() as session:
            deleting = await self._being_deleted(session, org_id)
            query = (
                select(RepositoryRow)
                .where(RepositoryRow.org_id == org_id, col(RepositoryRow.id).not_in(deleting))
                .order_by(RepositoryRow.name)
            )
            return list(await session.exec(query.offset(offset).limit(limit)))

    async def require_repository_room(self, org_id: str, name: str) -> None:
        """Before a fork: a repository it would make fits in the org's limit (checked again as it is made)."""
        async with self.db.read() as session:
            query = select(RepositoryRow.id).where(RepositoryRow.org_id == org_id, RepositoryRow.name == name)
            if (await session.exec(query)).first() is not None:
                return
            org = await session.get(OrgRow, org_id)
            if org is not None:
                check(self.limits_of(org), "max_repositories", await self._count(session, RepositoryRow, org_id), 1, org.name)

    async def get_repository(self, org_id: str, name: str) -> RepositoryRow:
        """The org's repository; NotFound once its deletion has begun (the services finishing it use its id)."""
        async with self.db.read() as session:
            return await self._repository(session, org_id, name)

    async def set_visibility(self, org_id: str, name: str, is_public: bool, forced: dict[str, Any] | None = None) -> RepositoryRow:
        """`forced`: what the secret scan found that publishing goes past (recorded as a forced publish)."""
        async with self.db.write() as session:
            repo = await self._repository(session, org_id, name)
            before = repo.is_public
            repo.is_public = is_public
            session.add(repo)
            if before != is_public:
                audit.record(session, org_id, "repository.visibility", name, before={"is_public": before}, after={"is_public": is_public})
            if forced is not None:
                audit.record(session, org_id, "publish.forced", name, after=forced)
            return repo

    async def _repository(self, session: AsyncSession, org_id: str, name: str) -> RepositoryRow:
        validate_repo_name(name)
        query = select(RepositoryRow).where(RepositoryRow.org_id == org_id, RepositoryRow.name == name)
        repo = (await session.exec(query)).first()
        if repo is None:
            raise NotFound(f"repository {name!r} not found in your organization")
        if repo.id in await self._being_deleted(session, org_id):
            raise NotFound(f"repository {name!r} is being deleted")
        return repo

    @staticmethod
    async def _being_deleted(session: AsyncSession, org_id: str | None = None) -> set[str]:
        """Ids of the repositories whose deletion has begun: no one sees them any more, nor adds to them."""
        query = select(SagaRow).where(SagaRow.kind == REPO_DELETE)
        if org_id is not None:
            query = query.where(SagaRow.org_id == org_id)
        return {json.loads(saga.payload)["repository_id"] for saga in await session.exec(query)}

    # Public discovery across orgs

    async def list_public_repositories(self, offset: int = 0, limit: int | None = None) -> list[PublicRepo]:
        async with self.db.read() as session:
            deleting = await self._being_deleted(session)
            rows = await session.exec(
                select(RepositoryRow, OrgRow.name)
                .join(OrgRow, col(OrgRow.id) == col(RepositoryRow.org_id))
                .where(col(RepositoryRow.is_public).is_(True), col(RepositoryRow.id).not_in(deleting))
                .order_by(OrgRow.name, RepositoryRow.name)
                .offset(offset)
                .limit(limit)
            )
            return [PublicRepo(repo, org_name) for repo, org_name in rows]

    async def get_public_repository(self, org_name: str, name: str) -> PublicRepo:
        async with self.db.read() as session:
            row = (
                await session.exec(
                    select(RepositoryRow)
                    .join(OrgRow, col(OrgRow.id) == col(RepositoryRow.org_id))
                    .where(OrgRow.name == org_name, RepositoryRow.name == name, col(RepositoryRow.is_public).is_(True))
                )
            ).first()
            if row is not None and row.id in await self._being_deleted(session, row.org_id):
                row = None
        if row is None:
            # The same answer for a private repository as for a missing one, so private names do not leak.
            raise NotFound(f"public repository '{org_name}/{name}' not found")
        return PublicRepo(row, org_name)

    # Sagas: changes across services, recorded step by step (see services/registry/sagas.py)

    async def begin_saga(self, kind: str, org_id: str, step: str, payload: dict[str, Any]) -> SagaRow:
        async with self.db.write() as session:
            saga = SagaRow(id=str(uuid.uuid4()), kind=kind, org_id=org_id, step=step, payload=json.dumps(payload))
            session.add(saga)
            return saga

    async def advance_saga(self, saga_id: str, step: str, **made: Any) -> SagaRow:
        """The saga's next step, and what the last one made, added to its payload."""
        async with self.db.write() as session:
            return await self._advance(session, saga_id, step, made)

    @staticmethod
    async def _advance(session: AsyncSession, saga_id: str, step: str, made: dict[str, Any]) -> SagaRow:
        saga = await session.get(SagaRow, saga_id)
        if saga is None:
            raise NotFound(f"saga {saga_id} not found")
        saga.step = step
        saga.payload = json.dumps({**json.loads(saga.payload), **made})
        session.add(saga)
        return saga

    async def saga(self, saga_id: str) -> SagaRow | None:
        async with self.db.read() as session:
            return await session.get(SagaRow, saga_id)

    async def sagas(self) -> list[SagaRow]:
        async with self.db.read() as session:
            return list(await session.exec(select(SagaRow).order_by(col(SagaRow.created_at))))

    async def end_saga(self, saga_id: str) -> None:
        async with self.db.write() as session:
            if (saga := await session.get(SagaRow, saga_id)) is not None:
                await session.delete(saga)

    async def finish_fork(self, saga_id: str) -> None:
        """A fork that landed: its saga goes and its audit entry comes, together."""
        async with self.db.write() as session:
            saga = await session.get(SagaRow, saga_id)
            if saga is None:
                return
            made = json.loads(saga.payload)
            target = f"{made['source_org']}/{made['source_repo']}:{made['source_tag']} -> {made['repo_name']}:{made['tag_name']}"
            audit.record(
                session, saga.org_id, "fork", target, after={"vm_id": made.get("vm_id", ""), "commit_id": made.get("commit_id", "")}
            )
            await session.delete(saga)

    async def fork_repository(self, saga_id: str, org_id: str, name: str) -> SagaRow:
        """The fork's repository, made or reused, noted in its saga in the same transaction (whether it was
        made here says whether an undo may remove it). Refused while the repository is being deleted."""
        validate_repo_name(name)
        async with self.db.write() as session:
            await serialize(session, f"repository:{org_id}:{name}")
            query = select(RepositoryRow).where(RepositoryRow.org_id == org_id, RepositoryRow.name == name)
            repo = (await session.exec(query)).first()
            created = repo is None
            if repo is None:
                await self._require_room(session, org_id, RepositoryRow, "max_repositories")
                repo = RepositoryRow(id=str(uuid.uuid4()), org_id=org_id, name=name, description="")
                try:
                    async with session.begin_nested():
                        session.add(repo)
                except IntegrityError:  # made by a concurrent fork in between (PostgreSQL): reused
                    repo, created = (await session.exec(query)).one(), False
            elif repo.id in await self._being_deleted(session, org_id):
                raise Conflict(f"repository {name!r} is being deleted: fork again once it is gone, or pick another repo_name")
            return await self._advance(session, saga_id, "repository", {"repository_id": repo.id, "repository_created": created})

    async def hide_fork_repository(self, saga_id: str, org_id: str, repo_id: str) -> SagaRow | None:
        """First step of undoing a fork's repository: hidden, as a repository being deleted is (no tag can be
        added from then on), unless another fork in flight targets it. The hiding row is a repository delete
        marked as a fork's undo, so a crash after it is settled the same way. None when it stays."""
        async with self.db.write() as session:
            repo = await session.get(RepositoryRow, repo_id)
            if repo is None:
                return None
            await serialize(session, f"repository:{org_id}:{repo.name}")
            hiding = await session.exec(select(SagaRow).where(SagaRow.kind == REPO_DELETE, SagaRow.org_id == org_id))
            for row in hiding:
                payload = json.loads(row.payload)
                if payload["repository_id"] == repo_id:
                    # this undo's own row, from before a crash; a person's delete of it is theirs to finish
                    return row if payload.get("fork_undo") else None
            others = await session.exec(select(SagaRow).where(SagaRow.kind == FORK, SagaRow.org_id == org_id, SagaRow.id != saga_id))
            if any(json.loads(other.payload)["repo_name"] == repo.name for other in others):
                return None
            payload = {"repository_id": repo.id, "repo_name": repo.name, "fork_undo": True}
            saga = SagaRow(id=str(uuid.uuid4()), kind=REPO_DELETE, org_id=org_id, step="started", payload=json.dumps(payload))
            session.add(saga)
            return saga

    async def repository_exists(self, repo_id: str) -> bool:
        async with self.db.read() as session:
            return await session.get(RepositoryRow, repo_id) is not None

    async def begin_repository_deletion(self, org_id: str, name: str, actor_key_id: str = "") -> SagaRow:
        """From here on the repository is hidden and refused to all but the services deleting its tags.
        `actor_key_id`: the person's key its tags' deletions are recorded under."""
        async with self.db.write() as session:
            await serialize(session, f"repository:{org_id}:{name}")
            repo = await self._repository(session, org_id, name)
            # A fork that made or chose this repository (in a transaction serialized with this one) tags it next:
            # deleted now, the tag would be left on a repository that is gone.
            forks = await session.exec(select(SagaRow).where(SagaRow.org_id == org_id, SagaRow.kind == FORK))
            if any(json.loads(fork.payload).get("repository_id") == repo.id for fork in forks):
                raise Conflict(f"a fork into repository {name!r} is under way: delete the repository once it has landed")
            payload = {"repository_id": repo.id, "repo_name": repo.name, "actor_key_id": actor_key_id}
            saga = SagaRow(id=str(uuid.uuid4()), kind=REPO_DELETE, org_id=org_id, step="started", payload=json.dumps(payload))
            session.add(saga)
            # Recorded here, where the caller's decision is made: from this row on the deletion only goes forward.
            audit.record(
                session, org_id, "repository.delete", name, before={"repo_id": repo.id, "is_public": repo.is_public, **policy_json(repo)}
            )
            return saga

    async def finish_repository_deletion(self, saga_id: str, repo_id: str) -> None:
        """The repository's row and its saga go together."""
        async with self.db.write() as session:
            if (repo := await session.get(RepositoryRow, repo_id)) is not None:
                await session.delete(repo)
            if (saga := await session.get(SagaRow, saga_id)) is not None:
                await session.delete(saga)

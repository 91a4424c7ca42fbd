"""Registry data: organisations, API keys (only their hashes are kept) and repositories."""

from __future__ import annotations

import json
import secrets
import uuid
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import func
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from services.common.auth import Principal, hash_token
from services.common.db import Database, insert_unique, serialize
from services.common.errors import Conflict, InvalidArgument, NotFound, Unauthenticated
from services.common.names import KEY_LABEL_MAX, validate_label, validate_org_name, validate_repo_name, validate_text
from services.common.quotas import LIMITS, OrgLimits, check
from services.common.timestamps import as_utc, utcnow
from services.registry.models import ApiKeyRow, OrgRow, RepositoryRow, SagaRow

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
            org = (await session.exec(select(OrgRow).where(OrgRow.name == name))).first()
            if org is None:
                org = OrgRow(id=str(uuid.uuid4()), name=name)
                await insert_unique(session, org, f"organization {name!r} already exists")
            return org

    async def list_orgs(self, offset: int = 0, limit: int | None = None) -> list[OrgRow]:
        async with self.db.read() as session:
            return list(await session.exec(select(OrgRow).order_by(OrgRow.name).offset(offset).limit(limit)))

    async def create_api_key(self, org_id: str, label: str, *, is_admin: bool = False) -> NewKey:
        """A new key; within the org's limit, except the administrator's own (made by the platform)."""
        validate_label("label", label, KEY_LABEL_MAX)
        async with self.db.write() as session:
            if not is_admin:
                await self._require_room(session, org_id, ApiKeyRow, "max_api_keys")
            return await self._add_key(session, org_id, label, is_admin=is_admin)

    async def revoke_admin_keys(self, org_id: str, keep_key_id: str) -> int:
        """Every administrator key of the org but `keep_key_id` revoked; how many were."""
        async with self.db.write() as session:
            query = select(ApiKeyRow).where(ApiKeyRow.org_id == org_id, col(ApiKeyRow.is_admin).is_(True), ApiKeyRow.id != keep_key_id)
            revoked = list(await session.exec(query))
            for key in revoked:
                await session.delete(key)
            return len(revoked)

    async def _add_key(self, session: AsyncSession, org_id: str, label: str, *, is_admin: bool) -> NewKey:
        token = _new_token()
        key = ApiKeyRow(id=str(uuid.uuid4()), org_id=org_id, label=label, token_hash=hash_token(token), is_admin=is_admin)
        await insert_unique(session, key, "API key collision; try again")
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
            query = select(ApiKeyRow).where(ApiKeyRow.org_id == org_id).order_by(ApiKeyRow.created_at, ApiKeyRow.id)
            return list(await session.exec(query.offset(offset).limit(limit)))

    async def delete_api_key(self, org_id: str, key_id: str) -> None:
        async with self.db.write() as session:
            key = await session.get(ApiKeyRow, key_id)
            if key is None or key.org_id != org_id:
                raise NotFound(f"API key {key_id!r} not found in your organization")
            await session.delete(key)

    # Repositories of one org

    async def create_repository(self, org_id: str, name: str, description: str) -> RepositoryRow:
        validate_repo_name(name)
        validate_text("description", description)
        async with self.db.write() as session:
            await self._require_room(session, org_id, RepositoryRow, "max_repositories")
            repo = RepositoryRow(id=str(uuid.uuid4()), org_id=org_id, name=name, description=description)
            await insert_unique(session, repo, f"repository {name!r} already exists in your organization")
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

    async def get_repository(self, org_id: str, name: str, *, being_deleted: bool = False) -> RepositoryRow:
        """With `being_deleted`, also one whose deletion has begun (the services finishing it see it)."""
        async with self.db.read() as session:
            return await self._repository(session, org_id, name, being_deleted=being_deleted)

    async def set_visibility(self, org_id: str, name: str, is_public: bool) -> RepositoryRow:
        async with self.db.write() as session:
            repo = await self._repository(session, org_id, name)
            repo.is_public = is_public
            session.add(repo)
            return repo

    async def _repository(self, session: AsyncSession, org_id: str, name: str, *, being_deleted: bool = False) -> RepositoryRow:
        validate_repo_name(name)
        query = select(RepositoryRow).where(RepositoryRow.org_id == org_id, RepositoryRow.name == name)
        repo = (await session.exec(query)).first()
        if repo is None:
            raise NotFound(f"repository {name!r} not found in your organization")
        if not being_deleted and repo.id in await self._being_deleted(session, org_id):
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

    async def begin_repository_deletion(self, org_id: str, name: str) -> SagaRow:
        """From here on the repository is hidden and refused to all but the services deleting its tags."""
        async with self.db.write() as session:
            await serialize(session, f"repository:{org_id}:{name}")
            repo = await self._repository(session, org_id, name)
            payload = {"repository_id": repo.id, "repo_name": repo.name}
            saga = SagaRow(id=str(uuid.uuid4()), kind=REPO_DELETE, org_id=org_id, step="started", payload=json.dumps(payload))
            session.add(saga)
            return saga

    async def finish_repository_deletion(self, saga_id: str, repo_id: str) -> None:
        """The repository's row and its saga go together."""
        async with self.db.write() as session:
            if (repo := await session.get(RepositoryRow, repo_id)) is not None:
                await session.delete(repo)
            if (saga := await session.get(SagaRow, saga_id)) is not None:
                await session.delete(saga)


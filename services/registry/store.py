"""Registry data: organisations, API keys (only their hashes are kept) and repositories."""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass

from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from services.common.auth import Principal, hash_token
from services.common.db import Database, insert_unique
from services.common.errors import NotFound, Unauthenticated
from services.common.names import validate_org_name, validate_repo_name
from services.common.timestamps import as_utc, utcnow
from services.registry.models import ApiKeyRow, OrgRow, RepositoryRow

TOKEN_PREFIX = "vers_"


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
    def __init__(self, db: Database) -> None:
        self.db = db

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
        return Principal(org.id, org.name, key.id, key.label, key.is_admin, token)

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

    async def list_orgs(self) -> list[OrgRow]:
        async with self.db.read() as session:
            return list(await session.exec(select(OrgRow).order_by(OrgRow.name)))

    async def create_api_key(self, org_id: str, label: str, *, is_admin: bool = False) -> NewKey:
        async with self.db.write() as session:
            return await self._add_key(session, org_id, label, is_admin=is_admin)

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

    async def list_api_keys(self, org_id: str) -> list[ApiKeyRow]:
        async with self.db.read() as session:
            query = select(ApiKeyRow).where(ApiKeyRow.org_id == org_id).order_by(ApiKeyRow.created_at)
            return list(await session.exec(query))

    async def delete_api_key(self, org_id: str, key_id: str) -> None:
        async with self.db.write() as session:
            key = await session.get(ApiKeyRow, key_id)
            if key is None or key.org_id != org_id:
                raise NotFound(f"API key {key_id!r} not found in your organization")
            await session.delete(key)

    # Repositories of one org

    async def create_repository(self, org_id: str, name: str, description: str) -> RepositoryRow:
        validate_repo_name(name)
        async with self.db.write() as session:
            repo = RepositoryRow(id=str(uuid.uuid4()), org_id=org_id, name=name, description=description)
            await insert_unique(session, repo, f"repository {name!r} already exists in your organization")
            return repo

    async def list_repositories(self, org_id: str) -> list[RepositoryRow]:
        async with self.db.read() as session:
            query = select(RepositoryRow).where(RepositoryRow.org_id == org_id).order_by(RepositoryRow.name)
            return list(await session.exec(query))

    async def get_repository(self, org_id: str, name: str) -> RepositoryRow:
        async with self.db.read() as session:
            return await self._repository(session, org_id, name)

    async def delete_repository(self, org_id: str, name: str) -> RepositoryRow:
        async with self.db.write() as session:
            repo = await self._repository(session, org_id, name)
            await session.delete(repo)
            return repo

    async def set_visibility(self, org_id: str, name: str, is_public: bool) -> RepositoryRow:
        async with self.db.write() as session:
            repo = await self._repository(session, org_id, name)
            repo.is_public = is_public
            session.add(repo)
            return repo

    async def _repository(self, session: AsyncSession, org_id: str, name: str) -> RepositoryRow:
        validate_repo_name(name)
        query = select(RepositoryRow).where(RepositoryRow.org_id == org_id, RepositoryRow.name == name)
        repo = (await session.exec(query)).first()
        if repo is None:
            raise NotFound(f"repository {name!r} not found in your organization")
        return repo

    # Public discovery across orgs

    async def list_public_repositories(self) -> list[PublicRepo]:
        async with self.db.read() as session:
            rows = await session.exec(
                select(RepositoryRow, OrgRow.name)
                .join(OrgRow, col(OrgRow.id) == col(RepositoryRow.org_id))
                .where(col(RepositoryRow.is_public).is_(True))
                .order_by(OrgRow.name, RepositoryRow.name)
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
        if row is None:
            # The same answer for a private repository as for a missing one, so private names do not leak.
            raise NotFound(f"public repository '{org_name}/{name}' not found")
        return PublicRepo(row, org_name)


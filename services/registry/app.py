from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from services.common.db import Database
from services.common.errors import Unauthenticated
from services.common.files import write_atomic
from services.common.migrations import migrate
from services.common.peers import Peers
from services.common.quotas import OrgLimits
from services.common.server import Service
from services.common.settings import Settings
from services.registry.sagas import Sagas, reason
from services.registry.servicer import RegistryServicer
from services.registry.store import TOKEN_PREFIX, RegistryStore
from vers.registry.v1 import registry_pb2, registry_pb2_grpc

log = logging.getLogger(__name__)

# The org that publishes the supported images; the administrator's key belongs to it.
PLATFORM_ORG = "vers"


async def ensure_admin_key(store: RegistryStore, platform_org_id: str, key_file: Path) -> None:
    """Make sure `key_file` holds a working administrator key, creating one on the first start. A new key
    (the file was missing or held an unknown key) revokes every other administrator key: the file is the
    one credential, so a key copied away before it was replaced stops working."""
    if key_file.exists():
        try:
            if (await store.resolve(key_file.read_text().strip())).is_admin:
                return
        except Unauthenticated:
            log.warning("%s holds an unknown key; writing a new administrator key", key_file)
    new_key = await store.create_api_key(platform_org_id, "platform administrator", is_admin=True)
    write_atomic(key_file, new_key.token + "\n", 0o600)
    revoked = await store.revoke_admin_keys(platform_org_id, keep_key_id=new_key.key.id)
    log.info("administrator key written to %s%s", key_file, f"; {revoked} earlier administrator keys revoked" if revoked else "")


# An administrator key the operator gives (VERS_ADMIN_KEY) is at least this long after its prefix, as a made one is.
GIVEN_ADMIN_KEY_MIN_CHARS = 32


async def ensure_given_admin_key(store: RegistryStore, platform_org_id: str, token: str) -> None:
    """Make `token` (VERS_ADMIN_KEY) the administrator key: recorded (its hash) when the registry does not know it
    yet, and every other administrator key revoked, so that a key changed in the operator's secret store replaces
    the old one at the next start. No file is written."""
    if not token.startswith(TOKEN_PREFIX) or len(token) < len(TOKEN_PREFIX) + GIVEN_ADMIN_KEY_MIN_CHARS:
        raise ValueError(
            f'VERS_ADMIN_KEY must be "{TOKEN_PREFIX}" followed by at least {GIVEN_ADMIN_KEY_MIN_CHARS} random characters: '
            f"""make one with python3 -c 'import secrets; print("{TOKEN_PREFIX}" + secrets.token_urlsafe(32))'"""
        )
    try:
        known = await store.resolve(token)
    except Unauthenticated:
        key_id = (await store.create_api_key(platform_org_id, "platform administrator", is_admin=True, token=token)).key.id
        log.info("administrator key from VERS_ADMIN_KEY recorded")
    else:
        if not known.is_admin:
            raise ValueError(f"VERS_ADMIN_KEY is an API key of organization {known.org_name!r}: give the administrator a key of its own")
        key_id = known.key_id
    revoked = await store.revoke_admin_keys(platform_org_id, keep_key_id=key_id)
    if revoked:
        log.info("%d earlier administrator key(s) revoked: VERS_ADMIN_KEY is the administrator key", revoked)


class ScheduledCollection:
    """Every `interval` seconds (0: never), the platform applies the retention rules of every org that has
    any, as itself (its audit entries name no key). One org's failure is logged and the others go on."""

    def __init__(self, store: RegistryStore, sagas: Sagas, interval: float) -> None:
        self.store = store
        self.sagas = sagas
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.interval > 0:
            self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.run_once()
            except Exception as error:
                log.warning("scheduled garbage collection could not run: %s", reason(error))

    async def run_once(self) -> None:
        for org_id in await self.store.orgs_with_rules():
            try:
                collected = await self.sagas.collect_garbage(org_id, dry_run=False)
            except Exception as error:
                log.warning("scheduled garbage collection of org %s failed: %s", org_id, reason(error))
                continue
            if collected.commits:
                log.info("scheduled garbage collection of org %s: %d commit(s) deleted, %d bytes freed",
                         org_id, len(collected.commits), collected.bytes_freed)  # fmt: skip

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None


async def build(settings: Settings) -> Service:
    db = Database(settings.database_url("registry"))
    await migrate(db, "registry")
    store = RegistryStore(db, OrgLimits.defaults(settings))
    platform_org = await store.ensure_org(PLATFORM_ORG)
    if settings.admin_key:
        await ensure_given_admin_key(store, platform_org.id, settings.admin_key)
    else:
        await ensure_admin_key(store, platform_org.id, settings.admin_key_file)
    peers = Peers(settings)
    sagas = Sagas(store, peers.channel("tagging"), peers.channel("orchestrator"), peers.credential)
    # Read before the first call is served, so only sagas a stop or crash cut short are settled.
    sagas.recover(await store.sagas())
    resolver = peers.resolver_over(store)
    servicer = RegistryServicer(
        store, peers.channel("tagging"), peers.channel("orchestrator"), peers.credential, sagas, resolver.forget_key
    )
    collection = ScheduledCollection(store, sagas, settings.gc_interval_seconds)
    collection.start()
    return Service(
        name="registry",
        service_names=[registry_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name],
        register=lambda server: registry_pb2_grpc.add_RegistryServiceServicer_to_server(servicer, server),
        resolver=resolver,
        on_close=[db.close, peers.close, sagas.close, collection.close],
    )

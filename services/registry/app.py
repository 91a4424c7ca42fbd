from __future__ import annotations

import logging
from pathlib import Path

from services.common.db import Database
from services.common.files import write_atomic
from services.common.errors import Unauthenticated
from services.common.peers import Peers
from services.common.quotas import OrgLimits
from services.common.server import Service
from services.common.settings import Settings
from services.registry.models import TABLES
from services.registry.sagas import Sagas
from services.registry.servicer import RegistryServicer
from services.registry.store import RegistryStore
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


async def build(settings: Settings) -> Service:
    db = Database(settings.database_url("registry"))
    await db.create_tables(TABLES)
    store = RegistryStore(db, OrgLimits.defaults(settings))
    platform_org = await store.ensure_org(PLATFORM_ORG)
    await ensure_admin_key(store, platform_org.id, settings.admin_key_file)
    peers = Peers(settings)
    sagas = Sagas(store, peers.channel("tagging"), peers.channel("orchestrator"), peers.credential)
    # Read before the first call is served, so only sagas a stop or crash cut short are settled.
    sagas.recover(await store.sagas())
    servicer = RegistryServicer(store, peers.channel("tagging"), sagas)
    return Service(
        name="registry",
        service_names=[registry_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name],
        register=lambda server: registry_pb2_grpc.add_RegistryServiceServicer_to_server(servicer, server),
        resolver=peers.resolver_over(store),
        on_close=[db.close, peers.close, sagas.close],
    )

"""Channels to the other services, opened on first use, and the token resolver that uses the registry."""

from __future__ import annotations

from functools import cached_property

import grpc

from services.common.auth import CachedResolver, RegistryResolver, ServiceAwareResolver, ServiceCredential, TokenResolver
from services.common.settings import Settings


class Peers:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._channels: dict[str, grpc.aio.Channel] = {}

    @cached_property
    def credential(self) -> ServiceCredential:
        return ServiceCredential.load(self._settings.service_secret, self._settings.service_secret_file)

    @cached_property
    def resolver(self) -> ServiceAwareResolver:
        return self.resolver_over(RegistryResolver(self.channel("registry")))

    def resolver_over(self, inner: TokenResolver) -> ServiceAwareResolver:
        """Service tokens checked here; other tokens resolved by `inner`, each trusted for a few seconds."""
        return ServiceAwareResolver(CachedResolver(inner, self._settings.auth_cache_seconds), self.credential)

    def channel(self, service: str) -> grpc.aio.Channel:
        if service not in self._channels:
            self._channels[service] = grpc.aio.insecure_channel(self._settings.addr(service))
        return self._channels[service]

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()

"""Channels to the other services, opened on first use, and the token resolver that uses the registry."""

from __future__ import annotations

from functools import cached_property

import grpc

from services.common.auth import CachedResolver, RegistryResolver
from services.common.settings import Settings


class Peers:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._channels: dict[str, grpc.aio.Channel] = {}

    @cached_property
    def resolver(self) -> CachedResolver:
        return CachedResolver(RegistryResolver(self.channel("registry")), self._settings.auth_cache_seconds)

    def channel(self, service: str) -> grpc.aio.Channel:
        if service not in self._channels:
            self._channels[service] = grpc.aio.insecure_channel(self._settings.addr(service))
        return self._channels[service]

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()

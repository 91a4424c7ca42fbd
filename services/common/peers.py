"""Channels to the other services, opened on first use, and the token resolver that uses the registry.

Every channel of the platform (peers, the gateway's) is opened by `open_channel`: TLS when the services
listen with it, messages as large as the gateway lets a request body become, and a deadline on every
unary call that brings none of its own."""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any

import grpc

from services.common.auth import CachedResolver, RegistryResolver, ServiceAwareResolver, ServiceCredential, TokenResolver
from services.common.settings import Settings

# JSON becomes at most about 3.4 times as many protobuf bytes (`-1,` is a 10-byte varint), and a few
# fields and the gRPC frame come on top: a body the gateway accepts always fits.
JSON_TO_PROTOBUF_GROWTH = 4
FRAMING_HEADROOM = 1024 * 1024
# gRPC's own default, kept as the floor when VERS_HTTP_MAX_BODY_BYTES is small.
GRPC_DEFAULT_MESSAGE_BYTES = 4 * 1024 * 1024
# Deadlines of the calls that take longer than VERS_RPC_TIMEOUT_SECONDS by nature: a publish's secret scan
# of every commit a repository's tags name (about 2 s a GiB), a collection's deletions.
SCAN_TIMEOUT = 600.0
COLLECT_TIMEOUT = 600.0


def max_message_bytes(settings: Settings) -> int:
    """The largest message any service or client of the platform sends or receives."""
    return max(GRPC_DEFAULT_MESSAGE_BYTES, settings.http_max_body_bytes * JSON_TO_PROTOBUF_GROWTH + FRAMING_HEADROOM)


def message_size_options(settings: Settings) -> list[tuple[str, Any]]:
    limit = max_message_bytes(settings)
    return [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]


def client_credentials(settings: Settings) -> grpc.ChannelCredentials | None:
    """TLS credentials when the services listen with TLS (checked against VERS_GRPC_TLS_CA_FILE, or the
    system's CAs when it is empty); None for plain TCP."""
    if not settings.grpc_tls_cert_file:
        return None
    ca = Path(settings.grpc_tls_ca_file).read_bytes() if settings.grpc_tls_ca_file else None
    return grpc.ssl_channel_credentials(root_certificates=ca)


class DefaultDeadline(grpc.aio.UnaryUnaryClientInterceptor):
    """Gives a unary call that names no timeout the platform's (VERS_RPC_TIMEOUT_SECONDS), so no call to a
    stuck peer waits forever. Streams have none: they last as long as the user keeps them."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        if client_call_details.timeout is None:
            client_call_details = client_call_details._replace(timeout=self.seconds)  # type: ignore[attr-defined]  # a namedtuple, which the stub does not say
        return await continuation(client_call_details, request)


def open_channel(settings: Settings, address: str, options: list[tuple[str, Any]] | None = None) -> grpc.aio.Channel:
    """`options` are more channel arguments, besides the message sizes."""
    options = message_size_options(settings) + (options or [])
    interceptors = [DefaultDeadline(settings.rpc_timeout_seconds)]
    credentials = client_credentials(settings)
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(address, credentials, options=options, interceptors=interceptors)


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
        cached = CachedResolver(inner, self._settings.auth_cache_seconds, self._settings.auth_negative_cache_seconds)
        return ServiceAwareResolver(cached, self.credential)

    def channel(self, service: str) -> grpc.aio.Channel:
        if service not in self._channels:
            self._channels[service] = open_channel(self._settings, self._settings.addr(service))
        return self._channels[service]

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()

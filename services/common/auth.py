"""Who is calling: bearer token -> Principal, resolved once per call and kept in a context variable."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections import OrderedDict
from collections.abc import Iterable
from contextvars import ContextVar, Token
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import grpc

from services.common.errors import Unauthenticated, Unavailable
from services.common.files import write_atomic
from services.common.quotas import OrgLimits
from vers.registry.v1 import registry_pb2, registry_pb2_grpc


@dataclass(frozen=True)
class Principal:
    org_id: str
    org_name: str
    key_id: str
    key_label: str
    is_admin: bool
    token: str
    # The platform's own services acting for the org (a saga's undo, a start-up repair), not a person.
    is_service: bool = False
    # What the org may hold (the registry's answer); None where it could not be learnt.
    limits: OrgLimits | None = None

    @property
    def org_label(self) -> str:
        """How messages name the org: its name, or its id when the name is not known."""
        return self.org_name or self.org_id


def principal_of(org_id: str) -> Principal | None:
    """The caller, if it acts for `org_id` (None outside a call, e.g. at start-up, or for another org)."""
    principal = _current.get()
    return principal if principal is not None and principal.org_id == org_id else None


def acting_key_id(org_id: str) -> str:
    """The API key of the person this call acts for in `org_id`, as the audit log names it; "" for the
    platform's own calls (a scheduled run, a repair) and outside a call."""
    principal = principal_of(org_id)
    return principal.key_id if principal is not None and not principal.is_service else ""


_current: ContextVar[Principal | None] = ContextVar("vers_principal", default=None)


def current_principal() -> Principal:
    principal = _current.get()
    if principal is None:
        raise Unauthenticated("this call needs an API key: send the header 'Authorization: Bearer <key>'")
    return principal


def set_principal(principal: Principal | None) -> Token[Principal | None]:
    return _current.set(principal)


def reset_principal(token: Token[Principal | None]) -> None:
    _current.reset(token)


def caller_metadata() -> tuple[tuple[str, str], ...]:
    """Metadata that forwards the caller's own token to a peer service."""
    return (("authorization", f"Bearer {current_principal().token}"),)


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    for key, value in metadata or ():
        if key.lower() == "authorization" and isinstance(value, str):
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return ""


def hash_token(token: str) -> str:
    # Keys are 256-bit random secrets, so a plain SHA-256 is enough to store them safely.
    return hashlib.sha256(token.encode()).hexdigest()


class TokenResolver(Protocol):
    async def resolve(self, token: str) -> Principal:
        """Return the principal behind `token`, or raise Unauthenticated."""
        ...


NEGATIVE_CACHE_ENTRIES = 10_000


class CachedResolver:
    """Trusts a resolved token for a moment (VERS_AUTH_CACHE_SECONDS, 1 s by default), so a burst of calls asks
    the registry once; remembers a token the registry refused for a while longer (up to NEGATIVE_CACHE_ENTRIES
    of them, the least recently seen dropped first), so a flood of bad tokens does not reach the registry at all.

    A key revoked in this process (the registry's) is forgotten at once by `forget_key`, even one whose lookup
    was in flight then; the other processes stop trusting it when their entry lapses."""

    def __init__(self, inner: TokenResolver, ttl_seconds: float, negative_ttl_seconds: float | None = None) -> None:
        self._inner = inner
        self._ttl = ttl_seconds
        if negative_ttl_seconds is None:
            from services.common.settings import get_settings

            negative_ttl_seconds = get_settings().auth_negative_cache_seconds
        self._negative_ttl = negative_ttl_seconds
        self._cache: dict[str, tuple[float, Principal]] = {}
        self._refused: OrderedDict[str, tuple[float, str]] = OrderedDict()
        # Bumped by every `forget_key`: a principal resolved before it is not remembered after it.
        self._generation = 0

    def forget_key(self, key_id: str) -> None:
        """Stop trusting the API key `key_id` now (it was revoked)."""
        self._generation += 1
        self._cache = {token: hit for token, hit in self._cache.items() if hit[1].key_id != key_id}

    async def resolve(self, token: str) -> Principal:
        key = hash_token(token)
        now = time.monotonic()
        generation = self._generation
        hit = self._cache.get(key)
        if hit and hit[0] > now:
            return hit[1]
        refused = self._refused.get(key)
        if refused is not None:
            if refused[0] > now:
                self._refused.move_to_end(key)
                raise Unauthenticated(refused[1])
            del self._refused[key]
        try:
            principal = await self._inner.resolve(token)
        except Unauthenticated as error:
            self._refuse(key, now, error.message)
            raise
        if generation == self._generation:
            self._remember(key, now, principal)
        return principal

    async def service_principal(self, principal: Principal) -> Principal:
        """A service token's principal with its org's name and limits, asked of `inner` once in a while."""
        key = hash_token(principal.token)
        now = time.monotonic()
        generation = self._generation
        hit = self._cache.get(key)
        if hit and hit[0] > now:
            return hit[1]
        enrich = getattr(self._inner, "service_principal", None)
        if enrich is None:
            return principal
        enriched: Principal = await enrich(principal)
        if enriched.limits is not None and generation == self._generation:
            self._remember(key, now, enriched)
        return enriched

    def _remember(self, key: str, now: float, principal: Principal) -> None:
        if len(self._cache) > 10_000:
            self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
        self._cache[key] = (now + self._ttl, principal)

    def _refuse(self, key: str, now: float, message: str) -> None:
        if self._negative_ttl <= 0:
            return
        self._refused[key] = (now + self._negative_ttl, message)
        self._refused.move_to_end(key)
        while len(self._refused) > NEGATIVE_CACHE_ENTRIES:
            self._refused.popitem(last=False)


class RegistryResolver:
    """Resolves tokens through the registry's Authenticate RPC (every service but the registry)."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = registry_pb2_grpc.RegistryServiceStub(channel)

    async def _authenticate(self, token: str) -> registry_pb2.AuthenticateResponse:
        try:
            return await self._stub.Authenticate(
                registry_pb2.AuthenticateRequest(),
                metadata=(("authorization", f"Bearer {token}"),),
                timeout=10,
            )
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise Unauthenticated(error.details() or "invalid API key") from None
            raise Unavailable(f"cannot check the API key: registry answered {error.code().name}") from None

    async def resolve(self, token: str) -> Principal:
        answer = await self._authenticate(token)
        return Principal(
            org_id=answer.org.id,
            org_name=answer.org.name,
            key_id=answer.api_key.id,
            key_label=answer.api_key.label,
            is_admin=answer.api_key.is_admin,
            token=token,
            limits=OrgLimits.from_message(answer.limits) if answer.HasField("limits") else None,
        )

    async def service_principal(self, principal: Principal) -> Principal:
        """The registry answers a service token with the org's name and limits. When it cannot be asked, the
        principal stays as it is (the services then apply the platform's defaults)."""
        try:
            answer = await self._authenticate(principal.token)
        except Unavailable:
            return principal
        if not answer.HasField("limits"):
            return principal
        return replace(principal, org_name=answer.org.name, limits=OrgLimits.from_message(answer.limits))


SERVICE_TOKEN_PREFIX = "vers-svc."
# The org a service token names when a service acts for no organization (a host agent's heartbeat): no org has
# this id (theirs are UUIDs), so it reaches none of an org's data.
PLATFORM_ITSELF = "platform"


class ServiceCredential:
    """How the services call each other for an org when no person's key is at hand (a crashed fork finished
    on start-up, a deletion reserved in the tagging service): a token `vers-svc.<org_id>.<HMAC>` signed with
    the platform's secret, which every service checks locally. It is never handed to anyone.

    Made inside a call that acts for the org, the token also carries the org's name and limits as the caller
    learnt them from the registry (`vers-svc.<org_id>.<facts>.<HMAC>`, signed together), so the callee need
    not ask the registry for them: a fork the registry runs makes no call back into the registry."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    @classmethod
    def load(cls, value: str, secret_file: Path) -> ServiceCredential:
        """From VERS_SERVICE_SECRET, or else the data folder's secret file, created (mode 0600) on first use."""
        if value:
            return cls(value.encode())
        if not secret_file.exists():
            write_atomic(secret_file, secrets.token_hex(32) + "\n", 0o600, exclusive=True)  # the first service wins
        secret = secret_file.read_text().strip()
        if not secret:
            raise RuntimeError(f"{secret_file} is empty: remove it and start the services again")
        return cls(secret.encode())

    def _signature(self, signed: str) -> str:
        return hmac.new(self._secret, signed.encode(), hashlib.sha256).hexdigest()

    def token(self, org_id: str) -> str:
        signed = org_id
        known = principal_of(org_id)
        if known is not None and known.limits is not None and known.org_name:
            facts = json.dumps({"name": known.org_name, "limits": known.limits.as_dict()}, separators=(",", ":"))
            signed += "." + base64.urlsafe_b64encode(facts.encode()).decode().rstrip("=")
        return f"{SERVICE_TOKEN_PREFIX}{signed}.{self._signature(signed)}"

    def metadata(self, org_id: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token(org_id)}"),)

    def principal(self, token: str) -> Principal:
        signed, _, signature = token.removeprefix(SERVICE_TOKEN_PREFIX).rpartition(".")
        org_id, _, facts = signed.partition(".")
        if not org_id or not hmac.compare_digest(signature, self._signature(signed)):
            raise Unauthenticated("invalid API key")
        principal = Principal(org_id, "", "platform", "platform service", False, token, is_service=True)
        if not facts:
            return principal
        known = json.loads(base64.urlsafe_b64decode(facts + "=" * (-len(facts) % 4)))
        return replace(principal, org_name=known["name"], limits=OrgLimits(**known["limits"]))


class ServiceAwareResolver:
    """Service tokens are checked here, with the shared secret; every other token goes to `inner`."""

    def __init__(self, inner: CachedResolver, credential: ServiceCredential) -> None:
        self._inner = inner
        self.credential = credential

    def forget_key(self, key_id: str) -> None:
        """Stop trusting the API key `key_id` in this process now (it was revoked here)."""
        self._inner.forget_key(key_id)

    async def resolve(self, token: str) -> Principal:
        if token.startswith(SERVICE_TOKEN_PREFIX):
            principal = self.credential.principal(token)
            if principal.limits is not None or principal.org_id == PLATFORM_ITSELF:
                return principal  # the calling service said the org's name and limits, signed; or acts for no org
            enrich = getattr(self._inner, "service_principal", None)
            return await enrich(principal) if enrich is not None else principal
        return await self._inner.resolve(token)

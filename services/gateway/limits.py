"""What the gateway does against a tenant that floods it: a token bucket per API key, a sliding minute of
failed authentications per client address, and bad tokens remembered as bad; and how long each call to a
service may take.

A token counts as the caller's own ("known good") once a call that checks it has succeeded; until then,
requests with it share the bucket of their client address, so a flood of made-up tokens can neither
escape the rate limit nor push real keys' buckets out of memory.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from google.protobuf.message import Message
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.types import Message as AsgiMessage
from starlette.websockets import WebSocket

from services.common.auth import bearer_token
from services.common.interceptor import Access, method_access
from services.common.peers import COLLECT_TIMEOUT, SCAN_TIMEOUT
from services.common.settings import Settings
from services.gateway.bindings import Binding
from services.gateway.errors import error_response

# Keys, addresses and tokens each table remembers at most, the least recently seen forgotten first.
MAX_TRACKED = 50_000
FAILURE_WINDOW_SECONDS = 60.0
# Set in the ASGI scope by an endpoint whose call checked the bearer token and succeeded.
AUTHENTICATED = "vers.authenticated"

Clock = Callable[[], float]
V = TypeVar("V")


def _bounded_put(table: OrderedDict[str, V], key: str, value: V) -> None:
    table[key] = value
    table.move_to_end(key)
    while len(table) > MAX_TRACKED:
        table.popitem(last=False)


class TokenBuckets:
    """One bucket per key, refilled at `rate` tokens a second up to `burst`; rate <= 0 turns it off."""

    def __init__(self, rate: float, burst: int, clock: Clock = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str) -> float:
        """Take a token from `key`'s bucket: 0.0, or the seconds until one is there (nothing taken)."""
        if self.rate <= 0:
            return 0.0
        now = self._clock()
        tokens, last = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        wait = 0.0
        if tokens >= 1:
            tokens -= 1
        else:
            wait = (1 - tokens) / self.rate
        _bounded_put(self._buckets, key, (tokens, now))
        return wait


class FailureWindow:
    """The last `limit` failures of each address: it is blocked while all of them lie in the last minute."""

    def __init__(self, limit: int, clock: Clock = time.monotonic) -> None:
        self.limit = limit
        self._clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def record(self, address: str) -> None:
        if self.limit <= 0:
            return
        times = self._failures.get(address) or deque(maxlen=self.limit)
        times.append(self._clock())
        _bounded_put(self._failures, address, times)

    def blocked_for(self, address: str) -> float:
        """Seconds until `address` may try again; 0.0 when it may now."""
        times = self._failures.get(address)
        if self.limit <= 0 or times is None or len(times) < self.limit:
            return 0.0
        return max(0.0, times[0] + FAILURE_WINDOW_SECONDS - self._clock())


class RecentSet:
    """Keys remembered for `ttl` seconds (forever when None)."""

    def __init__(self, ttl: float | None, clock: Clock = time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        self._until: OrderedDict[str, float] = OrderedDict()

    def add(self, key: str) -> None:
        if self.ttl is not None and self.ttl <= 0:
            return
        _bounded_put(self._until, key, math.inf if self.ttl is None else self._clock() + self.ttl)

    def discard(self, key: str) -> None:
        self._until.pop(key, None)

    def __contains__(self, key: str) -> bool:
        until = self._until.get(key)
        if until is None:
            return False
        if until <= self._clock():
            del self._until[key]
            return False
        return True


@dataclass(frozen=True)
class Refusal:
    status: int
    code: str
    message: str
    retry_after: float = 0.0

    def response(self) -> JSONResponse:
        answer = error_response(self.status, self.code, self.message)
        if self.retry_after:
            answer.headers["Retry-After"] = str(retry_seconds(self.retry_after))
        return answer


def retry_seconds(wait: float) -> int:
    return max(1, math.ceil(wait))


def token_key(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Guard:
    """The gateway's decisions about one request before any service sees it, and what it learns after."""

    def __init__(self, settings: Settings, clock: Clock = time.monotonic, public_paths: frozenset[str] = frozenset()) -> None:
        self.settings = settings
        self.public_paths = public_paths
        self.buckets = TokenBuckets(settings.rate_limit_per_second, settings.rate_limit_burst, clock)
        self.failures = FailureWindow(settings.auth_failures_per_minute, clock)
        self.refused_tokens = RecentSet(settings.auth_negative_cache_seconds, clock)
        self.good_tokens = RecentSet(None, clock)

    def check(self, address: str, token: str, path: str = "") -> Refusal | None:
        key = token_key(token) if token else ""
        known = bool(key) and key in self.good_tokens
        if not known:
            blocked = self.failures.blocked_for(address)
            if blocked:
                return Refusal(
                    429,
                    "RESOURCE_EXHAUSTED",
                    f"too many failed authentications from {address}: {self.failures.limit} in the last minute; try "
                    f"again in {retry_seconds(blocked)} s with a valid API key (the limit is VERS_AUTH_FAILURES_PER_MINUTE)",
                    blocked,
                )
            if key and key in self.refused_tokens and path not in self.public_paths:
                return Refusal(401, "UNAUTHENTICATED", "invalid API key")
        return self._take(f"key:{key}" if known else f"address:{address}", "this API key" if known else "this client address")

    def check_address(self, address: str) -> Refusal | None:
        """A request to a domain (a VM's own web service): only its client address's rate counts; what the
        VM answers says nothing of our keys."""
        return self._take(f"address:{address}", "this client address")

    def _take(self, bucket: str, whose: str) -> Refusal | None:
        wait = self.buckets.take(bucket)
        if not wait:
            return None
        return Refusal(
            429,
            "RESOURCE_EXHAUSTED",
            f"rate limit of {self.buckets.rate:g} requests per second (bursts of {self.buckets.burst}) reached "
            f"for {whose}; try again in {retry_seconds(wait)} s, or raise VERS_RATE_LIMIT_PER_SECOND / "
            f"VERS_RATE_LIMIT_BURST",
            wait,
        )

    def record(self, address: str, token: str, status: int, authenticated: bool) -> None:
        key = token_key(token) if token else ""
        if status == 401:
            self.failures.record(address)
            if key and key not in self.refused_tokens:  # a refusal from memory does not prolong it
                self.refused_tokens.add(key)
                self.good_tokens.discard(key)
        elif authenticated and key:
            self.good_tokens.add(key)


def client_address(scope: Scope) -> str:
    client = scope.get("client")
    return client[0] if client else "unknown"


def _token(scope: Scope) -> str:
    headers = tuple((name.decode("latin-1"), value.decode("latin-1")) for name, value in scope.get("headers", ()))
    return bearer_token(headers)


class GuardMiddleware:
    """Runs the Guard around every HTTP request and WebSocket handshake of the API."""

    def __init__(self, app: ASGIApp, guard: Guard) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        address, token = client_address(scope), _token(scope)
        refusal = self.guard.check(address, token, scope.get("path", ""))
        if refusal is not None:
            self.guard.record(address, token, refusal.status, authenticated=False)
            if scope["type"] == "http":
                await refusal.response()(scope, receive, send)
            else:
                await WebSocket(scope, receive, send).send_denial_response(refusal.response())
            return

        async def observe(message: AsgiMessage) -> None:
            kind = message["type"]
            if kind in ("http.response.start", "websocket.http.response.start"):
                self.guard.record(address, token, message["status"], bool(scope.get(AUTHENTICATED)))
            elif kind == "websocket.accept":
                self.guard.record(address, token, 101, bool(scope.get(AUTHENTICATED)))
            await send(message)

        await self.app(scope, receive, observe)


def checks_token(binding: Binding) -> bool:
    """Whether the service checks the caller's token for this call (a success then proves it good)."""
    return method_access(binding.grpc_path) not in (None, Access.PUBLIC)


def call_timeout(binding: Binding, message: Message, settings: Settings) -> float:
    """The deadline of one unary call: VERS_RPC_TIMEOUT_SECONDS, plus an exec's own timeout (the longest
    allowed when it gives none), plus the boot timeout for a call that may first wait for a VM's boot, plus
    the time a publish's secret scan or a collection may take."""
    timeout = settings.rpc_timeout_seconds
    name = binding.method.name
    if name in ("ExecVm", "ExecVmStream"):
        asked = getattr(message, "timeout_secs", 0)
        timeout += asked if asked > 0 else settings.exec_max_timeout_seconds
    elif name == "AttachExecStream":
        timeout += settings.exec_max_timeout_seconds
    elif name in ("DownloadFiles", "UploadFiles", "UploadImage"):
        timeout += settings.file_transfer_timeout_seconds
    if _may_wait_for_boot(name, message):
        timeout += settings.boot_timeout_seconds
    return timeout + _LONGER.get(name, 0.0)


# Calls that scan commits for secrets or collect them: as long as the registry gives them.
_LONGER = {"SetRepositoryVisibility": SCAN_TIMEOUT, "CollectGarbage": COLLECT_TIMEOUT}


# Calls that wait for a booting VM with no field to say so.
_WAIT_FOR_BOOT = ("ExecVm", "ExecVmStream", "GetSshKey", "ReadFile", "WriteFile", "DownloadFiles", "UploadFiles")


def _may_wait_for_boot(name: str, message: Message) -> bool:
    fields = message.DESCRIPTOR.fields_by_name
    if "wait_boot" in fields:
        return bool(message.wait_boot)  # type: ignore[attr-defined]
    if "skip_wait_boot" in fields:
        return not message.skip_wait_boot  # type: ignore[attr-defined]
    return name in _WAIT_FOR_BOOT

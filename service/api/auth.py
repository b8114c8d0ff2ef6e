"""API keys: who may call the service, and the per-key limits.

When ``SALIENCY_API_KEYS`` (comma-separated) or ``SALIENCY_API_KEYS_FILE`` (one key per line,
``#`` comments) is set, every request needs ``Authorization: Bearer <key>`` or
``X-API-Key: <key>``, except the open paths: ``/healthz``, ``/readyz``, ``/openapi.json`` (the
Swagger page fetches it before the user can authorise) and ``/metrics`` unless
``SALIENCY_METRICS_REQUIRE_KEY`` is true. A missing or unknown key is a 401 problem with
``WWW-Authenticate: Bearer``; CORS preflights pass (the CORS middleware sits outside this one).

The key is never kept past the check: the request carries its *principal*, ``key-`` plus the
first 16 hex digits of the key's SHA-256, which is what jobs are owned by and limits count by
(and what a log may show). The check hashes the presented value and compares it with every
configured key's hash using ``hmac.compare_digest``, without stopping at a match, so its time
depends neither on how much of a key matched nor on which key it was.

Without keys the service is open (local use stays ``make serve``); ``create_app`` logs a warning
when it is configured to listen on a non-loopback address that way.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api import problems
from service.config import Settings
from service.errors import ConfigError, RateLimited, Unauthorized

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/openapi.json"})
BEARER_SCHEME = "bearer"
HEADER_SCHEME = "apiKey"
KEY_HEADER = "X-API-Key"
MIN_KEY_LENGTH = 16


def open_paths(settings: Settings) -> frozenset[str]:
    """The paths that never need a key."""
    return OPEN_PATHS if settings.metrics_require_key else OPEN_PATHS | {"/metrics"}


def principal_of(key: str) -> str:
    """The id a key is known by inside the service (in job records, limits and logs)."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class KeyRing:
    """The configured keys, as SHA-256 digests (the keys themselves are not kept)."""

    digests: tuple[tuple[bytes, str], ...]  # (sha256 of the key, principal)

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing | None:
        """The keys of ``SALIENCY_API_KEYS`` and ``SALIENCY_API_KEYS_FILE``; ``None`` when neither
        is set. ``ConfigError`` for an unreadable file, a set but empty list, or a key shorter than
        ``MIN_KEY_LENGTH`` characters."""
        keys: list[str] = []
        configured = False
        if settings.api_keys is not None and settings.api_keys.strip():
            configured = True
            keys += [k.strip() for k in settings.api_keys.split(",") if k.strip()]
        if settings.api_keys_file is not None:
            configured = True
            try:
                text = settings.api_keys_file.read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigError(f"cannot read SALIENCY_API_KEYS_FILE: {exc.strerror}") from None
            for line in text.splitlines():
                line = line.split("#", 1)[0].strip()
                if line:
                    keys.append(line)
        if not configured:
            return None
        if not keys:
            raise ConfigError("API keys are configured but none was given")
        short = sum(1 for k in keys if len(k) < MIN_KEY_LENGTH or not k.isprintable() or " " in k)
        if short:
            raise ConfigError(
                f"{short} API key(s) are shorter than {MIN_KEY_LENGTH} characters or contain spaces"
            )
        return cls(tuple((hashlib.sha256(k.encode()).digest(), principal_of(k)) for k in dict.fromkeys(keys)))

    def identify(self, presented: str) -> str | None:
        """The principal of ``presented``, or ``None``; constant time over the configured keys."""
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        found: str | None = None
        for known, principal in self.digests:
            if hmac.compare_digest(digest, known):
                found = principal
        return found


def presented_key(headers: Headers) -> str | None:
    """The key a request carries: ``Authorization: Bearer …`` first, then ``X-API-Key``."""
    auth = headers.get("authorization")
    if auth:
        scheme, _, value = auth.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    key = headers.get(KEY_HEADER)
    return key.strip() if key and key.strip() else None


class AuthMiddleware:
    """Refuses requests without a known key (401 problem+json); marks the others with their
    principal in ``scope["state"]["principal"]`` (``service.api.deps.get_owner`` reads it)."""

    def __init__(self, app: ASGIApp, *, keys: KeyRing | None, open: frozenset[str]) -> None:
        self.app = app
        self.keys = keys
        self.open = open

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.keys is None or scope.get("path", "") in self.open:
            await self.app(scope, receive, send)
            return
        presented = presented_key(Headers(scope=scope))
        principal = self.keys.identify(presented) if presented is not None else None
        if principal is None:
            why = "no API key was sent" if presented is None else "the API key is not valid"
            detail = f"{why}: send it as 'Authorization: Bearer <key>' or '{KEY_HEADER}: <key>'"
            response = problems.from_domain(Unauthorized(detail), scope.get("path", "/"))
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)


@dataclass
class KeyLimits:
    """Concurrent synchronous requests per principal. Touched only on the event loop (no lock)."""

    max_sync: int
    active: dict[str, int] = field(default_factory=dict)

    def acquire(self, principal: str) -> None:
        n = self.active.get(principal, 0)
        if n >= self.max_sync:
            raise RateLimited(
                f"this API key already has {n} synchronous requests running (at most {self.max_sync}); "
                "retry when one has finished, or submit a job",
                retry_after=1,
            )
        self.active[principal] = n + 1

    def release(self, principal: str) -> None:
        n = self.active.get(principal, 0) - 1
        if n > 0:
            self.active[principal] = n
        else:
            self.active.pop(principal, None)


async def sync_slot(request: Request) -> AsyncIterator[None]:
    """A dependency of the synchronous routes: holds one of the caller's concurrent slots for the
    request's duration (429 when it has none left). Requests without a principal (no keys
    configured) are limited only by the global queue."""
    principal = request.scope.get("state", {}).get("principal")
    limits: KeyLimits = request.app.state.services.key_limits
    if principal is None:
        yield
        return
    limits.acquire(principal)
    try:
        yield
    finally:
        limits.release(principal)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or name) only listens locally."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False

"""CORS for browser apps (`cors.origins`), as pure ASGI middleware.

- A **preflight** (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) from an allowed origin is answered
  here, 204, before any route: it needs no key, reaches no route and costs nothing. It allows `GET`, `POST` and
  `OPTIONS`, the headers the relay reads (`Authorization`, `Content-Type`, `Idempotency-Key`, `mj-api-secret`, the
  OpenAI SDKs' `OpenAI-*` and every `x-stainless-*` the browser asks for), and is cached `cors.max_age_s`.
- An **ordinary request** from an allowed origin gets `Access-Control-Allow-Origin` and exposes `Retry-After`,
  `x-request-id` and `x-should-retry` to the page, errors included.
- Any other origin (or none) gets no CORS header, only `Vary: Origin` for caches (its preflight goes on to the
  router, which answers 405). `/admin/...` gets no CORS header at all (the admin UI is served by the relay
  itself; no other page may drive the admin API).

The `Origin` header is only ever compared with the configured origins, never echoed: the value sent back is the
configured one (or `*`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

ALLOW_METHODS = "GET, POST, OPTIONS"
ALLOW_HEADERS = (
    "authorization",
    "content-type",
    "idempotency-key",
    "mj-api-secret",
    "openai-organization",
    "openai-project",
    "openai-beta",
    "x-requested-with",
)
# The OpenAI SDKs send a family of these (`x-stainless-os`, `-retry-count`, `-timeout`, ...); it grows with them.
STAINLESS_PREFIX = "x-stainless-"
EXPOSE_HEADERS = "Retry-After, x-request-id, x-should-retry"
EXCLUDED_PREFIXES = ("/admin",)

_HEADER_NAME = re.compile(r"[a-z0-9-]{1,64}")
_MAX_REQUESTED = 32


class Cors:
    def __init__(self, app: ASGIApp, origins: Sequence[str], max_age_s: int = 600) -> None:
        self.app = app
        self.any = "*" in origins
        self.origins = frozenset(origin for origin in origins if origin != "*")
        self.max_age = str(max_age_s)

    def _allowed(self, origin: str) -> str | None:
        """What to send as `Access-Control-Allow-Origin` for this origin, or None when it is not allowed."""
        if origin in self.origins:
            return origin  # the configured string, equal to the header
        return "*" if self.any else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path.startswith(EXCLUDED_PREFIXES):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        allow = self._allowed(origin) if origin is not None else None
        if allow is None:
            if self.any:
                await self.app(scope, receive, send)
                return

            async def vary_send(message: Message) -> None:
                # The answer depends on the Origin (an allowed one gets CORS headers): say so to caches.
                if message["type"] == "http.response.start":
                    MutableHeaders(scope=message).add_vary_header("Origin")
                await send(message)

            await self.app(scope, receive, vary_send)
            return
        if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
            await self._preflight(allow, headers, send)
            return

        async def cors_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                answer = MutableHeaders(scope=message)
                answer["access-control-allow-origin"] = allow
                answer["access-control-expose-headers"] = EXPOSE_HEADERS
                if allow != "*":
                    answer.add_vary_header("Origin")
            await send(message)

        await self.app(scope, receive, cors_send)

    async def _preflight(self, allow: str, headers: Headers, send: Send) -> None:
        answer = [
            (b"access-control-allow-origin", allow.encode()),
            (b"access-control-allow-methods", ALLOW_METHODS.encode()),
            (b"access-control-allow-headers", ", ".join(self._allow_headers(headers)).encode()),
            (b"access-control-max-age", self.max_age.encode()),
            (b"content-length", b"0"),
        ]
        if allow != "*":
            answer.append((b"vary", b"Origin"))
        await send({"type": "http.response.start", "status": 204, "headers": answer})
        await send({"type": "http.response.body", "body": b""})

    @staticmethod
    def _allow_headers(headers: Headers) -> list[str]:
        """The headers the relay reads, and the `x-stainless-*` ones this browser asks for (well-formed names
        only, a bounded number)."""
        allowed = list(ALLOW_HEADERS)
        requested = headers.get("access-control-request-headers", "")
        for name in requested.lower().split(",")[: _MAX_REQUESTED * 4]:
            name = name.strip()
            if name.startswith(STAINLESS_PREFIX) and _HEADER_NAME.fullmatch(name) and name not in allowed:
                allowed.append(name)
                if len(allowed) >= len(ALLOW_HEADERS) + _MAX_REQUESTED:
                    break
        return allowed

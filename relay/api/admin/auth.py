"""The admin token: `server.admin_token`, sent as `Authorization: Bearer <token>` and compared in constant time.
With no token configured the admin surface does not exist (404)."""

from __future__ import annotations

import functools
import hmac
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response

from relay.api.common import credential, relay_of
from relay.errors import AuthenticationFailed, NotFound

Endpoint = Callable[[Request], Awaitable[Response]]


def enabled(request: Request) -> None:
    """Raises the router's own 404 when no admin token is configured: a disabled admin surface is no route at all."""
    if not relay_of(request).config.server.admin_token:
        raise NotFound(f"No route for {request.method} {request.url.path}.")


def check(request: Request) -> None:
    """The caller must present the admin token; raises 401 otherwise (and 404 when the admin API is off)."""
    enabled(request)
    expected = relay_of(request).config.server.admin_token or ""
    given = credential(request, native=False)
    if not given:
        raise AuthenticationFailed("Send the admin token as 'Authorization: Bearer ADMIN_TOKEN'.", reason="missing")
    # Header values arrive as latin-1 text: back to their bytes, so any byte sequence compares without an error.
    if not hmac.compare_digest(given.encode("latin-1", "replace"), expected.encode()):
        raise AuthenticationFailed("Incorrect admin token.")


def admin(endpoint: Endpoint) -> Endpoint:
    """An admin API route: the token is checked before the route does anything."""

    @functools.wraps(endpoint)
    async def guarded(request: Request) -> Response:
        check(request)
        response = await endpoint(request)
        response.headers["Cache-Control"] = "no-store"
        return response

    return guarded

"""POST /hooks/{provider}/{token}: a provider's `notifyHook` call about one of its tasks (`core.upstream_hooks`).

Any token but the provider's own is a 404, as for a route that does not exist; a call that is taken is answered
204 at once, whatever it said (providers neither read the answer nor retry), and applied right after.

A job with progress hooks makes eight calls or so, more than any other request it causes, so a well-formed call
with a valid token takes a lane of its own (`HookLane`): inside `Observe` (its log line and metrics, as for any
request) but ahead of the rest of the stack and the router. Everything else (another method, a wrong token, a body
without a length or over the limit) goes the ordinary way, to `upstream_hook`.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from relay.api.common import relay_of
from relay.core.upstream_hooks import UpstreamHooks
from relay.errors import NotFound

PATH = "/hooks/{provider}/{token}"
_PREFIX = "/hooks/"


async def upstream_hook(request: Request) -> Response:
    relay = relay_of(request)
    provider, token = request.path_params["provider"], request.path_params["token"]
    if not relay.upstream_hooks.accepts(provider, token):
        raise NotFound(f"No route for {request.method} {request.url.path}.")
    body = await request.body()
    if not relay.upstream_hooks.take(provider, body):
        await relay.upstream_hooks.apply(provider, body)
    return Response(status_code=204)


class _Template:
    """What `Observe` reads of a matched route: its path template."""

    path = PATH


class HookLane:
    """The fast lane for upstream hook calls (see the module's docstring)."""

    def __init__(self, app: ASGIApp, hooks: UpstreamHooks, limit: int) -> None:
        self.app = app
        self.hooks = hooks
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        taken = self._taken(scope)
        if taken is None:
            await self.app(scope, receive, send)
            return
        provider = taken
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the caller went away: nobody to answer
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        scope["route"] = _Template
        if not self.hooks.take(provider, body):
            await self.hooks.apply(provider, body)
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    def _taken(self, scope: Scope) -> str | None:
        """The provider of a call this lane takes; None for anything the ordinary stack must answer."""
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].startswith(_PREFIX):
            return None
        parts = scope["path"][len(_PREFIX) :].split("/")
        if len(parts) != 2 or not self.hooks.accepts(parts[0], parts[1]):
            return None
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is None or not length.isdigit() or len(length) > 12 or int(length) > self.limit:
            return None  # a body of no stated length, or too large: the ordinary way (413 when too large)
        return str(parts[0])

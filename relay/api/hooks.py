"""POST /hooks/{provider}/{token}: a provider's `notifyHook` call about one of its tasks (`core.upstream_hooks`).

Any token but the provider's own is a 404, as for a route that does not exist; a call that is taken is answered
204 at once, whatever it said (providers neither read the answer nor retry), and applied right after.

A job with progress hooks makes eight calls or so, more than any other request it causes, and the provider's few
calling threads each wait for the answer: so a well-formed call with a valid token is answered by the connection
itself (`HookLane`, a `relay.server.Lane`), within the read that completes it, with its log line and metrics as
for any request, and no ASGI task, middleware or router. Everything else (another method, a wrong token, a body
without a length or over the limit, a call while `MAX_APPLYING` are being applied, a server without the lane) goes
the ordinary way, to `upstream_hook`, which applies a call before answering it when too many are being applied.
"""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import Response

from relay.api.common import relay_of
from relay.core.upstream_hooks import UpstreamHooks
from relay.errors import NotFound
from relay.metrics import Metrics
from relay.middleware import CLIENT_CLOSED, observed, request_id

PATH = "/hooks/{provider}/{token}"
_PREFIX = "/hooks/"


async def upstream_hook(request: Request) -> Response:
    relay = relay_of(request)
    provider, token = request.path_params["provider"], request.path_params["token"]
    if not relay.upstream_hooks.accepts(provider, token):
        raise NotFound(f"No route for {request.method} {request.url.path}.")
    body = await request.body()
    if relay.upstream_hooks.room(len(body)):
        relay.upstream_hooks.take(provider, body)
    else:
        await relay.upstream_hooks.apply(provider, body)
    return Response(status_code=204)


class HookLane:
    """The connection's own answer to upstream hook calls (see the module's docstring)."""

    def __init__(self, hooks: UpstreamHooks, metrics: Metrics) -> None:
        self.hooks = hooks
        self.metrics = metrics

    def claim(self, path: str, length: int) -> HookCall | None:
        if not path.startswith(_PREFIX):
            return None
        parts = path[len(_PREFIX) :].split("/")
        if len(parts) != 2 or not self.hooks.accepts(parts[0], parts[1]) or not self.hooks.room(length):
            return None
        return HookCall(self, parts[0])


class HookCall:
    __slots__ = ("lane", "provider", "started")

    def __init__(self, lane: HookLane, provider: str) -> None:
        self.lane = lane
        self.provider = provider
        self.started = time.perf_counter()

    def answer(self, body: bytes) -> tuple[int, str]:
        self.lane.hooks.take(self.provider, body)
        return 204, self._observed(204)

    def stalled(self) -> None:
        self._observed(408)

    def gone(self) -> None:
        self._observed(CLIENT_CLOSED)

    def _observed(self, status: int) -> str:
        request = request_id()
        observed(self.lane.metrics, request, "POST", PATH, status, time.perf_counter() - self.started)
        return request

"""POST /hooks/{provider}/{token}: a provider's `notifyHook` call about one of its tasks (`core.upstream_hooks`).

Any token but the provider's own is a 404, as for a route that does not exist; a call that is taken is answered
204 at once, whatever it said (providers neither read the answer nor retry), and applied right after."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from relay.api.common import relay_of
from relay.errors import NotFound


async def upstream_hook(request: Request) -> Response:
    relay = relay_of(request)
    provider, token = request.path_params["provider"], request.path_params["token"]
    if not relay.upstream_hooks.accepts(provider, token):
        raise NotFound(f"No route for {request.method} {request.url.path}.")
    body = await request.body()
    if not relay.upstream_hooks.take(provider, body):
        await relay.upstream_hooks.apply(provider, body)
    return Response(status_code=204)

"""GET /v1/models: the configured image models."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse

from relay.api.common import relay_of


async def list_models(request: Request) -> JSONResponse:
    relay = relay_of(request)
    await relay.auth(request)
    data = [
        {"id": name, "object": "model", "created": relay.started_at, "owned_by": "mj-relay"}
        for name in relay.config.models
    ]
    return JSONResponse({"object": "list", "data": data})

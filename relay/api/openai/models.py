"""GET /v1/models: the configured image models; GET /v1/models/{model}: one of them (the SDKs' `models.retrieve`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from relay.api.common import relay_of
from relay.core.jobs import unknown_model

if TYPE_CHECKING:
    from relay.services import Relay


def _model(relay: Relay, name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": relay.started_at, "owned_by": "mj-relay"}


async def list_models(request: Request) -> JSONResponse:
    relay = relay_of(request)
    await relay.auth(request)
    return JSONResponse({"object": "list", "data": [_model(relay, name) for name in relay.config.models]})


async def retrieve_model(request: Request) -> JSONResponse:
    relay = relay_of(request)
    await relay.auth(request)
    name = request.path_params["model"]
    if name not in relay.config.models:
        raise unknown_model(name)
    return JSONResponse(_model(relay, name))

"""GET /v1/models: the configured image models the key may use; GET /v1/models/{model}: one of them (the SDKs'
`models.retrieve`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from relay.api.common import relay_of
from relay.core.jobs import unknown_model
from relay.core.submit import model_not_allowed

if TYPE_CHECKING:
    from relay.services import Relay


def _model(relay: Relay, name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": relay.started_at, "owned_by": "mj-relay"}


async def list_models(request: Request) -> JSONResponse:
    relay = relay_of(request)
    key = await relay.auth(request)
    # As OpenAI lists a key's models: a chat client fills its model picker from here.
    models = [_model(relay, name) for name in relay.config.models if key.allows(name)]
    return JSONResponse({"object": "list", "data": models})


async def retrieve_model(request: Request) -> JSONResponse:
    relay = relay_of(request)
    key = await relay.auth(request)
    name = request.path_params["model"]
    if name not in relay.config.models:
        raise unknown_model(name)
    if not key.allows(name):
        raise model_not_allowed(name)
    return JSONResponse(_model(relay, name))

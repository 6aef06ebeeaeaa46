"""`build_app(config)`: the Starlette application, its routes and middleware, and the lifespan that opens and
closes the relay's services (`relay.services.Relay`)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route

from adapters import Upstream
from relay.api import admin, files, hooks, openapi, ops
from relay.api.cors import Cors
from relay.api.errors import error_response
from relay.api.mj import render as mj_render
from relay.api.mj import routes as mj_routes
from relay.api.openai import billing, chat, images, models
from relay.clock import Clock, SystemClock
from relay.config import Config
from relay.errors import MethodNotAllowed, NotFound, RelayError
from relay.middleware import BodyLimit, Guard, Observe
from relay.services import Relay

log = logging.getLogger("relay")


async def _http_error(request: Request, exc: Exception) -> Response:
    """The router's own 404 and 405, in the request's surface envelope."""
    assert isinstance(exc, HTTPException)
    path = request.url.path
    error: RelayError
    if exc.status_code == 405:
        allow = (exc.headers or {}).get("Allow", "")
        error = MethodNotAllowed(f"{request.method} is not allowed on {path}.", allow=allow)
    else:
        hint = ""
        trimmed = path.rstrip("/")
        if trimmed != path and trimmed and _routed(request, trimmed):
            hint = f" (without the trailing slash: {trimmed})"
        error = NotFound(f"No route for {request.method} {path}{hint}.")
    return error_response(path, error)


def _routed(request: Request, path: str) -> bool:
    scope = {**request.scope, "path": path}
    return any(route.matches(scope)[0] is not Match.NONE for route in request.app.router.routes)


def routes() -> list[Route]:
    return [
        Route("/v1/images/generations", images.create_image, methods=["POST"]),
        Route("/v1/chat/completions", chat.chat_completions, methods=["POST"]),
        Route("/v1/models", models.list_models, methods=["GET"]),
        Route("/v1/models/{model}", models.retrieve_model, methods=["GET"]),
        *billing.routes(),
        Route("/files/{job_id}/{name}", files.get_file, methods=["GET"]),
        Route("/healthz", ops.healthz, methods=["GET"]),
        Route("/readyz", ops.readyz, methods=["GET"]),
        Route("/metrics", ops.metrics, methods=["GET"]),
        Route("/openapi.json", openapi.openapi, methods=["GET"]),
        Route(hooks.PATH, hooks.upstream_hook, methods=["POST"]),
        *mj_routes.routes(),
        *admin.routes(),
    ]


def build_app(config: Config, *, clock: Clock | None = None, upstreams: dict[str, Upstream] | None = None) -> Starlette:
    relay = Relay(config, clock or SystemClock(), upstreams)
    relay.notifier.render = lambda row, base, now: mj_render.task(row, relay.images, base, now)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await relay.open()
        try:
            yield
        finally:
            await relay.close()

    app = Starlette(
        routes=routes(),
        middleware=[
            Middleware(Observe, metrics=relay.metrics),
            *(
                [Middleware(Cors, origins=config.cors.origins, max_age_s=config.cors.max_age_s)]
                if config.cors.origins
                else []
            ),
            Middleware(Guard, metrics=relay.metrics),
            Middleware(BodyLimit, limit=config.server.max_body_bytes),
        ],
        exception_handlers={HTTPException: _http_error},
        lifespan=lifespan,
    )
    app.router.redirect_slashes = False  # a trailing slash is a 404 in the envelope, not a redirect
    app.state.relay = relay
    app.state.lane = hooks.HookLane(relay.upstream_hooks, relay.metrics)  # answered by the server's connections
    return app

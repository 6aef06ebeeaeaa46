"""`build_app(config)`: the Starlette application, its routes, and the services its lifespan opens and closes."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from adapters import Upstream
from relay import logs
from relay.api import chat, files, images, models, ops
from relay.api.common import Authenticator
from relay.clock import Clock, SystemClock
from relay.config import Config
from relay.core.events import JobEvents
from relay.core.finish import Finisher
from relay.core.images import ImageStore, load_or_create_secret
from relay.core.jobs import JobService
from relay.core.providers import ProviderPool
from relay.core.references import ReferenceLoader
from relay.core.tracker import Tracker
from relay.errors import InternalError, MethodNotAllowed, NotFound, RelayError
from relay.metrics import Metrics
from relay.middleware import BodyLimit, Observe
from relay.store.db import Database
from relay.store.jobs import JobStore
from relay.store.keys import KeyStore

log = logging.getLogger("relay")


class Relay:
    """Every service of one running relay, wired together."""

    def __init__(self, config: Config, clock: Clock, upstreams: dict[str, Upstream] | None = None) -> None:
        self.config = config
        self.clock = clock
        self.metrics = Metrics()
        self.db = Database(config.database_url(), pool_size=config.database.pool_size)
        self.keys = KeyStore(self.db.engine)
        self.store = JobStore(self.db.engine)
        self.events = JobEvents()
        self.pool = ProviderPool(config, self.metrics, clock, upstreams)
        secrets = config.images.secrets() or [load_or_create_secret(Path(config.data_dir) / "signing.key")]
        logs.redact([*secrets, *(p.secret for p in config.providers)])
        self.images = ImageStore(config.images_dir(), secrets, config.images.url_ttl_s)
        self.finisher = Finisher(self.store, self.events, self.metrics, clock)
        self.tracker = Tracker(
            config=config,
            store=self.store,
            pool=self.pool,
            images=self.images,
            finisher=self.finisher,
            events=self.events,
            clock=clock,
        )
        self.jobs = JobService(
            config=config,
            store=self.store,
            keys=self.keys,
            pool=self.pool,
            tracker=self.tracker,
            finisher=self.finisher,
            events=self.events,
            clock=clock,
        )
        self.auth = Authenticator(self.keys)
        self.references = ReferenceLoader(config.api.references)
        self.ready = False
        self.started_at = int(clock.now())

    async def open(self) -> None:
        await self.db.migrate()
        self.images.root.mkdir(parents=True, exist_ok=True)
        await self.tracker.start()
        self.ready = True

    async def close(self) -> None:
        self.ready = False
        await self.jobs.close()
        await self.tracker.stop()
        await self.pool.aclose()
        await self.references.aclose()
        await self.db.dispose()


async def _relay_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RelayError)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.response_headers())


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    error: RelayError
    if exc.status_code == 404:
        error = NotFound(f"No route for {request.method} {request.url.path}.")
    elif exc.status_code == 405:
        error = MethodNotAllowed(
            f"{request.method} is not allowed on {request.url.path}.", headers=dict(exc.headers or {})
        )
    else:
        error = RelayError(str(exc.detail))
        error.status = exc.status_code
    return await _relay_error(request, error)


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.error("unhandled error", exc_info=exc, extra={"fields": {"path": request.url.path}})
    return await _relay_error(request, InternalError("The relay hit an internal error; it has been logged."))


def routes() -> list[Route]:
    return [
        Route("/v1/images/generations", images.create_image, methods=["POST"]),
        Route("/v1/chat/completions", chat.chat_completions, methods=["POST"]),
        Route("/v1/models", models.list_models, methods=["GET"]),
        Route("/files/{job_id}/{name}", files.get_file, methods=["GET"]),
        Route("/healthz", ops.healthz, methods=["GET"]),
        Route("/readyz", ops.readyz, methods=["GET"]),
        Route("/metrics", ops.metrics, methods=["GET"]),
    ]


def build_app(config: Config, *, clock: Clock | None = None, upstreams: dict[str, Upstream] | None = None) -> Starlette:
    relay = Relay(config, clock or SystemClock(), upstreams)

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
            Middleware(BodyLimit, limit=config.server.max_body_bytes),
        ],
        exception_handlers={RelayError: _relay_error, HTTPException: _http_error, Exception: _unexpected},
        lifespan=lifespan,
    )
    app.state.relay = relay
    return app

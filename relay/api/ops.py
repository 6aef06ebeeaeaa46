"""Operations: liveness, readiness and Prometheus metrics (no key needed; nothing secret is exposed)."""

from __future__ import annotations

import contextlib

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from relay.api.common import relay_of
from relay.store.ledger import open_holds


async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> JSONResponse:
    relay = relay_of(request)
    checks = {
        "started": relay.ready,
        "database": await relay.db.ping(),
        "tracker": relay.tracker.running,
        "coordination": relay.coordinator.running,
    }
    if relay.broadcast is not None:
        checks["notifications"] = relay.broadcast.connected
    ready = all(checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "not ready", "checks": checks}, status_code=200 if ready else 503
    )


async def metrics(request: Request) -> Response:
    relay = relay_of(request)
    with contextlib.suppress(Exception):  # a database that does not answer leaves the last figures
        count, credits = await open_holds(relay.db.engine)
        relay.metrics.holds_open.set(count)
        relay.metrics.credits_held.set(credits)
    return Response(relay.metrics.render(), media_type=CONTENT_TYPE_LATEST)
